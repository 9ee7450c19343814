"""The coordination-directory contract as a library.

Everything a harness process knows about the shared home lives here: where each file is
(:mod:`.paths`), how it is written atomically (:mod:`.store`), which lock guards it
(:mod:`.locks`), and the operations on it (:mod:`.queue`, :mod:`.events`, :mod:`.specs`,
:mod:`.config`, :mod:`.control`). This package never runs a long loop and never starts a
subprocess; those belong to :mod:`daemons`. docs/coordination.md is the normative text.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
