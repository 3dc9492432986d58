"""The text of a generation as an HTTP client may see it: incremental detokenization, cut at stop
tokens and stop strings (edge/openai_api.py streams and answers through it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class StopText:
    """The text of a generation as a client may see it, token by token.

    Incremental detokenization with two offsets (as TGI and vLLM do it): a token is decoded with the
    few before it, and a token that leaves a multi-byte character open shows nothing until one
    completes it. The text ends at the first stop token (not decoded) or at the first occurrence of a
    stop string (not shown), wherever it falls in the tokens; text that could still be the start of a
    stop string is held back until it cannot. `tokens` are the completion's tokens: those pushed up to
    and including the one that stopped it."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = (),
                 stop_ids: Sequence[int] = ()) -> None:
        self._decode = decode
        self._stops = tuple(s for s in stop if s)
        self._stop_ids = frozenset(stop_ids)
        self.tokens: list[int] = []
        self._ids: list[int] = []  # the decodable ones (stop tokens excluded)
        self._prefix = self._read = 0  # ids[prefix:read] decoded already, as context for the next
        self._held = ""
        self.stopped = False

    def push(self, tokens: Sequence[int]) -> str:
        """The text that can be shown now (possibly ''); once stopped, further tokens are ignored."""
        out = []
        for t in tokens:
            if self.stopped:
                break
            self.tokens.append(t)
            if t in self._stop_ids:
                out.append(self._held + self._open())
                self._held, self.stopped = "", True
                break
            self._ids.append(t)
            out.append(self._release(self._new_text()))
        return "".join(out)

    def flush(self) -> str:
        """At the end of a generation not stopped: what was held back, and any open character."""
        if self.stopped:
            return ""
        out, self._held = self._held + self._open(), ""
        self._prefix = self._read = len(self._ids)
        return out

    def _new_text(self) -> str:
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(before):]
        return ""

    def _open(self) -> str:
        """Decoded text of tokens not shown yet because they leave a character open."""
        if self._read == len(self._ids):
            return ""
        return self._decode(self._ids[self._prefix:])[len(self._decode(self._ids[self._prefix:self._read])):]

    def _release(self, new: str) -> str:
        held = self._held + new
        found = [i for i in (held.find(s) for s in self._stops) if i >= 0]
        if found:
            self._held, self.stopped = "", True
            return held[:min(found)]
        keep = max((n for s in self._stops for n in range(min(len(s) - 1, len(held)), 0, -1)
                    if held.endswith(s[:n])), default=0)
        self._held = held[len(held) - keep:]
        return held[:len(held) - keep]
