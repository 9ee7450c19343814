"""Development tools, apart from the runtime: ``harness bench`` (:mod:`.bench` and the
``*_bench`` modules beside it), ``harness load-test`` (:mod:`.loadtest`) and ``harness
demo`` (:mod:`.demo`). No daemon imports from here; the CLI loads them only when such a
command runs."""
