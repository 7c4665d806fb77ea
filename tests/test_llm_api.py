"""The offline API as a vLLM user reaches for it: `LLM.generate` prompt forms and parameter forms,
`LLM.chat` (single conversation and a batch) against transformers' chat template and greedy
decode, output fields, `n`/`seed`, the progress bar, two LLMs in one process, and
`sizewise generate` (flags, streaming, chat mode, one-line errors)."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
import transformers

from sizewise import LLM, CompletionOutput, InvalidRequestError, RequestOutput, SamplingParams
from sizewise.cli import main

ENGINE = dict(device="cpu", dtype="float32", kv_cache_bytes=2 << 20)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPT = "def add(a, b):"
CHAT = [{"role": "system", "content": "You write code."}, {"role": "user", "content": "add two numbers"}]


@pytest.fixture(scope="module")
def hf(llama_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def bos_tok(llama_dir):
    """The checkpoint's tokenizer, changed to add <|bos|> itself (as Llama 3's does): its chat
    template also starts every turn with <|bos|>, so a chat prompt tokenized with special tokens
    would start with two."""
    from tokenizers import processors

    tok = transformers.AutoTokenizer.from_pretrained(str(llama_dir))
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.bos_token_id)])
    assert tok.encode("x")[0] == tok.bos_token_id
    return tok


@pytest.fixture(scope="module")
def llm(llama_dir, bos_tok):
    return LLM(llama_dir, tokenizer=bos_tok, **ENGINE)


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=2)
    return out[0, len(ids):].tolist()


def chat_ids(tok, messages, **kw) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, **kw)["input_ids"])


# ----- chat ------------------------------------------------------------------------------------
def test_chat_renders_the_template_as_transformers_and_decodes_greedily(llm, bos_tok, hf):
    (out,) = llm.chat(CHAT, GREEDY, use_tqdm=False)
    want_ids = chat_ids(bos_tok, CHAT, add_generation_prompt=True)
    assert out.prompt == bos_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert out.prompt_token_ids == want_ids and want_ids[:2] != [bos_tok.bos_token_id] * 2  # one BOS
    assert out.outputs[0].token_ids == hf_greedy(hf, want_ids, 6)
    assert out.finished and out.outputs[0].finished() and out.outputs[0].finish_reason == "length"


def test_chat_batch_of_conversations_in_order(llm, bos_tok, hf):
    parts = [{"role": "user", "content": [{"type": "text", "text": "add two "}, {"type": "text", "text": "numbers"}]}]
    cont = [{"role": "user", "content": "add"}, {"role": "assistant", "content": "def add(a"}]
    convs = [CHAT, parts, [{"role": "user", "content": "print it"}]]
    outs = llm.chat(convs, GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [
        chat_ids(bos_tok, CHAT, add_generation_prompt=True),
        chat_ids(bos_tok, [{"role": "user", "content": "add two numbers"}], add_generation_prompt=True),
        chat_ids(bos_tok, convs[2], add_generation_prompt=True)]
    for o in outs:
        assert o.outputs[0].token_ids == hf_greedy(hf, o.prompt_token_ids, 6)
    # continue_final_message: the assistant's partial reply is continued, not closed
    (c,) = llm.chat(cont, GREEDY, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)
    assert c.prompt.endswith("def add(a")
    assert c.prompt_token_ids == chat_ids(bos_tok, cont, add_generation_prompt=False, continue_final_message=True)
    # per-conversation sampling params
    a, b = llm.chat([CHAT, CHAT], [SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), GREEDY], use_tqdm=False)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids[:2] and len(b.outputs[0].token_ids) == 6
    assert llm.chat([], GREEDY) == []


def test_chat_errors(llama_dir, llm, bos_tok):
    with pytest.raises(InvalidRequestError, match="continue_final_message"):
        llm.chat(CHAT, GREEDY, continue_final_message=True)
    with pytest.raises(InvalidRequestError, match="text content parts"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], GREEDY)
    with pytest.raises(TypeError, match="list of message dicts"):
        llm.chat(["hello"], GREEDY)
    with pytest.raises(TypeError, match="messages"):
        llm.chat("hello", GREEDY)
    bare = transformers.AutoTokenizer.from_pretrained(str(llama_dir))
    bare.chat_template = None
    no_template = LLM(llama_dir, tokenizer=bare, **ENGINE)
    with pytest.raises(InvalidRequestError, match="no chat template"):
        no_template.chat(CHAT, GREEDY)
    # an explicit template is used as given
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (out,) = no_template.chat(CHAT, GREEDY, chat_template=template, use_tqdm=False)
    assert out.prompt == "[system] You write code.\n[user] add two numbers\n"
    assert out.prompt_token_ids == bare.encode(out.prompt, add_special_tokens=False)


# ----- generate: prompt and parameter forms ------------------------------------------------------
def test_generate_prompt_forms(llm, bos_tok, hf):
    ids = bos_tok.encode(PROMPT)  # as vLLM: a text prompt gets the tokenizer's special tokens
    want = hf_greedy(hf, ids, 6)
    forms = [PROMPT, {"prompt": PROMPT}, {"prompt_token_ids": ids}, ids]
    for form in forms:  # each alone, as vLLM accepts a single prompt
        (out,) = llm.generate(form, sampling_params=GREEDY, use_tqdm=False)
        assert out.prompt_token_ids == ids and out.outputs[0].token_ids == want, form
        assert out.prompt == (PROMPT if isinstance(form, str) or "prompt" in form else None)
    outs = llm.generate(forms + [[ids[0], ids[1]]], GREEDY, use_tqdm=False)  # and mixed in one list
    assert [o.outputs[0].token_ids for o in outs[:4]] == [want] * 4
    assert outs[4].prompt_token_ids == ids[:2] and outs[4].outputs[0].token_ids == hf_greedy(hf, ids[:2], 6)
    assert len({o.request_id for o in outs}) == 5
    assert llm.generate([], GREEDY) == []


def test_generate_parameter_forms_and_errors(llm):
    per_prompt = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in (1, 3)]
    a, b = llm.generate([PROMPT, PROMPT], per_prompt, use_tqdm=False)
    assert len(a.outputs[0].token_ids) == 1 and len(b.outputs[0].token_ids) == 3
    assert a.outputs[0].token_ids == b.outputs[0].token_ids[:1]
    (d,) = llm.generate(PROMPT, use_tqdm=False)  # no params: vLLM's defaults (max_tokens 16)
    assert 1 <= len(d.outputs[0].token_ids) <= 16
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate(PROMPT, per_prompt)
    with pytest.raises(TypeError, match="expected SamplingParams or a list of them, got dict"):
        llm.generate(PROMPT, {"max_tokens": 2})
    with pytest.raises(TypeError, match="prompt 1: expected a string"):
        llm.generate([PROMPT, None], GREEDY)
    with pytest.raises(TypeError, match="prompts: expected"):
        llm.generate(5, GREEDY)
    with pytest.raises(InvalidRequestError, match="unsupported key.*multi_modal_data"):
        llm.generate({"prompt": PROMPT, "multi_modal_data": {}}, GREEDY)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [5, 10**6]}, GREEDY)
    assert not llm.engine.has_unfinished_requests()  # nothing queued by a rejected batch


def test_output_fields_logprobs_and_stop(llm, bos_tok, hf):
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    (out,) = llm.generate(PROMPT, sp, use_tqdm=False)
    assert isinstance(out, RequestOutput) and isinstance(out.request_id, str) and out.finished is True
    o = out.outputs[0]
    assert isinstance(o, CompletionOutput) and o.index == 0 and o.finish_reason == "length" and o.stop_reason is None
    assert all(isinstance(t, int) for t in o.token_ids) and o.text == bos_tok.decode(o.token_ids, skip_special_tokens=True)
    # logprobs against transformers' log-softmax over the same sequence
    seq = out.prompt_token_ids + o.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([seq])).logits[0].double(), -1)
    n = len(out.prompt_token_ids)
    want = [ref[n - 1 + i, t].item() for i, t in enumerate(o.token_ids)]
    assert [lp[t] for lp, t in zip(o.logprobs, o.token_ids)] == pytest.approx(want, abs=1e-4)
    assert o.cumulative_logprob == pytest.approx(sum(want), abs=1e-3)
    assert all(2 <= len(lp) <= 3 for lp in o.logprobs)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n
    assert out.prompt_logprobs[1][seq[1]] == pytest.approx(ref[0, seq[1]].item(), abs=1e-4)


def test_stop_string_and_finish_reasons():
    """On the demo model (real text): a stop string cuts the text before it and is the stop_reason."""
    from sizewise import demo

    llm = LLM(demo.demo_model_path("small"), device="cpu", dtype="float32", max_model_len=128, kv_cache_bytes=2 << 20)
    (o,) = llm.generate("import os\nimport sys\n\ndef main", SamplingParams(temperature=0, max_tokens=16,
                                                                              ignore_eos=True), use_tqdm=False)
    text = o.outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip() and "\ufffd" not in text, text
    (s,) = llm.generate(o.prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]),
                        use_tqdm=False)
    so = s.outputs[0]
    assert (so.finish_reason, so.stop_reason, so.text) == ("stop", stop, text[:text.index(stop)])
    assert so.token_ids == o.outputs[0].token_ids[:len(so.token_ids)]


def test_n_and_seed(llama_dir, llm):
    sp = SamplingParams(n=3, temperature=1.5, seed=7, max_tokens=8, ignore_eos=True)
    (a,) = llm.generate(PROMPT, sp, use_tqdm=False)
    assert [o.index for o in a.outputs] == [0, 1, 2] and all(len(o.token_ids) == 8 for o in a.outputs)
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1  # n samples, not one repeated
    (b,) = llm.generate([PROMPT], sp, use_tqdm=False)  # the seed reproduces, also in another engine
    (c,) = LLM(llama_dir, tokenizer=llm.get_tokenizer(), **ENGINE).generate(PROMPT, sp, use_tqdm=False)
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs] == [o.token_ids for o in c.outputs]


def test_batch_larger_than_the_waiting_queue(llama_dir, hf):
    """A batch bigger than the engine's bounded waiting queue (max_waiting, 1024 by default) is fed
    as the queue drains instead of failing with QueueFullError."""
    small = LLM(llama_dir, max_waiting=3, **ENGINE)
    tok = small.get_tokenizer()
    prompts = [f"{PROMPT} {i}" for i in range(8)]
    outs = small.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    for o in outs[:3]:
        assert o.prompt_token_ids == tok.encode(o.prompt) and o.outputs[0].token_ids == hf_greedy(hf, o.prompt_token_ids, 6)


def test_progress_bar(llm, capsys):
    llm.generate([PROMPT] * 3, GREEDY)  # on by default, as in vLLM
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "3/3" in err and "toks/s" in err
    llm.generate([PROMPT] * 3, GREEDY, use_tqdm=False)
    assert capsys.readouterr().err == ""
    seen = []

    class Bar:
        def __init__(self, total, **kw):
            seen.append(total)

        def update(self, n):
            seen.append(n)

        def set_postfix_str(self, s, refresh=True):
            pass

        def close(self):
            seen.append("closed")

    llm.generate([PROMPT] * 2, GREEDY, use_tqdm=Bar)  # a tqdm-like factory
    assert seen == [2, 1, 1, "closed"]


def test_sampling_params_defaults_and_validation():
    sp = SamplingParams()
    assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.seed) == (1, 1.0, 1.0, 0, 16, None)
    assert SamplingParams(top_k=-1).top_k == 0 and SamplingParams(stop="x").stop == ["x"]
    assert type(SamplingParams(max_tokens=np.int64(3), seed=np.int32(1)).max_tokens) is int  # numpy ints
    for kwargs, param in [({"n": 1.5}, "n"), ({"n": True}, "n"), ({"top_k": 2.5}, "top_k"),
                          ({"max_tokens": 2.5}, "max_tokens"), ({"seed": "1"}, "seed"),
                          ({"temperature": "0.5"}, "temperature"), ({"top_p": None}, "top_p"),
                          ({"logprobs": 1.0}, "logprobs")]:
        with pytest.raises(InvalidRequestError) as e:
            SamplingParams(**kwargs)
        assert e.value.param == param and str(e.value).startswith(param), kwargs


def test_llm_construction(llama_dir, bos_tok):
    by_path = LLM(llama_dir, tokenizer=str(llama_dir), **ENGINE)  # a tokenizer directory, as vLLM takes
    assert by_path.get_tokenizer().encode(PROMPT) == transformers.AutoTokenizer.from_pretrained(str(llama_dir)).encode(PROMPT)
    with pytest.raises(TypeError, match="gpu_memory_utilization.*kv_cache_memory_fraction"):
        LLM(llama_dir, gpu_memory_utilization=0.5)


def test_two_llms_in_one_process_and_freeing_one(checkpoints, hf):
    a = LLM(checkpoints["llama"], **ENGINE)
    b = LLM(checkpoints["qwen2"], **ENGINE)
    hf_b = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoints["qwen2"]), dtype=torch.float32).eval()
    ids = a.get_tokenizer().encode(PROMPT)
    for _ in range(2):  # interleaved: no state shared between them
        assert a.generate(ids, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == hf_greedy(hf, ids, 6)
        assert b.generate(ids, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == hf_greedy(hf_b, ids, 6)
    model = weakref.ref(a.engine.runner.model)
    del a
    gc.collect()
    assert model() is None  # dropping the LLM frees its weights and KV cache
    assert b.generate(ids, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == hf_greedy(hf_b, ids, 6)


# ----- sizewise generate ----------------------------------------------------------------------------
def test_cli_generate_flags(llama_dir, hf, capsys):
    tok = transformers.AutoTokenizer.from_pretrained(str(llama_dir))
    base = ["generate", "--model", str(llama_dir), "--device", "cpu", "--max-tokens", "5"]
    want = tok.decode(hf_greedy(hf, tok.encode(PROMPT), 5))

    assert main([*base, PROMPT, "--stream"]) == 0
    assert capsys.readouterr().out == want + "\n"  # streamed text == the whole text
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    assert main([*base, PROMPT, "--chat", "--system", "be brief"]) == 0
    chat_want = tok.decode(hf_greedy(hf, chat_ids(tok, messages, add_generation_prompt=True), 5), skip_special_tokens=True)
    assert capsys.readouterr().out == chat_want + "\n"
    assert main([*base, PROMPT, "--n", "2", "--temperature", "1.5", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "--- completion 0 (length) ---" in out and "--- completion 1 (length) ---" in out


@pytest.mark.parametrize("args,msg", [
    (["--stream", "--n", "2"], "--stream needs --n 1"),
    (["--system", "x"], "--system needs --chat"),
    (["--top-k", "-3"], "top_k"),
    (["--n", "0"], "n must be at least 1"),
    (["--max-tokens", "100000"], "exceeds this model's context length"),
])
def test_cli_generate_errors_are_one_line(llama_dir, capsys, args, msg):
    assert main(["generate", "--model", str(llama_dir), "--device", "cpu", PROMPT, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sizewise: error: ") and msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_generate_bad_model_dir(tmp_path, llama_dir, capsys):
    import shutil

    assert main(["generate", "--model", str(tmp_path / "nope"), PROMPT]) == 2
    assert "not a directory" in capsys.readouterr().err
    broken = tmp_path / "no-tokenizer"  # weights but no tokenizer: refused naming the missing files, on one line
    broken.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(llama_dir / f, broken / f)
    assert main(["generate", "--model", str(broken), "--device", "cpu", PROMPT]) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer files" in err and "tokenizer.json" in err and err.count("\n") == 1
