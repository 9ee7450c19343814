"""The supervisor: ``harness supervisor``, ``up`` and ``demo``.

It reclaims orphaned tasks, stops stalled ones, autoscales workers and judges health
(docs/supervisor.md has the operator's view). Modules:

- :mod:`.loop`: :func:`~.loop.run_supervisor`, the loop (signals, wake-ups, side jobs).
- :mod:`.reconcile`: :class:`~.reconcile.Supervisor`, whose
  :meth:`~.reconcile.Supervisor.reconcile` is one pass at ``now``, and the idle-stop
  one-shot :func:`~.reconcile.scale_down_once`.
- :mod:`.reclaim`: death proof, fencing and the reclaim of a dead worker's task.
- :mod:`.health`: stalls, backpressure, the circuit breaker and ``health.json``.
- :mod:`.policy`: the scaling policy (:func:`~.policy.decide_scale`) and its actuation.
- :mod:`.state`: ``supervisor-state.json`` and what the parts share.
- :mod:`.pidwatch`: a pidfd per worker, so the loop wakes the instant one dies.
- :mod:`.actuators`: starting and stopping workers (systemd units or child processes).
- :mod:`.up`: ``harness up``, the supervisor with its workers in the foreground.
- :mod:`.commands`: the ``harness supervisor``, ``up`` and ``demo`` commands.

Nothing is imported here, so that looking up a command does not load the daemon.
"""
