"""sizewise: adaptive multi-size LLM serving."""

from .outputs import CompletionOutput, RequestOutput
from .llm import LLM
from .errors import InvalidRequestError
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "InvalidRequestError"]
__version__ = "0.1.0"
