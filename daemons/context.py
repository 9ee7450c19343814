"""What every CLI command receives: the resolved home and the output mode."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import click
import orjson

from coordination.paths import Home


@dataclass
class CliContext:
    home: Home

    def queue(self) -> Any:
        from coordination.queue import TaskQueue

        return TaskQueue(self.home)


pass_ctx = click.make_pass_decorator(CliContext)


def json_option(func: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print machine-readable JSON instead of text.")(func)


def print_json(obj: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()
