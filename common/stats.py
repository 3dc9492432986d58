"""Plain counters of a generation (no Prometheus here; common/metrics.py exports them).

Vocabulary (as in vLLM): per round the edge sends L drafts; the cloud *accepts* T of them, then
either *resamples* one token at the first rejection (T < L) or samples a *bonus* token (T == L).
  acceptance_rate = accepted / drafted          (fraction of drafted tokens accepted)
  resampling_rate = resampled / rounds          (the paper's N_rej per batch)
  mean_accepted_per_round = accepted / rounds
  position_acceptance_rate = accepted / tested  (tested: positions the cloud decided on, the
                                                accepted ones and the first rejected one; does not
                                                shift with the batch length as accepted/drafted does)
  per_position_acceptance[j] = accepted at draft position j+1 / tested at j+1 (vLLM's curve)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

PARTS = ("draft", "uplink", "verify", "downlink", "total")


def ends_in_resample(drafted: int, accepted: int) -> bool:
    """The round's new token: resampled at the first rejection (T < L), else the bonus token
    (T == L, plain rounds included). The one place this is decided (stats and metrics read it)."""
    return accepted < drafted


@dataclass
class RoundRecord:
    drafted: int
    accepted: int
    formula_bits: float
    honest_bits: float
    payload_bytes: int  # packed + raw bytes of the draft description
    message_bytes: int  # serialized protobuf DraftBatch
    uplink_wire_bytes: int  # bytes written to the connection for this round (HTTP/2 + gRPC framing)
    downlink_wire_bytes: int
    draft_ms: float
    uplink_ms: float
    verify_ms: float
    downlink_ms: float
    total_ms: float
    beta: float | None = None  # conformal threshold after the round
    plain: int = 0  # cloud-only tokens after the round's token (plain target steps)
    # The round's plan and what it predicted (edge/drafter.py, common/planner.py)
    k: int = 0  # support size of the drafts' description (0: no drafts)
    ell: int = 0  # lattice resolution of the drafts' description
    forward_ms: float = 0.0  # the cloud's forward passes alone (verify_ms adds queueing, decoding, sampling)
    planned_max_drafts: int = 0
    predicted_ms: float = 0.0  # the plan's round time for what was sent
    predicted_tokens: float = 1.0  # the plan's expected committed tokens
    ahead_drafts: int = 0  # drafts of the next batch drafted while this one was in flight
    ahead_adopted: bool = False  # ... and sent next (all accepted, bonus = the edge's guess)
    lookahead_drafted: int = 0  # drafts sent ahead of this streamed round that its steps verified
    lookahead_accepted: int = 0  # ... and accepted (their tokens are among the plain tokens)

    @property
    def committed(self) -> int:
        """Tokens the round committed: accepted drafts, the resampled or bonus token, plain steps."""
        return self.accepted + 1 + self.plain


@dataclass
class GenerationStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    resampled: int = 0
    bonus: int = 0
    plain: int = 0  # tokens from plain target steps (cloud-only rounds), lookahead ones included
    lookahead_drafted: int = 0  # drafts sent ahead of streamed rounds that the cloud verified
    lookahead_accepted: int = 0
    generated: int = 0
    formula_bits: float = 0.0
    honest_bits: float = 0.0
    uplink_payload_bytes: int = 0
    uplink_message_bytes: int = 0
    uplink_wire_bytes: int = 0
    downlink_wire_bytes: int = 0
    setup_wire_bytes: int = 0  # connection, session open and stream setup (not per round)
    latency_ms: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PARTS})
    wall_s: float = 0.0
    reopens: int = 0
    tested: int = 0  # draft positions the cloud decided on (accepted + the first rejected)
    tested_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    records: list[RoundRecord] = field(default_factory=list)

    def add(self, r: RoundRecord) -> None:
        self.rounds += 1
        tested = r.accepted + (1 if ends_in_resample(r.drafted, r.accepted) else 0)
        self.tested += tested
        grow = tested - len(self.tested_by_position)
        if grow > 0:
            self.tested_by_position += [0] * grow
            self.accepted_by_position += [0] * grow
        for j in range(tested):
            self.tested_by_position[j] += 1
            self.accepted_by_position[j] += j < r.accepted
        self.drafted += r.drafted
        self.accepted += r.accepted
        self.plain += r.plain
        self.lookahead_drafted += r.lookahead_drafted
        self.lookahead_accepted += r.lookahead_accepted
        if ends_in_resample(r.drafted, r.accepted):
            self.resampled += 1
        else:
            self.bonus += 1
        self.formula_bits += r.formula_bits
        self.honest_bits += r.honest_bits
        self.uplink_payload_bytes += r.payload_bytes
        self.uplink_message_bytes += r.message_bytes
        self.uplink_wire_bytes += r.uplink_wire_bytes
        self.downlink_wire_bytes += r.downlink_wire_bytes
        for part in PARTS:
            self.latency_ms[part] += getattr(r, f"{part}_ms")
        self.records.append(r)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def resampling_rate(self) -> float:
        return self.resampled / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict:
        """Flat dict for --json and the HTTP API (records left out)."""
        d = asdict(self)
        for key in ("records", "tested_by_position", "accepted_by_position"):
            d.pop(key)
        d.pop("latency_ms")
        for part in PARTS:
            d[f"{part}_ms"] = round(self.latency_ms[part], 3)
        per_tok = max(self.accepted + self.rounds + self.plain, 1)
        d.update(
            acceptance_rate=self.acceptance_rate,
            acceptance_rate_definition="accepted drafts / drafted tokens",
            resampling_rate=self.resampling_rate,
            resampling_rate_definition="rounds ending in a resampled token / rounds",
            mean_accepted_per_round=self.accepted / self.rounds if self.rounds else 0.0,
            position_acceptance_rate=self.accepted / self.tested if self.tested else 0.0,
            position_acceptance_rate_definition="accepted drafts / draft positions the cloud decided on",
            per_position_acceptance=[a / t for a, t in zip(self.accepted_by_position, self.tested_by_position)],
            tokens_per_s=self.tokens_per_s,
            formula_bits_per_draft=self.formula_bits / self.drafted if self.drafted else 0.0,
            formula_bits_per_accepted_token=self.formula_bits / per_tok,
            wire_bytes_per_accepted_token=self.uplink_wire_bytes / per_tok,
            per_accepted_token_definition="per token committed by rounds (accepted + one new per round + plain steps)",
            controller=self.controller_summary(),
        )
        return d

    def controller_summary(self) -> dict:
        """The plans' totals: chosen lengths and how well the cost model predicted each round."""
        recs = [r for r in self.records if r.predicted_ms > 0]
        errs = [abs(r.total_ms - r.predicted_ms) / r.total_ms for r in recs if r.total_ms > 0]
        return {
            "rounds_speculative": sum(1 for r in self.records if r.drafted),
            "rounds_plain": sum(1 for r in self.records if not r.drafted),
            "mean_draft_len": self.drafted / self.rounds if self.rounds else 0.0,
            "mean_abs_round_time_error": sum(errs) / len(errs) if errs else None,
            "predicted_tokens": sum(r.predicted_tokens for r in recs),
            "committed_tokens": sum(r.committed for r in recs),
            "rounds_drafted_ahead": sum(1 for r in self.records if r.ahead_drafts),
            "ahead_batches_adopted": sum(1 for r in self.records if r.ahead_adopted),
        }

    def plans(self) -> list[dict]:
        """The plan of every round: L, K, ell, plain steps, predicted vs measured time."""
        return [
            {"drafted": r.drafted, "accepted": r.accepted, "plain": r.plain, "k": r.k, "ell": r.ell,
             "predicted_ms": round(r.predicted_ms, 3), "measured_ms": round(r.total_ms, 3),
             "predicted_tokens": round(r.predicted_tokens, 3), "committed": r.committed}
            for r in self.records
        ]
