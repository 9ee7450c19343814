"""The PostgreSQL backend of the queue port (docs/multi-host.md): one database shared by
several hosts, each keeping its inbox, events file and jq view in its own home."""

from .backend import PostgresQueue

__all__ = ["PostgresQueue"]
