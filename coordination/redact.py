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

3. **Configured patterns.** ``redact_patterns`` in system.json adds regexes whose whole
   match becomes ``[redacted]`` (:func:`use_patterns`, called by the config loader, so every
   process that read its config applies them). They are POSIX extended regexes of the
   portable subset that Python, bash's ``[[ =~ ]]`` and jq all read the same way
   (:func:`pattern_problem`), because scripts/lib/common.sh applies them too.
4. **Argv.** :func:`redact_argv` also masks the element after a secret-named option
   (``--password hunter2``, ``--api-key K``); :func:`redact_record` masks a task record
   (``description``, ``last_error``, ``command``, ``result``) for the history and for display.

:func:`printable` escapes control characters (terminal escape sequences) for display.

The functions are pure (given the configured patterns) and cheap on strings without a match
(one combined regex search).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
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


#: The configured extra patterns (``redact_patterns``), as given and compiled.
_extra: tuple[tuple[str, ...], tuple[re.Pattern[str], ...]] = ((), ())


def pattern_problem(pattern: Any) -> str | None:
    """Why ``pattern`` cannot be a ``redact_patterns`` entry; None when it can.

    An entry is a non-empty POSIX extended regex without the constructs Python, bash and jq
    read differently: no ``(?`` groups, no backslash class or anchor (``\\d \\w \\s \\b``, back
    references), no lazy quantifier, no POSIX bracket class (``[:digit:]``), no newline;
    and it may not match the empty string."""
    if not isinstance(pattern, str) or not pattern:
        return "must be a non-empty string"
    if "\n" in pattern or "\x00" in pattern:
        return "may not contain a newline or NUL"
    if "(?" in pattern:
        return "may not use (? groups (lookarounds, flags, named groups)"
    if re.search(r"\\[A-Za-z0-9]", pattern):
        return r"may not use backslash classes or references (\d \w \s \b \1...): " \
               "use [0-9], [A-Za-z0-9_], [ ]"
    if re.search(r"[*+?}]\?", pattern):
        return "may not use lazy quantifiers (*? +? ?? {n,m}?)"
    if re.search(r"\[[:=.]", pattern) and re.search(r"\[\[|\[[:=.][A-Za-z_]+[:=.]\]", pattern):
        return "may not use POSIX bracket classes ([:digit:]): list the characters"
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        return f"is not a valid regex: {exc}"
    if compiled.fullmatch("") is not None:
        return "matches the empty string"
    return None


def use_patterns(patterns: Sequence[str]) -> None:
    """Make ``patterns`` (validated ``redact_patterns``) the process's extra patterns."""
    global _extra
    given = tuple(patterns)
    if given != _extra[0]:
        _extra = (given, tuple(re.compile(p) for p in given))


def redact_text(text: str) -> str:
    """``text`` with every token shape and configured pattern masked (module docstring)."""
    if not text:
        return text
    if _ANY.search(text) is not None:
        for _, pattern in _PATTERNS:
            text = pattern.sub(_mask_match, text)
    for extra in _extra[1]:
        text = extra.sub(MASK, text)
    return text


_SECRET_OPTION = re.compile(r"(?i:" + _KEY_WORD + r")")


def _is_secret_option(arg: str) -> bool:
    """``--password``, ``--api-key``, ``-token``: an option (one or two dashes, no value
    attached) whose name, with dashes read as underscores, looks secret."""
    name = arg[2:] if arg.startswith("--") else arg[1:] if arg.startswith("-") else ""
    return bool(name) and "=" not in name and \
        _SECRET_OPTION.fullmatch(name.replace("-", "_")) is not None


def redact_argv(argv: Sequence[Any]) -> list[Any]:
    """An argv with every element redacted (:func:`redact_text`), and the element after a
    secret-named option without a value (``--password``, ``--api-key``) masked whole."""
    out: list[Any] = []
    mask_next = False
    for arg in argv:
        if not isinstance(arg, str):
            out.append(arg)
            mask_next = False
            continue
        out.append(MASK if mask_next and arg else redact_text(arg))
        mask_next = _is_secret_option(arg)
    return out


def redact_record(record: dict[str, Any]) -> dict[str, Any]:
    """A copy of a task, history record or dead letter fit for the history and for
    display: ``description`` and ``last_error`` redacted, ``command`` through
    :func:`redact_argv`, ``result`` through :func:`redact`; other fields as they are.
    The live task keeps its exact command: a retry needs it."""
    out = dict(record)
    for key in ("description", "last_error"):
        if isinstance(out.get(key), str):
            out[key] = redact_text(out[key])
    if isinstance(out.get("command"), list):
        out["command"] = redact_argv(out["command"])
    if out.get("result") is not None:
        out["result"] = redact(out["result"])
    if isinstance(out.get("history"), list):
        out["history"] = [redact_record(r) if isinstance(r, dict) else r
                          for r in out["history"]]
    return out


# C0 and C1 controls and DEL, except tab and newline.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_NL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` safe to print on a terminal: every control character (ESC and the rest of
    C0 and C1, DEL; newlines too unless ``keep_newlines``) shown as ``\\xNN``, so an event
    message or a task's output can never move the cursor, retitle the window or hide
    text. Tabs stay."""
    pattern = _CONTROL if keep_newlines else _CONTROL_NL
    if pattern.search(text) is None:
        return text
    return pattern.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


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


__all__ = ["MASK", "SECRET_KEY_PARTS", "pattern_problem", "printable", "redact", "redact_argv",
           "redact_record", "redact_text", "redact_url", "secret_key_kind", "use_patterns"]
