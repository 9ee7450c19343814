"""Reporting over a home: ``harness status`` (:mod:`.status`), ``harness check``
(:mod:`.checks`) and ``harness timeline`` (:mod:`.timeline`).

Read-mostly code built on :mod:`coordination.metrics` (the snapshot, the health rule and
the stall rule stay there, in the contract library); ``check`` also writes its own state
file, ``coordination/check-state.json``, and its alert events.
"""
