"""Bearer-token authentication of the search service.

The token comes from the environment variable SSCQ_SERVE_TOKEN or from `serve.token_file`
(a mounted Kubernetes Secret). A configured token is always enforced; a bind to anything but
loopback needs one (`serve.insecure_no_auth` is the explicit opt-out). The token travels to
the ingress replica wrapped in `Secret`, whose repr never shows it, and it is compared in
constant time. /healthz and the page's static files (which then ask for the token) are open.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from typing import Optional

from sscq_dist.errors import SSCQError

TOKEN_ENV = "SSCQ_SERVE_TOKEN"
# Routes any client may call: the health probe and the page that asks for the token.
OPEN_PATHS = frozenset({"/healthz", "/", "/app.js"})


class Secret:
    """A string that never prints itself (repr, str, logs, pickled error messages)."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; a name or wildcard (0.0.0.0, ::) is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_token(token_file: Optional[str]) -> Optional[Secret]:
    """The token from SSCQ_SERVE_TOKEN, else from `token_file`; None when neither gives one."""
    value = os.environ.get(TOKEN_ENV, "").strip()
    if not value and token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as exc:
            raise SSCQError(f"serve token file {token_file}: cannot read it ({exc.strerror})") from None
        if not value:
            raise SSCQError(f"serve token file {token_file} is empty")
    if value and len(value) < 16:
        raise SSCQError(f"serve token: {len(value)} characters is too short to guess safely (use >= 16)")
    return Secret(value) if value else None


def decide_auth(host: str, token: Optional[Secret], insecure_no_auth: bool) -> Optional[Secret]:
    """The token the service must enforce for a bind on `host`, or None for an open service.

    Refuses (one error line) a non-loopback bind without a token unless insecure_no_auth."""
    if token is not None:
        return token
    if is_loopback(host) or insecure_no_auth:
        return None
    raise SSCQError(f"serve: binding {host} (not loopback) needs a token: set {TOKEN_ENV} or --token-file "
                    "(or pass --insecure-no-auth to serve without one)")


def check_bearer(authorization: Optional[str], token: Secret) -> Optional[str]:
    """None when the Authorization header carries the token, else the one-line reason (never the token)."""
    if not authorization:
        return "missing token: send 'Authorization: Bearer <token>'"
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "malformed Authorization header: expected 'Bearer <token>'"
    if not hmac.compare_digest(given.strip().encode(), token.reveal().encode()):
        return "wrong token"
    return None
