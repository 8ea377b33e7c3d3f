"""Who may ask the model: bearer tokens on the TCP listener, refusals counted and logged sparingly.

The Unix socket is guarded by the file system (mode 0660, owned by ``api.socket_group``): a
process that can open it is authorised, and no token is asked for there. The TCP listener is
off unless configured, because any local user (and any container sharing the host's network)
can reach 127.0.0.1; when it is on, every request must carry ``Authorization: Bearer <token>``
with a token from ``api.tokens_file``.

The tokens file holds one token per line (``#`` starts a comment)::

    # name     token                                        models (optional; * = every model)
    default    3q2-Zl0d1xVYm0J0l8d4cN2x8m0bJ8Y2p0Wc5jVb0sM
    camera-app Jt2n9yqk3w0b7cGf4oXkQ1YzS5uR8eVd6aLhM2pNs0c  digits,faces

Tokens are compared by their SHA-256 digests with :func:`hmac.compare_digest` against every
configured token (no early exit), so the answer time does not tell how much of a guess was
right. The file is never echoed: errors name the line, never the token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigError

log = logging.getLogger(__name__)

REALM = "litefleet-agent"
MIN_TOKEN_LENGTH = 16
DEFAULT_TOKENS_FILE = "/etc/litefleet/api-tokens"
LOG_EVERY_S = 60.0

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TOKEN = re.compile(r"^[\x21-\x7e]+$")            # visible ASCII, no spaces (it travels in a header)
_MODEL = re.compile(r"^[^\s,/:]+$")


@dataclass(frozen=True)
class ApiToken:
    """One configured token: a name for logs and messages, its digest, the models it may use."""

    name: str
    digest: bytes
    models: frozenset[str] | None     # None: every model

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def models_text(self) -> str:
        return "every model" if self.models is None else ", ".join(sorted(self.models))


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class TokenSet:
    """The tokens of ``api.tokens_file``; :meth:`match` finds the one a request presents."""

    def __init__(self, tokens: tuple[ApiToken, ...], source: str) -> None:
        self.tokens = tokens
        self.source = source

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def parse(cls, text: str, source: str) -> "TokenSet":
        """Read the tokens file's text; :class:`ConfigError` names the line that is wrong."""
        tokens: list[ApiToken] = []
        names: set[str] = set()
        digests: set[bytes] = set()
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            where = f"{source}:{number}"
            fields = line.split()
            if len(fields) not in (2, 3):
                raise ConfigError(f"{where}: expected 'NAME TOKEN [MODELS]' (MODELS: comma-separated names "
                                  f"or *), got {len(fields)} fields")
            name, token = fields[0], fields[1]
            if not _NAME.match(name):
                raise ConfigError(f"{where}: token name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
            if name in names:
                raise ConfigError(f"{where}: token name {name!r} is used twice; names must be unique")
            if not _TOKEN.match(token) or len(token) < MIN_TOKEN_LENGTH:
                raise ConfigError(f"{where}: the token of {name!r} must be at least {MIN_TOKEN_LENGTH} visible "
                                  "ASCII characters without spaces (make one with "
                                  "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
            models: frozenset[str] | None = None
            if len(fields) == 3 and fields[2] != "*":
                listed = [m for m in fields[2].split(",") if m]
                bad = [m for m in listed if not _MODEL.match(m)]
                if not listed or bad:
                    raise ConfigError(f"{where}: the models of {name!r} must be comma-separated model names "
                                      f"or *, got {fields[2]!r}")
                models = frozenset(listed)
            digest = _digest(token)
            if digest in digests:
                raise ConfigError(f"{where}: the token of {name!r} is the same as an earlier one; "
                                  "give each application its own")
            names.add(name)
            digests.add(digest)
            tokens.append(ApiToken(name, digest, models))
        return cls(tuple(tokens), source)

    @classmethod
    def load(cls, path: str | Path) -> "TokenSet":
        """Read a tokens file; refuse one that every user of the device may read or write."""
        path = Path(path)
        try:
            info = path.stat()
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: tokens file not found; `litefleet-agent install` writes one "
                              "(mode 0600), or set api.tokens_file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the tokens file ({exc})") from None
        if stat.S_IMODE(info.st_mode) & 0o006:
            raise ConfigError(f"{path}: the tokens file is open to every user (mode "
                              f"{stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
        return cls.parse(text, str(path))

    def match(self, presented: str) -> ApiToken | None:
        """The token whose value is ``presented``, comparing with every token in constant time."""
        digest = _digest(presented)
        found = None
        for token in self.tokens:
            if hmac.compare_digest(token.digest, digest) and found is None:
                found = token
        return found


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def tokens_file_text(name: str = "default", token: str | None = None) -> str:
    """A tokens file with one token allowed every model, as the install step writes it."""
    return ("# litefleet agent: bearer tokens for the inference API's TCP listener (api.tcp_port).\n"
            "# One per line: NAME TOKEN [MODELS]; MODELS is a comma-separated list of model names, or *\n"
            "# (or nothing) for every model. Keep this file mode 0600; restart the agent after editing.\n"
            f"{name} {token or new_token()} *\n")


# the decision --------------------------------------------------------------------------

@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: the HTTP status, a message for the caller, headers to send."""

    status: int
    message: str
    headers: Mapping[str, str]
    kind: str       # "unauthorized" | "forbidden"


class AccessControl:
    """Decides per request, counts refusals per telemetry interval, logs them without flooding.

    ``tokens`` None: no token is required anywhere (an API without a TCP listener, or a test of
    the pure dispatcher). Requests that arrive over the Unix socket never need one.
    """

    def __init__(self, tokens: TokenSet | None = None, *, log_every_s: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tokens = tokens
        self._lock = threading.Lock()
        self._clock = clock
        self._log_every_s = log_every_s
        self._next_log = 0.0
        self._suppressed = 0
        self._interval = {"unauthorized": 0, "forbidden": 0}
        self._total = {"unauthorized": 0, "forbidden": 0}

    def check(self, via: str, authorization: str, model: str | None) -> tuple[ApiToken | None, Refusal | None]:
        """(the caller's token, None) if the request may go on, else (token or None, the refusal).

        ``via``: "tcp" or "unix"; ``model``: the model the path names (None for ``/v1/models``).
        """
        if via != "tcp" or self.tokens is None:
            return None, None
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if not authorization.strip():
            return None, self._refuse(Refusal(
                401, "this API needs a bearer token over TCP: send 'Authorization: Bearer <token>' with a token "
                     "from the agent's api.tokens_file, or use the Unix socket",
                {"WWW-Authenticate": f'Bearer realm="{REALM}"'}, "unauthorized"), "no token")
        if scheme.lower() != "bearer" or not value:
            return None, self._refuse(Refusal(
                401, f"the Authorization header must be 'Bearer <token>', got a {scheme or 'malformed'!r} credential",
                {"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_request"'}, "unauthorized"),
                "malformed Authorization header")
        token = self.tokens.match(value)
        if token is None:
            return None, self._refuse(Refusal(
                401, "the bearer token is not valid for this agent (not in its api.tokens_file)",
                {"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'}, "unauthorized"),
                "wrong token")
        if model is not None and not token.allows(model):
            return token, self._refuse(Refusal(
                403, f"token {token.name!r} may not use model {model!r}; it is limited to {token.models_text()}",
                {"WWW-Authenticate": f'Bearer realm="{REALM}", error="insufficient_scope"'}, "forbidden"),
                f"token {token.name!r} asked for model {model!r}")
        return token, None

    def _refuse(self, refusal: Refusal, what: str) -> Refusal:
        now = self._clock()
        with self._lock:
            self._interval[refusal.kind] += 1
            self._total[refusal.kind] += 1
            if now < self._next_log:
                self._suppressed += 1
                return refusal
            suppressed, self._suppressed = self._suppressed, 0
            self._next_log = now + self._log_every_s
        more = f" ({suppressed} more refused in the last {self._log_every_s:g} s, not logged)" if suppressed else ""
        log.warning("inference API refused a TCP request (%d, %s)%s", refusal.status, what, more)
        return refusal

    def snapshot_and_reset(self) -> dict[str, int]:
        """Refusals since the previous call (the telemetry interval): ``unauthorized``, ``forbidden``."""
        with self._lock:
            doc = dict(self._interval)
            self._interval = {"unauthorized": 0, "forbidden": 0}
        return doc

    def totals(self) -> dict[str, int]:
        """Refusals since the agent started."""
        with self._lock:
            return dict(self._total)


def load_tokens(configured: str, credential: Path | None) -> TokenSet:
    """The tokens the agent serves TCP with: systemd's credential copy if there is one, else the file.

    Raises :class:`ConfigError` when there is no usable token: a TCP listener without tokens
    would refuse every request.
    """
    path = credential or (Path(configured) if configured else None)
    if path is None:
        raise ConfigError("api.tcp_port is set but api.tokens_file is empty: the TCP listener needs bearer tokens")
    tokens = TokenSet.load(path)
    if not tokens.tokens:
        raise ConfigError(f"{path}: holds no token, so the TCP listener (api.tcp_port) would refuse every "
                          "request; add a line 'NAME TOKEN [MODELS]' or set api.tcp_port = 0")
    return tokens


__all__ = ["AccessControl", "ApiToken", "Refusal", "TokenSet", "DEFAULT_TOKENS_FILE", "REALM", "load_tokens",
           "new_token", "tokens_file_text"]
