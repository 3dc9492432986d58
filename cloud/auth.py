"""Who is calling: mutual-TLS certificates or bearer tokens, checked before any RPC of the cloud runs.

The identity of a call is
  - the token's name, when the cloud has a token file (`sqs-cloud --token-file F`): every call must
    carry `authorization: Bearer TOKEN` metadata whose SHA-256 is listed in F;
  - else the subject CN of the edge's certificate, under mutual TLS (`--tls-client-ca`; the TLS
    handshake has already refused a client without a certificate of that CA, or with an expired one);
  - else ANONYMOUS (no authentication configured: loopback, or `--insecure` said explicitly).

The token file holds one `NAME SHA256HEX` line per token (`#` starts a comment); several lines may
share a name (rotation). `sqs-cloud token NAME --token-file F` appends a new one and prints the
token once. The file is read again on SIGHUP (TokenTable.reload): a line removed revokes its token
for every later call. A presented token is hashed and compared with every listed hash by
hmac.compare_digest, all of them, whatever matched: the time does not depend on which.

A refused call gets UNAUTHENTICATED with the same detail whatever failed (no token, a token not
listed, a revoked one, a certificate without a CN), and `on_failure(reason)` counts it (the
server's sqs_auth_failures_total{reason}); the log line says the reason and the peer.

The check is a grpc.aio server interceptor (AuthInterceptor): it wraps every method's handler so the
check runs with the call's context (auth_context() holds the peer certificate) before the method,
and leaves the identity in IDENTITY, a context variable of the call's task, which the servicer
reads (`identity()`). The health service stays open: load balancers and `sqs-cloud check` probe it.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import inspect
import logging
import re
import secrets
from pathlib import Path
from typing import Callable

import grpc

from cloud.sessions import ANONYMOUS

log = logging.getLogger("sqs.cloud")

IDENTITY: contextvars.ContextVar[str] = contextvars.ContextVar("sqs_identity", default=ANONYMOUS)
OPEN_SERVICES = ("/grpc.health.v1.Health/",)  # no credentials needed
REFUSED = "authentication required"  # the one detail every refused call gets
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_HASH = re.compile(r"[0-9a-f]{64}")
_BEARER = "bearer "


def identity() -> str:
    """The identity of the RPC this task serves (ANONYMOUS without authentication)."""
    return IDENTITY.get()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)  # 256 random bits


def parse_tokens(text: str, source: str = "token file") -> list[tuple[str, str]]:
    """(name, sha256 hex) per line of a token file; ValueError naming the first bad line."""
    out: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not _NAME.fullmatch(parts[0]) or not _HASH.fullmatch(parts[1].lower()):
            raise ValueError(f"{source} line {n}: expected 'NAME SHA256HEX' (NAME of letters, digits, ._@-)")
        name, digest = parts[0], parts[1].lower()
        if seen.setdefault(digest, name) != name:
            raise ValueError(f"{source} line {n}: that token hash is listed for {seen[digest]!r} too")
        out.append((name, digest))
    return out


class TokenTable:
    """The token hashes of a file, read at start and again on reload() (SIGHUP)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: tuple[tuple[str, bytes], ...] = ()
        self.reload(strict=True)

    def reload(self, strict: bool = False) -> bool:
        """Read the file again. A file that cannot be read or parsed keeps the table as it was
        (logged), unless strict (at start: the error goes to the caller). True when replaced."""
        try:
            entries = parse_tokens(self.path.read_text(), str(self.path))
        except (OSError, ValueError) as exc:
            if strict:
                raise
            log.error("token file not reloaded, the previous tokens stay in force: %s", exc)
            return False
        self._entries = tuple((name, bytes.fromhex(digest)) for name, digest in entries)  # one assignment: atomic
        log.info("token file %s: %d tokens of %d names", self.path, len(entries), len({n for n, _ in entries}))
        return True

    def lookup(self, token: str) -> str | None:
        """The name a token belongs to, or None; compares with every hash (constant time per entry)."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for name, listed in self._entries:
            if hmac.compare_digest(digest, listed) and found is None:
                found = name
        return found


class Authenticator:
    """Decides a call's identity (see the module docstring). `tokens` None: no token check;
    `mtls`: the server requires client certificates, whose CN is the identity."""

    def __init__(self, tokens: TokenTable | None = None, mtls: bool = False,
                 on_failure: Callable[[str], None] = lambda reason: None) -> None:
        self.tokens = tokens
        self.mtls = mtls
        self.on_failure = on_failure

    @property
    def enabled(self) -> bool:
        return self.tokens is not None or self.mtls

    def identify(self, metadata, auth_context: dict) -> tuple[str | None, str]:
        """(identity, "") or (None, the reason for the log and the metric)."""
        if self.tokens is not None:
            values = [v for k, v in metadata or () if k == "authorization"]
            if len(values) != 1 or not isinstance(values[0], str) or not values[0].lower().startswith(_BEARER):
                return None, "missing" if not values else "malformed"
            name = self.tokens.lookup(values[0][len(_BEARER):].strip())
            return (name, "") if name is not None else (None, "invalid")
        if self.mtls:
            cns = auth_context.get("x509_common_name") or []
            cn = cns[0].decode(errors="replace") if len(cns) == 1 else ""
            return (cn, "") if _NAME.fullmatch(cn) else (None, "certificate")
        return ANONYMOUS, ""

    async def enter(self, context: grpc.aio.ServicerContext, method: str) -> None:
        """Set IDENTITY for this call, or abort it UNAUTHENTICATED."""
        who, reason = self.identify(context.invocation_metadata(), context.auth_context())
        if who is None:
            self.on_failure(reason)
            log.info("authentication failed reason=%s peer=%s method=%s", reason, context.peer(), method)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED)
        IDENTITY.set(who)  # the call's own task: it does not leak into other calls


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Runs Authenticator.enter before every method outside OPEN_SERVICES."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        return _checked(handler, self.auth, details.method)


def _checked(h: grpc.RpcMethodHandler, auth: Authenticator, method: str) -> grpc.RpcMethodHandler:
    """The same handler, its behaviour preceded by auth.enter."""
    kind = ("stream" if h.request_streaming else "unary") + "_" + ("stream" if h.response_streaming else "unary")
    fn = getattr(h, kind)
    if inspect.isasyncgenfunction(fn):
        async def behaviour(request, context):
            await auth.enter(context, method)
            async for reply in fn(request, context):
                yield reply
    else:
        async def behaviour(request, context):  # type: ignore[misc]
            await auth.enter(context, method)
            return await fn(request, context)
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(behaviour, request_deserializer=h.request_deserializer, response_serializer=h.response_serializer)


def main_token(argv: list[str]) -> int:
    """sqs-cloud token NAME --token-file F: add a token for NAME to F (created 0600), print it once."""
    import argparse
    import os
    import sys

    ap = argparse.ArgumentParser(prog="sqs-cloud token", description=main_token.__doc__)
    ap.add_argument("name", metavar="NAME", help="the edge's identity (letters, digits, ._@-; 64 at most)")
    ap.add_argument("--token-file", required=True, type=Path, metavar="F")
    a = ap.parse_args(argv)
    if not _NAME.fullmatch(a.name):
        ap.error("NAME: letters, digits and ._@- (64 at most), starting with a letter or digit")
    token = new_token()
    fd = os.open(a.token_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{a.name} {hash_token(token)}\n")
    print(token)
    print(f"added for {a.name} to {a.token_file}; a running sqs-cloud reads it on SIGHUP", file=sys.stderr)
    return 0
