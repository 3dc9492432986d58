"""Server-sent events for the edge's HTTP routes: the wire format of one event, and a streaming
response that runs a callback however it ends (the body exhausted, an error, a send to a client
that went away)."""

from __future__ import annotations

import json
from typing import Any, Callable

from fastapi.responses import StreamingResponse

MEDIA_TYPE = "text/event-stream"


def event(data: Any, kind: str | None = None) -> str:
    """One event: an optional `event:` line, one `data:` line (JSON unless a str), a blank line."""
    body = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {kind}\n" if kind else "") + f"data: {body}\n\n"


class EndingStream(StreamingResponse):
    """A streaming response that calls `on_end()` however the response ends (a generation's cancel,
    an admission slot given back)."""

    def __init__(self, on_end: Callable[[], None], *args, **kwargs) -> None:
        kwargs.setdefault("media_type", MEDIA_TYPE)
        super().__init__(*args, **kwargs)
        self._on_end = on_end

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_end()
