"""The two ways to start the CLI: the `harness` console script and `python -m daemons`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import skip_reason

from coordination.paths import Home


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("HARNESS_HOME", "STATE_DIRECTORY", "PYTHONSAFEPATH"):
        env.pop(key, None)
    return env


def test_python_m_daemons_works_from_inside_a_home(tmp_path: Path) -> None:
    """Inside a home, the `coordination/` data directory must not shadow the package."""
    root = tmp_path / "home"
    Home(root).create()
    subprocess.run([sys.executable, "-m", "daemons", "--home", str(root), "init"],
                   check=True, capture_output=True, env=_env())
    proc = subprocess.run([sys.executable, "-m", "daemons", "--home", ".", "status",
                           "--json"], cwd=root, capture_output=True, text=True, env=_env(),
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert '"queue"' in proc.stdout


def test_console_script_matches_python_m(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("harness")
    exe = str(script) if script.exists() else shutil.which("harness")
    if exe is None:
        pytest.skip(skip_reason("harness"))
    a = subprocess.run([exe, "--help"], capture_output=True, text=True, env=_env(), timeout=60)
    b = subprocess.run([sys.executable, "-m", "daemons", "--help"], capture_output=True,
                       text=True, env=_env(), timeout=60, cwd=tmp_path)
    assert a.returncode == b.returncode == 0
    assert a.stdout.split("Commands:")[1] == b.stdout.split("Commands:")[1]


def test_lazy_command_table_matches_what_the_modules_register() -> None:
    """Every command a module registers is listed under that module, and nothing else."""
    import importlib

    import click

    from daemons.cli import LAZY_COMMANDS

    found: dict[str, str] = {}
    for module_name in sorted(set(LAZY_COMMANDS.values())):
        group = click.Group("probe")
        importlib.import_module(module_name).register(group)
        found.update(dict.fromkeys(group.commands, module_name))
    assert found == LAZY_COMMANDS


def test_a_simple_command_does_not_import_the_daemons(tmp_path: Path) -> None:
    code = ("import sys; from daemons.cli import main; sys.argv = ['harness', '--version'];\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('daemons.'))\n"
            "print(' '.join(loaded), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(), timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stderr.split()
    assert "daemons.cli" in loaded
    assert not {"daemons.worker", "daemons.supervisor", "daemons.devtools.bench",
                "daemons.janitor"} & set(loaded), loaded
