"""The commands that belong to no daemon: ``harness init`` (:mod:`.init`), ``task``
(:mod:`.task`), ``queue`` and ``dlq`` (:mod:`.queue`), ``events`` (:mod:`.events`, with the
``tail -f`` loop), ``doctor`` (:mod:`.doctor`) and ``db`` (:mod:`.db`, a postgres home's
database).

Each module adds its commands through ``register(group)``, called by daemons/cli.py the
first time one of them is looked up (``LAZY_COMMANDS``). The commands of a daemon live
beside it (``daemons/reporting/commands.py``, ``daemons/web/commands.py``, ...).
"""
