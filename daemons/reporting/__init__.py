"""Reporting over a home, and its commands (``harness metrics``, ``status``, ``check``,
``dashboard``, ``timeline``, ``report``: :mod:`.commands`).

- :mod:`.status`: ``harness status``; :mod:`.checks`: ``harness check``, which also writes
  its own state file, ``coordination/check-state.json``, and its alert events;
  :mod:`.timeline`: ``harness timeline``.
- :mod:`.prometheus`: the Prometheus exposition of a snapshot and its textfile.
- :mod:`.dashboard`: the live terminal dashboard; :mod:`.report`: the text and HTML report.

Read-mostly code built on :mod:`coordination.metrics` (the snapshot, the health rule and
the stall rule stay there, in the contract library).
"""
