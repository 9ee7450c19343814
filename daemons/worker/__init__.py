"""The worker: ``harness worker run`` and the commands beside it.

- :mod:`.loop`: :class:`~.loop.Worker` (:meth:`~.loop.Worker.step` is the loop body) and
  :func:`~.loop.run_worker`, the loop around it.
- :mod:`.state`: what a worker holds across steps and the helpers its parts share (config,
  events, the spec, the exit rule, heartbeat and watchdog).
- :mod:`.launch`: starting a claimed task; :mod:`.outcome`: recording how it ended.
- :mod:`.task_run`: one attempt as its own process group (:class:`~.task_run.TaskRun`);
  :mod:`.scopes`: the systemd transient scope it runs in.
- :mod:`.options`: what the worker was asked to do, and its instance and unit.
- :mod:`.commands`: ``harness worker``, ``drain``, ``pause``, ``resume``, ``systemd``.

Nothing is imported here, so that ``harness pause`` does not load the worker loop.
"""
