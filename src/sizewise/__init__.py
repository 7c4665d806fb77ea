"""sizewise: adaptive multi-size LLM serving."""

from .engine.outputs import CompletionOutput, RequestOutput
from .llm import LLM
from .sampling_params import InvalidRequestError, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "InvalidRequestError"]
__version__ = "0.1.0"
