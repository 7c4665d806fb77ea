"""Offline API mirroring vLLM: `LLM(model_dir).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence as Seq

from .engine.config import EngineConfig
from .engine.core import EngineCore
from .engine.outputs import RequestOutput
from .sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | Path, **engine_kwargs) -> None:
        tokenizer = engine_kwargs.pop("tokenizer", None)
        self.engine = EngineCore(model, EngineConfig(**engine_kwargs), tokenizer=tokenizer)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return list(prompt)

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
        strategy: str | Seq[str] = "plain",
    ) -> list[RequestOutput]:
        """Generate for every prompt; one finished `RequestOutput` per prompt, in order.

        `strategy`: decode strategy per prompt (or one for all): plain | pld | draft | auto."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None:
            params = SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        slist = [strategy] * len(prompts) if isinstance(strategy, str) else list(strategy)
        if len(slist) != len(prompts):
            raise ValueError(f"got {len(slist)} strategies for {len(prompts)} prompts")
        encoded = [self.encode(p) for p in prompts]
        for ids, p, st in zip(encoded, plist, slist):  # validate all before queueing any
            self.engine.validate(ids, p, st)
        order: list[str] = []
        results: dict[str, RequestOutput] = {}
        for prompt, ids, p, st in zip(prompts, encoded, plist, slist):
            rid = f"llm-{next(self._ids)}"
            self.engine.add_request(rid, ids, p, prompt=prompt if isinstance(prompt, str) else None, strategy=st)
            results[rid] = RequestOutput(rid, prompt if isinstance(prompt, str) else None, ids, [])
            order.append(rid)
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(order), desc="generate")
        try:
            while self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    results[delta.request_id].merge(delta)
                    if delta.finished and bar is not None:
                        bar.update(1)
        except BaseException:
            for rid in order:
                self.engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in order]
