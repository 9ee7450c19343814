"""``python -m daemons`` is the ``harness`` command."""

import os
import sys

# `python -m` puts the working directory first on sys.path. Run from inside a home, the
# home's `coordination/` data directory would then shadow the `coordination` package as an
# empty namespace package (an editable install resolves packages after sys.path). Keep the
# entry only when it is a source checkout, where it holds the real packages.
_first = sys.path[0] if sys.path and not sys.flags.safe_path else None
if _first is not None and not os.path.isfile(os.path.join(_first or ".", "coordination",
                                                           "__init__.py")):
    del sys.path[0]

from daemons.cli import main  # noqa: E402  (after the sys.path fix above)

if __name__ == "__main__":
    main()
