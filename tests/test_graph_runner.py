"""DecodeGraphRunner on CPU: bucket choice, padding contract, and that bucketed (padded)
execution returns exactly what a direct call returns, in "eager-bucket" mode and in "graph"
mode driven by a stand-in graph that replays like a device graph (reads the static input
buffers at replay time, writes into the output tensor captured at capture time)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from sizewise.engine.graph_runner import DecodeGraphRunner, default_buckets, graph_held_bytes
from sizewise.platform import CpuPlatform, get_platform

V, H, HKV, D, BS = 48, 4, 2, 8, 4  # vocab, heads, kv heads, head dim, block size
MAX_BLOCKS = 5


# ----- a toy forward_paged built from the platform reference ops --------------------------
class ToyModel:
    """embed -> q/k/v -> write_kv -> paged_attention -> out proj -> logits [B, Q, V].

    Position enters through a sinusoidal term so wrong positions would show in the logits.
    """

    def __init__(self, platform, num_blocks: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.platform = platform
        self.embed = torch.randn(V, H * D, generator=g)
        self.wq = torch.randn(H * D, H * D, generator=g) / (H * D) ** 0.5
        self.wk = torch.randn(H * D, HKV * D, generator=g) / (H * D) ** 0.5
        self.wv = torch.randn(H * D, HKV * D, generator=g) / (H * D) ** 0.5
        self.wo = torch.randn(H * D, V, generator=g) / (H * D) ** 0.5
        self.k_cache = torch.randn(num_blocks, BS, HKV, D, generator=g)
        self.v_cache = torch.randn(num_blocks, BS, HKV, D, generator=g)
        self.calls: list[int] = []  # batch size of every call

    def forward_paged(self, input_ids, positions, slot_mapping, block_tables, context_lens):
        # input_ids, positions, slot_mapping: [B, Q]; block_tables: [B, M]; context_lens: [B]
        B, Q = input_ids.shape
        self.calls.append(B)
        x = self.embed[input_ids] + torch.sin(positions[..., None].float() * 0.37)  # [B, Q, H*D]
        q = (x @ self.wq).view(B, Q, H, D)
        k = (x @ self.wk).view(B * Q, HKV, D)
        v = (x @ self.wv).view(B * Q, HKV, D)
        self.platform.write_kv(k, v, self.k_cache, self.v_cache, slot_mapping.reshape(-1))
        o = self.platform.paged_attention(q, self.k_cache, self.v_cache, block_tables, context_lens, D**-0.5)
        return o.reshape(B, Q, H * D) @ self.wo

    def clone(self) -> "ToyModel":
        other = ToyModel.__new__(ToyModel)
        other.__dict__.update(self.__dict__)
        other.k_cache, other.v_cache = self.k_cache.clone(), self.v_cache.clone()
        other.calls = []
        return other


def make_batch(seed: int, B: int, Q: int, num_blocks: int):
    """B sequences with random contexts; the step's Q new tokens are the last Q positions."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(Q, MAX_BLOCKS * BS + 1, (B,), generator=g)
    perm = torch.randperm(num_blocks - 1, generator=g)  # the last block is the sink
    width = int(max(-(-int(c) // BS) for c in ctx))  # narrower than MAX_BLOCKS: runner pads columns
    tables = torch.full((B, width), -1, dtype=torch.int32)
    slots = torch.empty(B, Q, dtype=torch.long)
    positions = torch.empty(B, Q, dtype=torch.long)
    used = 0
    for b in range(B):
        n = -(-int(ctx[b]) // BS)
        tables[b, :n] = perm[used:used + n].to(torch.int32)
        used += n
        for i in range(Q):
            p = int(ctx[b]) - Q + i
            positions[b, i] = p
            slots[b, i] = int(tables[b, p // BS]) * BS + p % BS
    ids = torch.randint(0, V, (B, Q), generator=g)
    return ids, positions, slots, tables, ctx.to(torch.int32)


NUM_BLOCKS = 10 * MAX_BLOCKS + 1


# ----- a stand-in graph platform -----------------------------------------------------------
class ReplayGraph:
    """Replays the captured call: re-runs the function on the same static argument tensors
    and writes into the same output tensor, like a device graph would."""

    def __init__(self, platform) -> None:
        self.platform = platform
        self.fn = self.args = self.out = None
        self.replays = 0

    @contextlib.contextmanager
    def capture(self):
        self.platform.capturing = self
        try:
            yield
        finally:
            self.platform.capturing = None

    def replay(self) -> None:
        self.replays += 1
        with torch.inference_mode():
            self.out.copy_(self.fn(*self.args))


class FakeGraphPlatform(CpuPlatform):
    name = "fake-graph"

    def __init__(self) -> None:
        super().__init__()
        self.capturing: ReplayGraph | None = None
        self.graphs: list[ReplayGraph] = []

    @property
    def supports_graphs(self) -> bool:
        return True

    def make_graph(self):
        g = ReplayGraph(self)
        self.graphs.append(g)
        return g


def capturable(fn, platform: FakeGraphPlatform):
    """Wrap fn so a call during capture is recorded on the graph being captured."""

    def wrapped(*args):
        out = fn(*args)
        if platform.capturing is not None:
            platform.capturing.fn, platform.capturing.args, platform.capturing.out = fn, args, out
        return out

    return wrapped


# ----- buckets --------------------------------------------------------------------------
def test_default_buckets():
    assert default_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert default_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert default_buckets(1) == [1]
    assert default_buckets(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100]
    big = default_buckets(2000)
    assert big[-1] == 2000 and 512 in big and 1024 in big and len(big) < 20
    with pytest.raises(ValueError):
        default_buckets(0)


def test_bucket_choice_and_limits():
    r = DecodeGraphRunner(lambda *a: None, platform=get_platform("cpu"), max_num_seqs=10,
                          max_blocks_per_seq=MAX_BLOCKS, out_dim=V)
    assert r.mode == "eager-bucket"
    assert r.buckets == [1, 2, 4, 8, 10]
    assert [r.bucket_for(b) for b in (1, 2, 3, 4, 5, 8, 9, 10)] == [1, 2, 4, 4, 8, 8, 10, 10]
    with pytest.raises(ValueError, match="exceeds the largest decode bucket 10"):
        r.bucket_for(11)
    with pytest.raises(ValueError):
        r.bucket_for(0)
    custom = DecodeGraphRunner(lambda *a: None, max_num_seqs=99, max_blocks_per_seq=2, out_dim=V,
                               buckets=[8, 3, 3])
    assert custom.buckets == [3, 8] and custom.bucket_for(4) == 8


# ----- padding contract ------------------------------------------------------------------
@pytest.mark.parametrize("Q", [1, 3])
def test_padding_values(Q):
    seen = {}

    def record(ids, pos, slots, tables, ctx):
        seen.update(ids=ids.clone(), pos=pos.clone(), slots=slots.clone(), tables=tables.clone(), ctx=ctx.clone())
        return torch.zeros(ids.shape[0], Q, V)

    r = DecodeGraphRunner(record, max_num_seqs=8, max_blocks_per_seq=MAX_BLOCKS, out_dim=V, q_values=(1, 3))
    full = make_batch(1, 4, Q, NUM_BLOCKS)
    r.run(*full)  # dirty rows 0..3 of the static buffers
    ids, pos, slots, tables, ctx = make_batch(2, 3, Q, NUM_BLOCKS)
    out = r.run(ids, pos, slots, tables, ctx)
    assert out.shape == (3, Q, V)
    assert seen["ids"].shape[0] == 4  # bucket 4
    m = tables.shape[1]
    assert torch.equal(seen["ids"][:3], ids) and torch.equal(seen["pos"][:3], pos)
    assert torch.equal(seen["slots"][:3], slots) and torch.equal(seen["ctx"][:3], ctx)
    assert torch.equal(seen["tables"][:3, :m], tables)
    assert (seen["tables"][:3, m:] == -1).all()  # columns beyond the caller's table
    # Row 3 is padding even though the previous call left real data there.
    assert (seen["ids"][3] == 0).all() and (seen["pos"][3] == 0).all()
    assert (seen["slots"][3] == -1).all() and (seen["tables"][3] == -1).all()
    assert int(seen["ctx"][3]) == Q


def test_input_validation():
    r = DecodeGraphRunner(lambda *a: torch.zeros(a[0].shape[0], 1, V), max_num_seqs=4,
                          max_blocks_per_seq=MAX_BLOCKS, out_dim=V)
    ids, pos, slots, tables, ctx = make_batch(0, 5, 1, NUM_BLOCKS)
    with pytest.raises(ValueError, match="exceeds the largest decode bucket 4"):
        r.run(ids, pos, slots, tables, ctx)
    ids, pos, slots, tables, ctx = make_batch(0, 2, 2, NUM_BLOCKS)
    with pytest.raises(ValueError, match="query length 2"):
        r.run(ids, pos, slots, tables, ctx)
    ids, pos, slots, tables, ctx = make_batch(0, 2, 1, NUM_BLOCKS)
    wide = torch.full((2, MAX_BLOCKS + 1), -1, dtype=torch.int32)
    with pytest.raises(ValueError, match="max_blocks_per_seq"):
        r.run(ids, pos, slots, wide, ctx)
    with pytest.raises(ValueError):
        DecodeGraphRunner(lambda *a: None, max_num_seqs=4, max_blocks_per_seq=2, out_dim=V, q_values=(0,))


def test_enforce_eager_calls_directly():
    model = ToyModel(get_platform("cpu"), NUM_BLOCKS)
    r = DecodeGraphRunner(model.forward_paged, platform=get_platform("cpu"), max_num_seqs=8,
                          max_blocks_per_seq=MAX_BLOCKS, out_dim=V, enforce_eager=True)
    assert r.mode == "eager"
    r.capture()  # no-op
    out = r.run(*make_batch(3, 3, 1, NUM_BLOCKS))
    assert out.shape == (3, 1, V) and model.calls == [3]


# ----- padding does not change results ---------------------------------------------------
def _check_equal_to_direct(runner_model: ToyModel, runner: DecodeGraphRunner, q_values, max_seqs):
    # Large and small batches interleaved, so padded rows always hold stale real data first.
    order = [b for pair in zip(range(max_seqs, 0, -1), range(1, max_seqs + 1)) for b in pair][:max_seqs]
    assert sorted(order) == list(range(1, max_seqs + 1))
    for Q in q_values:
        for B in order:
            batch = make_batch(100 * Q + B, B, Q, NUM_BLOCKS)
            direct_model = runner_model.clone()
            before = direct_model.clone()
            with torch.inference_mode():
                want = direct_model.forward_paged(*batch)
                got = runner.run(*batch)
            assert got.shape == (B, Q, V)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            slots = batch[2].reshape(-1)
            for name in ("k_cache", "v_cache"):
                _check_cache_contract(getattr(before, name), getattr(runner_model, name),
                                      getattr(direct_model, name), slots)


def _check_cache_contract(before, padded, direct, slots):
    """What a padded run may do to the KV cache: write the batch's own slots with the values a
    direct call writes (close, not bitwise: a padded batch is a differently shaped matmul, which
    rounds differently on some CPUs), let the sink block (the last) absorb the padding rows, and
    leave every other slot untouched, bit for bit."""
    num_slots = before.shape[0] * before.shape[1]
    flat = lambda t: t.reshape(num_slots, *t.shape[2:])  # noqa: E731  [blocks*BS, HKV, D]
    written = torch.zeros(num_slots, dtype=torch.bool)
    written[slots] = True
    sink = torch.zeros(num_slots, dtype=torch.bool)
    sink[(before.shape[0] - 1) * before.shape[1]:] = True
    assert not (written & sink).any()
    torch.testing.assert_close(flat(padded)[written], flat(direct)[written], atol=1e-5, rtol=1e-5)
    untouched = ~written & ~sink
    assert torch.equal(flat(padded)[untouched], flat(before)[untouched])
    assert torch.equal(flat(direct)[untouched], flat(before)[untouched])


def test_eager_bucket_results_equal_direct_calls():
    platform = get_platform("cpu")
    model = ToyModel(platform, NUM_BLOCKS)
    r = DecodeGraphRunner(model.forward_paged, platform=platform, max_num_seqs=10,
                          max_blocks_per_seq=MAX_BLOCKS, out_dim=V, q_values=(1, 3))
    r.capture()  # no-op in eager-bucket mode
    _check_equal_to_direct(model, r, (1, 3), 10)
    assert set(model.calls) <= set(r.buckets)  # every call ran at a bucket size


def test_graph_mode_capture_and_replay_equal_direct_calls():
    platform = FakeGraphPlatform()
    model = ToyModel(platform, NUM_BLOCKS)
    r = DecodeGraphRunner(capturable(model.forward_paged, platform), platform=platform, max_num_seqs=10,
                          max_blocks_per_seq=MAX_BLOCKS, out_dim=V, dtype=torch.float32,
                          q_values=(1, 3), warmup_iters=2)
    assert r.mode == "graph"
    ids, pos, slots, tables, ctx = make_batch(0, 2, 1, NUM_BLOCKS)
    with pytest.raises(RuntimeError, match="before capture"):
        r.run(ids, pos, slots, tables, ctx)
    cache_before = model.k_cache.clone()
    r.capture()
    # Warm-up and capture ran on all-padding rows: only the sink block may have changed.
    assert torch.equal(model.k_cache[:-1], cache_before[:-1])
    assert len(platform.graphs) == 2 * len(r.buckets)
    # Captured largest bucket first, warm-up (2 calls) before each capture (1 call).
    assert model.calls[:3] == [10, 10, 10]
    model.calls.clear()
    _check_equal_to_direct(model, r, (1, 3), 10)
    assert sum(g.replays for g in platform.graphs) == 2 * 10


def test_graph_mode_checks_output_shape():
    platform = FakeGraphPlatform()
    bad = capturable(lambda ids, *rest: torch.zeros(ids.shape[0], 1, V + 1), platform)
    r = DecodeGraphRunner(bad, platform=platform, max_num_seqs=2, max_blocks_per_seq=2, out_dim=V)
    with pytest.raises(ValueError, match="expected"):
        r.capture()


# ----- with the real decoder -------------------------------------------------------------
def test_bucketed_runner_with_sizewise_decoder(llama_dir):
    """The engine's own Llama decoder: padded bucket calls return the direct-call logits."""
    from sizewise.models import ModelConfig, load_model

    platform = get_platform("cpu")
    cfg = ModelConfig.from_pretrained(llama_dir)
    model = load_model(llama_dir, cfg, platform, torch.float32, 256)
    num_blocks, max_blocks = 40, 8
    g = torch.Generator().manual_seed(0)
    for layer in model.layers:  # a cache with finite "history" in every block
        layer.self_attn.k_cache = torch.randn(num_blocks, BS, cfg.num_kv_heads, cfg.head_dim, generator=g)
        layer.self_attn.v_cache = torch.randn(num_blocks, BS, cfg.num_kv_heads, cfg.head_dim, generator=g)
    r = DecodeGraphRunner(model.forward_paged, platform=platform, max_num_seqs=6, max_blocks_per_seq=max_blocks,
                          out_dim=cfg.vocab_size, q_values=(1, 2))
    for Q in (1, 2):
        for B in (6, 1, 5, 3):
            ids, pos, slots, tables, ctx = make_batch(7 * B + Q, B, Q, num_blocks)
            ids = ids % cfg.vocab_size
            with torch.inference_mode():
                want = model.forward_paged(ids, pos, slots, tables, ctx)
                got = r.run(ids, pos, slots, tables, ctx)
            assert got.shape == (B, Q, cfg.vocab_size)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_captured_decoder_body_holds_hidden_states_not_logits(llama_dir):
    """The engine captures the body: each graph keeps a [bucket, Q, hidden] output alive (what the
    memory planner counts, `graph_held_bytes`), never [bucket, Q, vocab] float32 logits; logits
    computed from the replayed body's real rows equal a direct forward_paged."""
    from sizewise.models import ModelConfig, load_model

    platform = FakeGraphPlatform()
    cfg = ModelConfig.from_pretrained(llama_dir)
    model = load_model(llama_dir, cfg, platform, torch.float32, 256)
    num_blocks, max_blocks = 40, 8
    g = torch.Generator().manual_seed(1)
    for layer in model.layers:
        layer.self_attn.k_cache = torch.randn(num_blocks, BS, cfg.num_kv_heads, cfg.head_dim, generator=g)
        layer.self_attn.v_cache = torch.randn(num_blocks, BS, cfg.num_kv_heads, cfg.head_dim, generator=g)
    r = DecodeGraphRunner(capturable(model.forward_paged_hidden, platform), platform=platform, max_num_seqs=6,
                          max_blocks_per_seq=max_blocks, out_dim=cfg.hidden_size, q_values=(1, 2))
    r.capture()
    assert r.held_bytes == graph_held_bytes(r.buckets, (1, 2), cfg.hidden_size, 4)
    assert r.held_bytes == sum(r.buckets) * 3 * cfg.hidden_size * 4 < sum(r.buckets) * 3 * cfg.vocab_size * 4
    for Q, B in ((1, 5), (2, 3)):
        ids, pos, slots, tables, ctx = make_batch(11 * B + Q, B, Q, num_blocks)
        ids = ids % cfg.vocab_size
        with torch.inference_mode():
            want = model.forward_paged(ids, pos, slots, tables, ctx)
            got = model.compute_logits(r.run(ids, pos, slots, tables, ctx))
        assert got.shape == (B, Q, cfg.vocab_size)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
