"""``python -m daemons`` is the ``harness`` command."""

from daemons.cli import main

if __name__ == "__main__":
    main()
