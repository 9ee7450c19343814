"""The janitor: ``harness janitor run`` (hourly, systemd/harness-janitor.timer).

- :mod:`.run`: one run (:func:`~.run.run_janitor`): recovery, retention, rotation, queue
  retention through the port, clean-up and the ``janitor_run`` report.
- :mod:`.commands`: the ``harness janitor`` commands.

The rotation protocol itself is :mod:`coordination.rotation`. Nothing is imported here.
"""
