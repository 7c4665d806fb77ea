"""Messages between the API process(es) and the engine-core process (docs/engine-core.md).

msgpack through msgspec over ZMQ `ipc://` sockets in a private temporary directory. The hot one
is `Steps`: one per engine step and API process, carrying a row per request that produced
output (its handle, the new token ids and text, finish reason; logprobs only where asked), not a
pickled object per token. Everything else (a submission, its admission, an abort, a stats
snapshot, asked for by a scrape) is per request or rare.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Union

import msgspec
import zmq

from ..outputs import CompletionOutput
from ..sampling_params import SamplingParams
from .types import Decision, DeploymentStats, ModelInfo, RoutingHints

log = logging.getLogger(__name__)


# ----- API -> core ---------------------------------------------------------------------------------
class Submit(msgspec.Struct, tag=True, array_like=True):
    """One HTTP request's prompts; `handles` (one per prompt, chosen by the API process) are what
    the rows of `Steps` name them by."""

    api: int
    submit_id: int
    request_id: str
    prompt_ids: list[list[int]]
    prompt_texts: list[Union[str, None]]
    handles: list[int]
    params: SamplingParams
    requested: str
    hints: RoutingHints


class Abort(msgspec.Struct, tag=True, array_like=True):
    request_ids: list[str]


class Stop(msgspec.Struct, tag=True, array_like=True):
    """Sample `index` of a request met a stop string (found where it is detokenized, the API)."""

    request_id: str
    index: int
    stop_reason: str


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


class StatsRequest(msgspec.Struct, tag=True, array_like=True):
    """A scrape of API process `api`: the core answers with a `Stats` naming `request`."""

    api: int
    request: int


# ----- core -> API ---------------------------------------------------------------------------------
class Ready(msgspec.Struct, tag=True, array_like=True):
    models: list[ModelInfo]
    tier_to_model: dict[str, str]


class Dead(msgspec.Struct, tag=True, array_like=True):
    error: str


class Admitted(msgspec.Struct, tag=True, array_like=True):
    submit_id: int
    decisions: list[Decision]


class Refused(msgspec.Struct, tag=True, array_like=True):
    """`kind`: invalid (400), unknown_model (404), queue_full (429), dead (503), internal (500)."""

    submit_id: int
    kind: str
    message: str
    param: Union[str, None] = None
    known: list[str] = []  # unknown_model: the names a request may use


class Row(msgspec.Struct, array_like=True):
    handle: int
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: Union[list[Union[dict[int, float], None]], None] = None
    metrics: Union[dict[str, Any], None] = None


class Steps(msgspec.Struct, tag=True, array_like=True):
    """What one engine step produced for one API process's requests."""

    rows: list[Row]
    started: list[int] = []  # handles of requests first scheduled (prefill began) without a row yet


class Failed(msgspec.Struct, tag=True, array_like=True):
    """Requests the core failed outside a step's outputs (`dead`: the engine stopped; else internal)."""

    handles: list[int]
    kind: str
    message: str


class Moved(msgspec.Struct, tag=True, array_like=True):
    """The capacity plan moved a waiting request: its decision now."""

    handle: int
    decision: Decision


class Stats(msgspec.Struct, tag=True, array_like=True):
    stats: DeploymentStats
    request: int = -1  # the StatsRequest it answers; -1: pushed (several API processes)


ToCore = Union[Submit, Abort, Stop, Shutdown, StatsRequest]
ToApi = Union[Ready, Dead, Admitted, Refused, Steps, Failed, Moved, Stats]


def _enc_hook(obj: Any) -> Any:
    """numpy scalars (a probe's scores) as Python numbers; tuples and sets as lists."""
    item = getattr(obj, "item", None)
    if item is not None:
        return item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder(enc_hook=_enc_hook)


def decoder(kind) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(kind)


def drain(sock: zmq.Socket, dec: msgspec.msgpack.Decoder, handle: Callable[[Any], None]) -> None:
    """Read every message waiting on `sock` (its FD is edge-triggered: stop only at EAGAIN)."""
    while True:
        try:
            frame = sock.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        try:
            handle(dec.decode(frame.buffer))
        except msgspec.DecodeError:
            log.exception("undecodable message dropped")
        except Exception:  # noqa: BLE001 - one bad message must not leave the rest unread (edge-triggered)
            log.exception("handling a message failed")
