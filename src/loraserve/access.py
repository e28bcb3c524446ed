"""Who may call the server (``--api-key``) and how many model requests run at once (``--max-concurrent-requests``).

Both are ASGI middleware, so a refusal costs no body parsing and no engine work.
The key is a server key: when it is set, ``Authorization`` is never read as a
requester's Hub token (``api_token`` in the body still is).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from loraserve.errors import AuthenticationFailed, TooManyRequests, refuse

OPEN_PATHS = frozenset({"/health"})  # probes carry no key
AUTHORIZED = "loraserve_authorized"  # scope["state"] flag: Authorization held the server key


def load_api_keys(key: str | None, key_file: Path | None) -> list[str]:
    """The accepted keys: ``--api-key`` and every non-empty, non-comment line of ``--api-key-file``."""
    keys = [key] if key else []
    if key_file is not None:
        try:
            lines = key_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise SystemExit(f"--api-key-file {key_file}: cannot read it ({exc})") from exc
        found = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not found:  # starting without the protection the operator asked for would be worse than not starting
            raise SystemExit(f"--api-key-file {key_file} holds no key")
        keys += found
    return keys


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def key_matches(given: str, digests: Iterable[bytes]) -> bool:
    """Constant time: both sides are hashed to the same length, and every key is compared."""
    given_digest = _digest(given)
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(given_digest, digest)
    return matched


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str], open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self._digests = [_digest(key) for key in keys]
        self._open = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._digests or scope["path"] in self._open:
            await self.app(scope, receive, send)
            return
        given = _bearer(scope)
        if given is None:
            error = AuthenticationFailed(
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
            await refuse(error, scope, receive, send)
            return
        if not key_matches(given, self._digests):
            await refuse(AuthenticationFailed("Incorrect API key provided."), scope, receive, send)
            return
        scope.setdefault("state", {})[AUTHORIZED] = True
        await self.app(scope, receive, send)


class ConcurrencyLimitMiddleware:
    """At most ``limit`` model requests at once, from arrival to the last byte of their answer;
    beyond it a 429 with Retry-After (OpenAI's SDK waits and retries) rather than an unbounded queue."""

    def __init__(self, app: ASGIApp, limit: int | None, paths: frozenset[str]) -> None:
        self.app = app
        self.limit = limit
        self.paths = paths
        self.running = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.limit is None or scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.running >= self.limit:
            error = TooManyRequests(
                f"This server is running its limit of {self.limit} requests (--max-concurrent-requests); retry shortly."
            )
            await refuse(error, scope, receive, send)
            return
        self.running += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.running -= 1
