"""Server-Sent Events responses that always release their engine requests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .errors import to_api_error
from .formatting import SSE_DONE, sse


class EventStream(StreamingResponse):
    """`text/event-stream` over an async generator of `data: ...` events.

    On a client disconnect Starlette cancels the streaming task, which raises CancelledError
    inside the generator (its `finally` aborts the run). `on_close` also runs when the response
    ends for any reason, including the case the generator never started (a client gone before
    the first event), where the generator's own `finally` would not run.
    """

    def __init__(self, content: AsyncIterator[str], headers: dict[str, str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def guarded(events: AsyncIterator[str], serving, run, rid: str) -> AsyncIterator[str]:
    """The tail every SSE stream shares: an error after the headers can only be an error event;
    the run is always released; the stream always ends with [DONE]."""
    try:
        async for event in events:
            yield event
    except Exception as e:  # noqa: BLE001 - after the headers, an error can only be an event
        err = to_api_error(e, rid)
        serving.record_error(err.status)
        yield sse(err.body())
    finally:
        run.close()
    yield SSE_DONE
