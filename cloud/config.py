"""What the cloud verifier is told at start: the target model it verifies with, and its limits.

Plain values, read by the session table (cloud/sessions.py), the rounds (cloud/verifier.py) and
the server that builds both (cloud/server.py); sqs-cloud's flags fill them (cloud/cli.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TargetInfo:
    """The loaded target model as the protocol sees it (no weights here)."""

    name: str
    vocab_size: int
    fingerprint: str  # of the tokenizer: an edge whose draft has another one is refused at open
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class VerifierConfig:
    max_sessions: int = 64
    session_ttl_s: float = 600.0
    max_drafts: int = 256  # per batch, whatever the edge asks for
    max_context: int = 32768  # accepted context length at which a session is refused more rounds
    max_plain_steps: int = 64  # plain target steps one request may ask for after its token
    # forward passes the server times at start, up to batch_max_rows (edges plan with them; cached per
    # machine); the same rows as sqs_models.pass_table.GRID (a test holds them equal; this module may
    # not import sqs_models): the multiples of 4 are where repacked llama.cpp is cheap
    calibrate_rows: tuple[int, ...] = (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64)
    prefill_chunk: int = 256  # tokens of an opened context fed per forward pass (one executor job each)
    orphan_ttl_s: float = 60.0  # a session whose streams all ended without a close is kept this long
    reap_interval_s: float = 5.0  # the server reaps expired and orphaned sessions this often
    batch_window_ms: float = 2.0  # cross-session batched verification: the most a round waits for others; 0 = off
    batch_max_rows: int = 64  # rows (L+1 per round) of one shared forward pass at most
    # A shared pass waits for the sessions the last pass served, at most this share of that pass
    # (cloud/pass_batcher.py, rejoining sessions); 0 = not at all.
    batch_rejoin: float = 1.0
