"""The file backend of the queue port: a journal, a jq snapshot, an inbox (see
:mod:`.backend`)."""

from .backend import FileQueue

__all__ = ["FileQueue"]
