"""sizewise: adaptive multi-size LLM serving."""

from __future__ import annotations

import importlib

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "InvalidRequestError"]
__version__ = "0.1.0"

# Imported on first use, so `import sizewise` (the CLI's --help, `sizewise chat --url`) does not load torch.
_LAZY = {"LLM": ".llm", "SamplingParams": ".sampling_params", "RequestOutput": ".outputs",
         "CompletionOutput": ".outputs", "InvalidRequestError": ".errors"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
