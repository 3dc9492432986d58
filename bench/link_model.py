"""The benchmarks' analytic link: each round's network time is bits / rate + RTT instead of what
the loopback measured, for sweeping link settings without shaping a real link.

It is a wrapper around the edge's cloud client (`EdgeRuntime.wrapped(link.around)`), not a part of
the round loop: it rewrites the timestamps of each reply so that the uplink took the link's time
for the round's real wire bytes, the cloud its measured time, and the downlink the link's time for
the verdict's bytes. The round records, the planner's cost model and the pipelined drafting then
all see that link, exactly as they see a real one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from common.stats import RoundRecord
from edge.generate import GenerationResult


@dataclass(frozen=True)
class LinkModel:
    """Analytic link: rates in bit/s, RTT in ms (both directions' propagation together)."""

    uplink_bps: float
    downlink_bps: float
    rtt_ms: float

    @property
    def label(self) -> str:
        return f"model:{self.uplink_bps:g}/{self.downlink_bps:g}/{self.rtt_ms:g}"

    def network_ms(self, uplink_bytes: int, downlink_bytes: int) -> tuple[float, float]:
        """(uplink ms, downlink ms) of one round."""
        up = self.rtt_ms / 2 + uplink_bytes * 8e3 / self.uplink_bps
        return up, self.rtt_ms / 2 + downlink_bytes * 8e3 / self.downlink_bps

    def round_ms(self, r: RoundRecord) -> float:
        """A recorded round's time on this link: its network time replaced, everything else (draft,
        cloud, drafting ahead past the verdict) as recorded."""
        up, down = self.network_ms(r.uplink_wire_bytes or r.message_bytes, r.downlink_wire_bytes)
        return r.total_ms - r.uplink_ms - r.downlink_ms + up + down

    def around(self, client: Any) -> "ModelledLinkClient":
        return ModelledLinkClient(client, self)

    def priced(self, result: GenerationResult) -> GenerationResult:
        """A result whose rounds ran through `around`: its wall time is the modelled link's (the sum
        of its rounds), not this loopback's, and it says which link priced it."""
        result.link = self.label
        result.stats.wall_s = result.stats.latency_ms["total"] / 1e3
        return result


class ModelledLinkClient:
    """A cloud client whose replies carry the analytic link's network time (see the module doc)."""

    def __init__(self, inner: Any, link: LinkModel) -> None:
        self._inner = inner
        self._link = link

    def round(self, batch, reopen):
        r = self._inner.round(batch, reopen=reopen)
        up_ms, down_ms = self._link.network_ms(r.uplink_wire_bytes or r.message_bytes,
                                               r.downlink_wire_bytes or r.verdict_bytes)
        v = r.verdict
        arrived = r.sent_unix_us + round(up_ms * 1e3)
        answered = arrived + (v.sent_unix_us - v.received_unix_us)  # the cloud's own time, as measured
        verdict = replace(v, received_unix_us=arrived, sent_unix_us=answered)
        return replace(r, verdict=verdict, received_unix_us=answered + round(down_ms * 1e3))

    def __getattr__(self, name: str) -> Any:  # open, wire_counts, session_id, reopens, close
        return getattr(self._inner, name)
