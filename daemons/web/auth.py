"""Who may write: the dashboard's token and the CSRF defence of its forms.

The dashboard is read-only unless a token is configured (docs/web.md):
``$HARNESS_WEB_TOKEN``, else the file ``coordination/config/web-token`` of the home. The
file must be a regular file readable by its owner only (mode 0600 or stricter): a file
that group or others may read is refused, as is a token shorter than
:data:`MIN_TOKEN_CHARS`. API writes send ``Authorization: Bearer TOKEN``; the pages' forms
send the token in a password field, plus a per-browser CSRF value that must match the
``harness_csrf`` cookie (double submit), and an ``Origin`` (when the browser sends one) of
the dashboard itself. Comparisons are constant-time.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from coordination.errors import ConfigError
from coordination.paths import Home

TOKEN_ENV = "HARNESS_WEB_TOKEN"
TOKEN_FILE_NAME = "web-token"
MIN_TOKEN_CHARS = 16
CSRF_COOKIE = "harness_csrf"
CSRF_FIELD = "csrf"


class Refused(Exception):
    """A write that is not allowed: ``status`` is 401 (no credentials) or 403 (wrong ones,
    or the dashboard is read-only)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def token_file(home: Home) -> Path:
    return home.web_token_file


def _check_token(token: str, where: str) -> str:
    token = token.strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{where}: the web token must have at least {MIN_TOKEN_CHARS} "
                          "characters (e.g. `openssl rand -hex 32`)")
    return token


def load_token(home: Home, environ: dict[str, str] | None = None) -> str | None:
    """The configured write token, None when there is none (the dashboard is read-only).

    Raises :class:`ConfigError` for a token file that group or others may access, that is
    not a regular file, or a token that is too short: a misconfigured token never silently
    turns writes off or on."""
    env = os.environ if environ is None else environ
    if env.get(TOKEN_ENV):
        return _check_token(env[TOKEN_ENV], f"${TOKEN_ENV}")
    path = token_file(home)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the web token ({exc.strerror}); it must be "
                          "a regular file of mode 0600") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: the web token must be a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read "
                              f"the web token; run `chmod 600 {path}`")
        text = fh.read().decode("utf-8", errors="strict")
    return _check_token(text, str(path))


@dataclass(frozen=True)
class WriteGuard:
    """Checks the credentials of one write; ``token`` None: every write is refused."""

    token: str | None

    @property
    def writable(self) -> bool:
        return self.token is not None

    def _match(self, given: str) -> None:
        if self.token is None:
            raise Refused(403, "the dashboard is read-only: no web token is configured "
                               f"(${TOKEN_ENV} or coordination/config/{TOKEN_FILE_NAME})")
        if not given:
            raise Refused(401, "this write needs the web token")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise Refused(403, "wrong web token")

    def check_bearer(self, authorization: str | None) -> None:
        """An API write: ``Authorization: Bearer TOKEN``."""
        scheme, _, value = (authorization or "").partition(" ")
        self._match(value.strip() if scheme.lower() == "bearer" else "")

    def check_form(self, *, token: str, csrf_field: str, csrf_cookie: str | None,
                   origin: str | None, fetch_site: str | None, own_origin: str) -> None:
        """A form write: same-origin request, matching CSRF values, then the token."""
        if origin is not None and origin != own_origin:
            raise Refused(403, f"cross-origin form post refused (Origin {origin})")
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            raise Refused(403, f"cross-site form post refused (Sec-Fetch-Site {fetch_site})")
        if not csrf_cookie or not csrf_field or \
                not hmac.compare_digest(csrf_field.encode(), csrf_cookie.encode()):
            raise Refused(403, "missing or stale CSRF value: reload the page and try again")
        self._match(token)


def new_csrf_value() -> str:
    return secrets.token_urlsafe(24)
