"""A decode step on a graph-capable platform reads each row's real context, not max_model_len.

The platform here is the CPU one claiming graph support, i.e. one whose paged attention inside a
captured graph is the reference gather: a captured step would gather every column of a
max_model_len-wide block table for every row (and capture itself would allocate those gathers).
Bytes read from the KV caches are measured independently of the engine, by intercepting every
`index_select` on a cache-shaped tensor at the aten level, at construction (capture) and per step.
Same prompt, two context limits: the reads, and the telemetry's KV bytes, must not change.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sizewise import SamplingParams
from sizewise.engine.config import EngineConfig
from sizewise.engine.core import EngineCore
from sizewise.platform import CpuPlatform

BS = 8


class CpuWithGraphs(CpuPlatform):
    """Claims graph support; a graph replays nothing (an engine that captured would be wrong, and
    the test would see its capture-time gathers first)."""

    name = "cpu-graphs"

    @property
    def supports_graphs(self) -> bool:
        return True

    def make_graph(self, pool=None):
        class _Graph:
            warmup = capture = staticmethod(contextlib.nullcontext)

            def replay(self) -> None:
                pass

        return _Graph()


class CacheGathers(TorchDispatchMode):
    """Sums the bytes that index_select copies out of tensors shaped like a paged KV cache."""

    def __init__(self, cache_tail: tuple[int, ...]) -> None:
        super().__init__()
        self.cache_tail = cache_tail
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.index_select.default and tuple(args[0].shape[1:]) == self.cache_tail:
            self.bytes += out.numel() * out.element_size()
        return out


def test_decode_reads_real_context_under_two_context_limits(llama_dir, caplog):
    from sizewise.models import ModelConfig

    cfg = ModelConfig.from_pretrained(llama_dir)
    tail = (BS, cfg.num_kv_heads, cfg.head_dim)
    prompt = [3 + (i * 37) % 300 for i in range(21)]
    results = {}
    for limit in (128, 512):
        gathers = CacheGathers(tail)
        with caplog.at_level(logging.WARNING, logger="sizewise.engine"), gathers:
            core = EngineCore(llama_dir, EngineConfig(
                device="cpu", dtype="float32", max_model_len=limit, block_size=BS, max_num_seqs=8,
                kv_cache_bytes=2 << 20, enforce_eager=False,
            ), platform=CpuWithGraphs())
        at_construction = gathers.bytes
        core.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        core.step()  # prefill (no cached context: no cache reads)
        per_step = []
        for _ in range(3):
            gathers.bytes = 0
            with gathers:
                core.step()
            per_step.append((gathers.bytes, core.stats().last_step_bytes - core.step_weight_bytes))
        results[limit] = (at_construction, per_step)

    elt = 4
    for limit, (at_construction, per_step) in results.items():
        assert at_construction == 0, f"limit {limit}: capture gathered {at_construction} bytes"
        for i, (read, telemetry) in enumerate(per_step):
            ctx = len(prompt) + 1 + i  # context of the decode step, the new token included
            per_layer = 2 * -(-ctx // BS) * BS * cfg.num_kv_heads * cfg.head_dim * elt  # K and V, whole blocks
            assert read == cfg.num_layers * per_layer, (limit, i, read)
            assert telemetry == ctx * cfg.kv_bytes_per_token(torch.float32), (limit, i, telemetry)
    assert results[128][1] == results[512][1]
    assert core.runner.graph_runner is None  # not captured: the step above ran eagerly
    assert "decode graphs off" in caplog.text and "max_model_len" in caplog.text
