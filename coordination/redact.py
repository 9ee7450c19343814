"""Masking of secrets in everything harness writes or shows (docs/observability.md).

Two rules, applied by :func:`redact` deep into dicts, lists and tuples (it never mutates its
argument; it returns new containers and leaves other objects as they are):

1. **Secret keys.** A dict value is masked when its key contains, case-insensitively, one of
   :data:`SECRET_KEY_PARTS` (``token``, ``secret``, ``password``, ``passwd``, ``api_key``,
   ``apikey``, ``authorization``, ``credential``, ``private_key``, ``access_key``). Strings
   become ``"[redacted]"``, numbers become ``"[redacted]"``, containers are walked with every
   scalar leaf masked. ``None``, booleans and empty strings are kept (they hide nothing).
   Exception: when ``token`` is the only secret part of the key, a number is a token
   *count* (``tokens_used``, ``max_tokens``, ``input_tokens``), not a secret, and is kept.
2. **Token shapes.** In every string, anywhere: ``sk-...`` API keys (OpenAI, Anthropic
   ``sk-ant-...``), GitHub tokens (``ghp_ gho_ ghu_ ghs_ ghr_``, ``github_pat_``), AWS access
   key ids (``AKIA`` + 16), ``Bearer <token>`` (and ``Basic <credentials>``), Slack
   ``xox[baprs]-`` tokens, and ``KEY=value`` / ``KEY: value`` assignments whose KEY looks
   secret (as in rule 1; a value made only of digits is kept), and the password of a
   ``scheme://user:password@host`` URL. The shape's public prefix stays visible:
   ``sk-…[redacted]``, ``ghp_…[redacted]``, ``Bearer [redacted]``,
   ``postgresql://app:[redacted]@db``.

The functions are pure and cheap on strings without a match (one combined regex search).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

MASK = "[redacted]"
ELLIPSIS = "\u2026"

#: Case-insensitive substrings that make a key secret.
SECRET_KEY_PARTS = ("token", "secret", "password", "passwd", "api_key", "apikey",
                    "authorization", "credential", "private_key", "access_key")
_OTHER_PARTS = tuple(p for p in SECRET_KEY_PARTS if p != "token")

_KEY_WORD = (r"[A-Za-z0-9_.-]*(?:token|secret|password|passwd|api_?key|authorization|"
             r"credential|private_?key|access_?key)[A-Za-z0-9_.-]*")

# Each pattern keeps group "keep" (a visible prefix) and masks the rest of the match.
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("bearer", re.compile(r"(?P<keep>\b(?:[Bb]earer|[Bb]asic)\s+)[A-Za-z0-9\-._~+/]{8,}=*")),
    ("openai", re.compile(r"(?<![A-Za-z0-9_-])(?P<keep>sk-)(?:ant-)?[A-Za-z0-9_-]{16,}")),
    ("github_pat", re.compile(r"(?<![A-Za-z0-9_])(?P<keep>github_pat_)[A-Za-z0-9_]{20,}")),
    ("github", re.compile(r"(?<![A-Za-z0-9_])(?P<keep>gh[pousr]_)[A-Za-z0-9]{20,}")),
    ("aws", re.compile(r"(?<![A-Za-z0-9])(?P<keep>AKIA)[0-9A-Z]{16}(?![0-9A-Z])")),
    ("slack", re.compile(r"(?<![A-Za-z0-9])(?P<keep>xox[baprs]-)[A-Za-z0-9-]{10,}")),
    # scheme://user:password@host (a database URL): the password goes, the rest stays.
    ("url_password", re.compile(r"(?P<keep>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)"
                                r"(?!\[redacted\]@)[^\s@/]+(?=@)")),
    # KEY=value, KEY: value, "KEY": "value" (JSON in a message), --KEY=value.
    ("assignment", re.compile(
        r"(?P<keep>(?i:\b" + _KEY_WORD + r")\"?\s*[=:]\s*\"?)"
        r"(?P<value>(?!\d+\b)(?!\[redacted\])(?![Bb]earer\s)(?![Bb]asic\s)[^\s\"',;&]+)")),
)
_ANY = re.compile("|".join(f"(?:{p.pattern})" for _, p in _PATTERNS).replace(
    "(?P<keep>", "(?:").replace("(?P<value>", "(?:"))


def _mask_match(match: re.Match[str]) -> str:
    keep = match.group("keep") or ""
    if keep.endswith(("=", ":", '"', " ")) or keep.lower().startswith(("bearer", "basic")):
        return keep + MASK
    return keep + ELLIPSIS + MASK


def redact_text(text: str) -> str:
    """``text`` with every token shape masked (see the module docstring)."""
    if not text or _ANY.search(text) is None:
        return text
    for _, pattern in _PATTERNS:
        text = pattern.sub(_mask_match, text)
    return text


def redact_url(url: str) -> str:
    """A database URL or libpq conninfo fit to show: the password of
    ``postgresql://user:password@host/db``, a ``?password=`` parameter and a conninfo's
    ``password=...`` are masked; everything else (user, host, port, database, sslmode)
    stays, so an operator can still tell which server it names."""
    return redact_text(url)


@lru_cache(maxsize=4096)
def secret_key_kind(key: str) -> str | None:
    """``"secret"`` for a key whose values are masked, ``"token"`` when only the substring
    ``token`` matched (numbers are then counts and kept), None for an ordinary key."""
    lowered = key.lower()
    if any(part in lowered for part in _OTHER_PARTS):
        return "secret"
    if "token" in lowered:
        return "token"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _mask_all(value: Any, kind: str) -> Any:
    """Every scalar leaf of ``value`` masked (numbers kept under a ``token``-only key)."""
    if isinstance(value, str):
        return MASK if value else value
    if _is_number(value):
        return value if kind == "token" else MASK
    if isinstance(value, dict):
        return {k: _mask_all(v, kind) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask_all(v, kind) for v in value]
    return value  # None, bool and other objects carry no secret text


def redact(obj: Any) -> Any:
    """A deep copy of ``obj`` with secret values and token shapes masked (pure)."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            kind = secret_key_kind(key) if isinstance(key, str) else None
            out[key] = redact(value) if kind is None else _mask_all(value, kind)
        return out
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact(v) for v in obj)
    return obj


__all__ = ["MASK", "SECRET_KEY_PARTS", "redact", "redact_text", "redact_url",
           "secret_key_kind"]
