"""Offline API mirroring vLLM's: `LLM(model_dir).generate(prompts, sampling_params)` and
`LLM.chat(messages, sampling_params)`."""

from __future__ import annotations

import dataclasses
import itertools
import numbers
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable
from typing import Sequence as Seq

from .engine.config import EngineConfig
from .engine.core import EngineCore, load_tokenizer
from .errors import InvalidRequestError, QueueFullError
from .chat import render_chat
from .outputs import RequestOutput
from .sampling_params import SamplingParams

# As vLLM's prompt types: text, token ids, {"prompt": text} (TextPrompt) or
# {"prompt_token_ids": ids} (TokensPrompt; an optional "prompt" text is kept as the output's prompt).
Prompt = str | list[int] | dict[str, Any]
Message = dict[str, Any]  # {"role": ..., "content": str | [{"type": "text", "text": ...}, ...], ...}

_ENGINE_OPTIONS = frozenset(f.name for f in dataclasses.fields(EngineConfig))


def _is_token_ids(p: object) -> bool:
    return isinstance(p, (list, tuple)) and bool(p) and isinstance(p[0], numbers.Integral) and not isinstance(p[0], bool)


class LLM:
    """One resident model. `engine_kwargs` are `EngineConfig` fields (device, dtype, max_model_len,
    kv_cache_bytes, max_num_seqs, seed, ...); `tokenizer` is a tokenizer object or a directory."""

    def __init__(self, model: str | Path, tokenizer: Any = None, **engine_kwargs) -> None:
        unknown = sorted(set(engine_kwargs) - _ENGINE_OPTIONS)
        if unknown:
            raise TypeError(f"LLM() got unknown option(s) {', '.join(unknown)}; the engine options are "
                            f"{', '.join(sorted(_ENGINE_OPTIONS))}")
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        self.engine = EngineCore(model, EngineConfig(**engine_kwargs), tokenizer=tokenizer)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return list(prompt)

    # ----- generate ------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = True,
        strategy: str | Seq[str] = "plain",
    ) -> list[RequestOutput]:
        """Generate for every prompt; one finished `RequestOutput` per prompt, in order.

        `prompts`: one prompt or a list; a prompt is a string, a list of token ids, `{"prompt": str}`
        or `{"prompt_token_ids": [...]}`. `sampling_params`: one for all or one per prompt (default
        `SamplingParams()`). `use_tqdm`: a progress bar on stderr (or a tqdm-like factory).
        `strategy`: decode strategy per prompt (or one for all): plain | pld | pld_adaptive | draft."""
        if isinstance(prompts, (str, dict)) or _is_token_ids(prompts):
            prompts = [prompts]
        elif not isinstance(prompts, Iterable):
            raise TypeError(f"prompts: expected a prompt or a list of prompts, got {type(prompts).__name__}")
        parsed = [self._parse_prompt(p, i) for i, p in enumerate(prompts)]
        return self._run(parsed, sampling_params, use_tqdm, strategy)

    def _parse_prompt(self, p: object, i: int) -> tuple[str | None, list[int]]:
        """-> (the prompt text, or None for token ids given alone; the token ids)."""
        if isinstance(p, str):
            return p, self.encode(p)
        if isinstance(p, dict):
            unknown = sorted(set(p) - {"prompt", "prompt_token_ids"})
            if unknown:
                raise InvalidRequestError(f"prompt {i}: unsupported key(s) {', '.join(map(repr, unknown))} "
                                          f"(supported: 'prompt', 'prompt_token_ids')", param="prompt")
            text = p.get("prompt")
            if text is not None and not isinstance(text, str):
                raise InvalidRequestError(f"prompt {i}: 'prompt' must be a string, got {type(text).__name__}",
                                          param="prompt")
            if "prompt_token_ids" in p:
                ids = p["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)):
                    raise InvalidRequestError(f"prompt {i}: 'prompt_token_ids' must be a list of token ids, "
                                              f"got {type(ids).__name__}", param="prompt")
                return text, list(ids)
            if text is None:
                raise InvalidRequestError(f"prompt {i}: a dict prompt needs 'prompt' or 'prompt_token_ids'",
                                          param="prompt")
            return text, self.encode(text)
        if isinstance(p, (list, tuple)):  # token ids; the engine checks them (an empty one: "prompt is empty")
            return None, list(p)
        raise TypeError(f"prompt {i}: expected a string, a list of token ids, {{'prompt': str}} or "
                        f"{{'prompt_token_ids': [...]}}, got {type(p).__name__} {p!r:.60}")

    # ----- chat ----------------------------------------------------------------------------
    def chat(
        self,
        messages: Seq[Message] | Seq[Seq[Message]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool | Callable[..., Any] = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        strategy: str | Seq[str] = "plain",
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of messages) or to a list of conversations,
        each rendered with the model's chat template (or `chat_template`); one `RequestOutput` per
        conversation, whose `prompt` is the rendered text. As `/v1/chat/completions` does, the
        rendered text is tokenized without adding special tokens (the template places them)."""
        if isinstance(messages, (str, dict)):
            raise TypeError(f"messages: expected a list of message dicts or a list of such lists, got "
                            f"{type(messages).__name__}")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        parsed = [self._chat_prompt(conv, i, chat_template, add_generation_prompt, continue_final_message,
                                    chat_template_kwargs) for i, conv in enumerate(conversations)]
        return self._run(parsed, sampling_params, use_tqdm, strategy)

    def _chat_prompt(
        self, conv: object, i: int, chat_template: str | None = None, add_generation_prompt: bool = True,
        continue_final_message: bool = False, chat_template_kwargs: dict[str, Any] | None = None,
    ) -> tuple[str, list[int]]:
        """One conversation -> (the rendered text, its token ids)."""
        if add_generation_prompt and continue_final_message:
            raise InvalidRequestError("add_generation_prompt and continue_final_message cannot both be set "
                                      "(pass add_generation_prompt=False to continue the last message)",
                                      param="continue_final_message")
        template = chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise InvalidRequestError(f"{self.engine.name!r} has no chat template; pass chat_template= or use "
                                      f"generate()", param="messages")
        kwargs = dict(chat_template_kwargs or {})
        if continue_final_message:
            kwargs["continue_final_message"] = True
        text = render_chat(self.tokenizer, self._chat_messages(conv, i), add_generation_prompt, kwargs,
                           chat_template=template, where=f"conversation {i}: ")
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    @staticmethod
    def _chat_messages(conv: object, i: int) -> list[Message]:
        """Copies of the messages with text-part lists joined (as the HTTP API does)."""
        if not isinstance(conv, (list, tuple)) or not conv or not all(isinstance(m, dict) for m in conv):
            raise TypeError(f"conversation {i}: expected a non-empty list of message dicts "
                            f"({{'role': ..., 'content': ...}}), got {conv!r:.80}")
        out = []
        for j, m in enumerate(conv):
            content = m.get("content")
            if isinstance(content, list):
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise InvalidRequestError(f"conversation {i}, message {j}: only text content parts "
                                              f"({{'type': 'text', 'text': ...}}) are supported", param="messages")
                content = "".join(p["text"] for p in content)
            out.append({**m, "content": content if content is not None else ""})
        return out

    # ----- the loop ------------------------------------------------------------------------
    def _run(
        self,
        prompts: list[tuple[str | None, list[int]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None,
        use_tqdm: bool | Callable[..., Any],
        strategy: str | Seq[str],
        on_delta: Callable[[RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            plist = [sampling_params] * len(prompts)
        elif not isinstance(sampling_params, (list, tuple)):
            raise TypeError(f"sampling_params: expected SamplingParams or a list of them, got "
                            f"{type(sampling_params).__name__}")
        else:
            plist = list(sampling_params)
            if len(plist) != len(prompts):
                raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        for p in plist:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params: expected SamplingParams, got {type(p).__name__}")
        slist = [strategy] * len(prompts) if isinstance(strategy, str) else list(strategy)
        if len(slist) != len(prompts):
            raise ValueError(f"got {len(slist)} strategies for {len(prompts)} prompts")
        for (_, ids), p, st in zip(prompts, plist, slist):  # validate all before queueing any
            self.engine.validate(ids, p, st)
        order = [f"llm-{next(self._ids)}" for _ in prompts]
        results = {rid: RequestOutput(rid, text, ids, []) for rid, (text, ids) in zip(order, prompts)}
        # Fed as the engine's bounded waiting queue (max_waiting) drains: a batch may be any size.
        pending = deque(zip(order, prompts, plist, slist))
        bar = None
        if use_tqdm and order:
            factory = use_tqdm if callable(use_tqdm) else None
            if factory is None:
                from tqdm import tqdm as factory
            bar = factory(total=len(order), desc="Processed prompts", dynamic_ncols=True)
        start, out_tokens = time.perf_counter(), 0
        try:
            while pending or self.engine.has_unfinished_requests():
                while pending:
                    rid, (text, ids), p, st = pending[0]
                    try:
                        self.engine.add_request(rid, ids, p, prompt=text, strategy=st, validated=True)
                    except QueueFullError:
                        if not self.engine.has_unfinished_requests():
                            raise  # n alone exceeds max_waiting
                        break
                    pending.popleft()
                for delta in self.engine.step():
                    results[delta.request_id].merge(delta)
                    if on_delta is not None:
                        on_delta(delta)
                    if delta.finished and bar is not None:
                        out_tokens += sum(len(o.token_ids) for o in results[delta.request_id].outputs)
                        rate = out_tokens / max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix_str(f"output {rate:.1f} toks/s", refresh=False)
                        bar.update(1)
        except BaseException:
            for rid in order:
                self.engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in order]
