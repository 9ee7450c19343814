"""Reaching the database of a postgres home (docs/multi-host.md, "Configuration").

The URL is system.json ``database_url``, overridden by the environment variable
``HARNESS_DATABASE_URL``; it is handed to libpq unchanged, so libpq's own ``PG*``
variables, ``~/.pgpass`` and ``sslmode`` apply. Wherever a URL is shown its password is
masked (:func:`coordination.redact.redact_url`).
"""

from __future__ import annotations

import os
from typing import Any

import psycopg

from ...config import load_system
from ...errors import ConfigError, DatabaseUnavailable
from ...paths import Home
from ...redact import redact_text, redact_url

ENV_URL = "HARNESS_DATABASE_URL"


def database_url(home: Home) -> str:
    """The URL this home's queue connects to: ``$HARNESS_DATABASE_URL``, else system.json
    ``database_url``. ConfigError when neither is set."""
    url = os.environ.get(ENV_URL) or load_system(home).values.get("database_url")
    if not url:
        raise ConfigError(f"{home.system_config}: key 'database_url' is null and "
                          f"${ENV_URL} is not set; queue_backend postgres needs one")
    return str(url)


def connect(url: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """A new connection; DatabaseUnavailable (exit 75) naming the redacted URL when the
    server cannot be reached or refuses us."""
    try:
        return psycopg.connect(url, **kwargs)
    except psycopg.OperationalError as exc:
        detail = redact_text(str(exc).strip().replace("\n", " "))
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {redact_url(url)}: {detail}") from None
    except psycopg.ProgrammingError as exc:  # a conninfo libpq cannot parse
        raise ConfigError(f"database_url {redact_url(url)} is not a valid PostgreSQL URL "
                          f"or conninfo: {redact_text(str(exc))}") from None
