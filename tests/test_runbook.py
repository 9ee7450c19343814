"""docs/runbook.md is executable: every ```sh block runs here against a fixture home.

How a block is run
- ``bash -euo pipefail -c BLOCK`` in its own session, with the home as the working
  directory and this environment (the runbook's "Conventions" section promises the same):
  ``HARNESS_HOME`` = the home, ``HARNESS_REPO`` = this checkout (scripts are called as
  ``"$HARNESS_REPO/scripts/NAME.sh"``; ``scripts/`` is deliberately *not* on PATH, so a
  block that relies on PATH for them fails), PATH starting with the virtualenv's ``bin/``
  (``harness``), ``TMPDIR``, ``HOME`` and ``XDG_CONFIG_HOME`` inside pytest's tmp dir,
  ``TZ=UTC``.
- It must exit 0, or the status declared by an HTML comment right above the fence,
  ``<!-- expect-exit: 75 -->``; and print something on stdout, or match
  ``<!-- expect-output: REGEX -->`` (``<!-- expect-output: any -->`` accepts silence).
- Nothing it started may outlive it: after its bash exits, any process left in its
  session is killed and reported as a failure. This module is the subreaper of its
  descendants while it runs, so orphans come back to us (not to an init that may not reap
  them) and are reaped at the end, with every fixture process.
- Homes are independent, so they run in parallel (a thread per home, up to 4); the
  blocks of one home run one after the other. The whole module takes about 30 s.

Which home a block sees
- Blocks of one ``###`` subsection (or of a ``##`` section before its first ``###``)
  share one fixture home (``tests/fixtures_runbook.py``: 40 simulated minutes of a small
  fleet built with the real API), in document order.
- ``<!-- home: VARIANT[:LABEL] -->`` gives a block (and every block of the same
  subsection with the same value) its own home in a prepared state: ``standard`` (the plain fixture,
  for blocks that mutate what later blocks read, e.g. ``dlq purge``), ``killed`` (a worker
  SIGKILLed mid-task), ``stuck`` (a worker frozen by SIGSTOP, heartbeat stale), ``corrupt``
  (task-queue.json cut in half), ``torn`` (torn last lines), ``full`` (queue at
  max_queue_depth), ``locked`` (a forgotten ``flock ... sleep`` holds queue.lock;
  lock_timeout_s 1).
  Running one block alone (``-k``) first replays the earlier blocks of its home.
- ``<!-- requires: CMD -->`` skips a block when CMD is not installed.

Which blocks are not run, and why
- ```console blocks are shown only. They are kept for what cannot run in a test: commands
  against a real systemd manager (``systemctl``, ``journalctl``: a test home has none, and
  tests/test_systemd_real.py covers the units), installing into /etc, foreground daemons
  and interactive screens (``harness up``, ``demo``, ``dashboard``, ``events tail -f``),
  benchmarks too slow for this file. Their ``$ harness ...`` lines are still parsed with
  the real click command tree (unknown commands or options, missing required ones fail).
- ```text and ```json blocks are sample output or file excerpts, not commands.
- At least MIN_EXECUTED_SHARE of the command blocks (sh + console) must be executed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import click
import psutil
import pytest
from fixtures_runbook import (
    build_home,
    make_corrupt_queue,
    make_full_queue,
    make_killed_worker,
    make_stuck_worker,
    make_torn_tails,
    set_system_keys,
)
from helpers import ProcGroup, needs, skip_reason

from coordination.paths import Home

REPO = Path(__file__).resolve().parents[1]
RUNBOOK = REPO / "docs" / "runbook.md"
VENV_BIN = Path(sys.executable).parent
BLOCK_TIMEOUT = 60.0

EXECUTED_TAGS = frozenset({"sh"})
SHOWN_TAGS = frozenset({"console"})
OUTPUT_TAGS = frozenset({"text", "json"})
MIN_EXECUTED_SHARE = 0.8
DIRECTIVES = frozenset({"expect-exit", "expect-output", "home", "requires"})

pytestmark = [
    needs("bash", "jq", "flock"),
    pytest.mark.skipif(not (VENV_BIN / "harness").exists(),
                       reason=skip_reason("harness")),
]


# ---------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class Block:
    index: int
    line: int  # 1-based line of the opening fence
    section: str  # the enclosing "## " heading
    subsection: str  # the enclosing "### " heading ("" before the first one)
    tag: str
    code: str
    expect_exit: int = 0
    expect_output: str = ""  # "": non-empty stdout; "any": anything; else a regex
    home: str = "standard"
    requires: tuple[str, ...] = ()

    @property
    def group(self) -> tuple[str, str, str]:
        """Blocks with the same group share one home, in document order."""
        return (self.section, self.subsection, self.home)

    @property
    def variant(self) -> str:
        return self.home.split(":", 1)[0]

    @property
    def test_id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")[:32]
        return f"{self.index:03d}-L{self.line}-{slug}"


_FENCE = re.compile(r"^( *)```(\S*)\s*$")
_DIRECTIVE = re.compile(r"^ *<!--\s*([a-z-]+):\s*(.*?)\s*-->\s*$")


def parse_runbook(text: str) -> list[Block]:
    """Fenced blocks (also indented ones, e.g. inside a numbered list) with their section
    and the directives on the lines right above the opening fence."""
    blocks: list[Block] = []
    lines = text.splitlines()
    section = subsection = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section, subsection = line[3:].strip(), ""
        elif line.startswith("### "):
            subsection = line[4:].strip()
        fence = _FENCE.match(line)
        if not fence:
            i += 1
            continue
        indent, tag = fence.group(1), fence.group(2)
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i] != f"{indent}```":
            if lines[i].strip() and not lines[i].startswith(indent):
                raise AssertionError(f"runbook.md:{i + 1}: line less indented than its fence")
            body.append(lines[i][len(indent):])
            i += 1
        if i == len(lines):
            raise AssertionError(f"runbook.md:{start + 1}: unclosed code fence")
        i += 1
        directives: dict[str, str] = {}
        j = start - 1
        while j >= 0 and (m := _DIRECTIVE.match(lines[j])):
            if m.group(1) not in DIRECTIVES:
                raise AssertionError(f"runbook.md:{j + 1}: unknown directive {m.group(1)!r}"
                                     f" (known: {', '.join(sorted(DIRECTIVES))})")
            directives[m.group(1)] = m.group(2)
            j -= 1
        if directives and tag not in EXECUTED_TAGS:
            raise AssertionError(f"runbook.md:{start + 1}: directives above a ```{tag} block"
                                 " (only ```sh blocks run)")
        blocks.append(Block(
            index=len(blocks), line=start + 1, section=section, subsection=subsection, tag=tag,
            code="\n".join(body) + "\n",
            expect_exit=int(directives.get("expect-exit", "0")),
            expect_output=directives.get("expect-output", ""),
            home=directives.get("home", "standard"),
            requires=tuple(directives.get("requires", "").split())))
    return blocks


BLOCKS = parse_runbook(RUNBOOK.read_text()) if RUNBOOK.exists() else []
SH_BLOCKS = [b for b in BLOCKS if b.tag in EXECUTED_TAGS]


# ---------------------------------------------------------------------------- homes
def _set_subreaper(on: bool) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(36, 1 if on else 0, 0, 0, 0)) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _reap_zombie_children() -> None:
    """Reap adopted orphans that have exited (children we did not spawn with Popen)."""
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return
    for child in children:
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)


def _sleeper(procs: ProcGroup, name: str) -> int:
    """A process that stands in for a worker (its pid goes into a spec)."""
    return procs.spawn(name, ["sleep", "3600"]).pid


def _variant_killed(home: Home, runner: Runner) -> None:
    make_killed_worker(home)


def _variant_stuck(home: Home, runner: Runner) -> None:
    pid = _sleeper(runner.procs, "stuck-worker")
    os.kill(pid, signal.SIGSTOP)
    make_stuck_worker(home, pid)


def _variant_corrupt(home: Home, runner: Runner) -> None:
    make_corrupt_queue(home)


def _variant_torn(home: Home, runner: Runner) -> None:
    make_torn_tails(home)


def _variant_full(home: Home, runner: Runner) -> None:
    make_full_queue(home)


def _variant_locked(home: Home, runner: Runner) -> None:
    """A forgotten hand edit: ``flock queue.lock sleep 3600`` (flock and its child share
    the lock's open file), and lock_timeout_s 1 so that commands give up quickly."""
    set_system_keys(home, lock_timeout_s=1)
    lock = home.lock_path("queue")
    holder = runner.procs.spawn("lock-holder", ["flock", str(lock), "sleep", "3600"])
    deadline = time.monotonic() + 10
    while True:  # until the lock is held and the child runs
        inode = os.stat(lock).st_ino
        held = any(line.split()[-3].endswith(f":{inode}")
                   for line in Path("/proc/locks").read_text().splitlines())
        children = psutil.Process(holder.pid).children() if holder.popen.poll() is None \
            else []
        if held and children:
            runner.strays += children  # killed at teardown if a block left them
            return
        if holder.popen.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the lock holder did not take {lock}: {holder.stderr()}")
        time.sleep(0.02)


VARIANTS: dict[str, Callable[[Home, Runner], None]] = {
    "standard": lambda home, runner: None,
    "killed": _variant_killed,
    "stuck": _variant_stuck,
    "corrupt": _variant_corrupt,
    "torn": _variant_torn,
    "full": _variant_full,
    "locked": _variant_locked,
}


@dataclass
class Result:
    """How one block ran (``error``: it could not be judged, e.g. a timeout)."""

    code: int = 0
    out: str = ""
    err: str = ""
    error: str | None = None


class Runner:
    """Builds the fixture homes and runs their blocks: one thread per home (the blocks of a
    home in document order), since nearly all the time is spent in child processes."""

    def __init__(self, root: Path, procs: ProcGroup) -> None:
        self.root = root
        self.procs = procs
        self.homes: dict[tuple[str, str, str], Home] = {}
        self._build = threading.Lock()  # one home built at a time (ProcGroup is not
        # thread-safe), each just before its blocks run, so its heartbeats are fresh
        self.results: dict[int, Result] = {}
        #: Descendants of spawned children that ProcGroup cannot reach once their parent
        #: is gone (psutil.Process remembers the start time: no pid-reuse accident).
        self.strays: list[psutil.Process] = []
        (root / "user" / ".config").mkdir(parents=True)

    def env(self, home: Home) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("HARNESS_") and k not in (
                   "STATE_DIRECTORY", "XDG_STATE_HOME", "XDG_CONFIG_HOME", "NO_COLOR",
                   "INVOCATION_ID", "NOTIFY_SOCKET", "PYTHONPATH")}
        tmp = home.root.parent / f"{home.root.name}.tmp"
        tmp.mkdir(exist_ok=True)
        env.update(HARNESS_HOME=str(home.root), HARNESS_REPO=str(REPO),
                   PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
                   HOME=str(self.root / "user"),
                   XDG_CONFIG_HOME=str(self.root / "user" / ".config"),
                   TMPDIR=str(tmp), TZ="UTC", COLUMNS="120", LC_ALL="C.UTF-8")
        return env

    def home_for(self, group: tuple[str, str, str], variant: str) -> Home:
        with self._build:
            home = self.homes.get(group)
            if home is None:
                root = self.root / f"home-{len(self.homes):02d}-{variant}"
                live = [_sleeper(self.procs, f"{root.name}-worker-{n}") for n in (1, 2)]
                home = build_home(root, live)
                VARIANTS[variant](home, self)
                self.homes[group] = home
            return home

    def run_all(self, wanted: list[Block]) -> None:
        """Run ``wanted`` and, before each, the earlier blocks of its home (a home's
        blocks build on each other); every home in its own thread."""
        plan: dict[tuple[str, str, str], set[int]] = {}
        for block in wanted:
            plan.setdefault(block.group, set()).update(
                b.index for b in SH_BLOCKS
                if b.group == block.group and b.index <= block.index
                and b.index not in self.results)
        jobs = [(group, [BLOCKS[i] for i in sorted(indexes)])
                for group, indexes in plan.items() if indexes]
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            for future in [pool.submit(self._run_home, group, blocks) for group, blocks in jobs]:
                future.result()

    def _run_home(self, group: tuple[str, str, str], blocks: list[Block]) -> None:
        home = self.home_for(group, blocks[0].variant)
        for block in blocks:
            if all(shutil.which(cmd) for cmd in block.requires):  # else its test skips
                self.results[block.index] = self._exec(block, home)

    def _exec(self, block: Block, home: Home) -> Result:
        # Output goes to files, not pipes: a process the block left behind must not keep
        # us waiting for EOF. The block is over when its bash exits.
        with tempfile.TemporaryFile(dir=self.root) as fo, \
                tempfile.TemporaryFile(dir=self.root) as fe:
            proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block.code],
                                    cwd=home.root, env=self.env(home),
                                    stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                                    start_new_session=True)
            error = None
            try:
                proc.wait(timeout=BLOCK_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                error = f"still running after {BLOCK_TIMEOUT}s"
            leftovers = self._kill_session(proc.pid)
            if leftovers and error is None:
                error = f"left processes behind: {leftovers}"
            fo.seek(0)
            fe.seek(0)
            out = fo.read().decode(errors="replace")
            err = fe.read().decode(errors="replace")
        return Result(proc.returncode, out, err, error)

    @staticmethod
    def _kill_session(sid: int) -> list[str]:
        """Kill whatever is left in session ``sid`` and describe it. The orphans come back
        to this process (the subreaper) and are reaped by :meth:`close`: reaping them
        here could steal the exit status of another thread's Popen."""
        found = []
        for p in psutil.process_iter(["cmdline", "status"]):
            if not _in_session(p.pid, sid) or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            found.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while found and time.monotonic() < deadline and any(
                _in_session(p.pid, sid) and p.info["status"] != psutil.STATUS_ZOMBIE
                for p in psutil.process_iter(["status"])):
            time.sleep(0.05)
        return found

    def close(self) -> None:
        for p in self.strays:
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.procs.close()
        _reap_zombie_children()

    def check(self, block: Block) -> None:
        for earlier in SH_BLOCKS:  # a home's blocks build on each other
            if earlier.group == block.group and earlier.index < block.index \
                    and earlier.index in self.results:
                try:
                    _judge(earlier, self.results[earlier.index])
                except AssertionError as exc:
                    raise AssertionError(f"an earlier block of the same home failed:\n{exc}"
                                         ) from None
        _judge(block, self.results[block.index])


def _judge(block: Block, r: Result) -> None:
    where = f"runbook.md:{block.line} ({block.section})"
    shown = f"\n--- block\n{block.code}--- stdout\n{r.out}--- stderr\n{r.err}"
    assert r.error is None, f"{where}: {r.error}{shown}"
    assert r.code == block.expect_exit, \
        f"{where}: exit status {r.code}, expected {block.expect_exit}{shown}"
    if block.expect_output == "":
        # A block that is expected to fail says why on stderr.
        said = r.out if block.expect_exit == 0 else r.out + r.err
        assert said.strip(), f"{where}: printed nothing{shown}"
    elif block.expect_output != "any":
        assert re.search(block.expect_output, r.out, re.MULTILINE), \
            f"{where}: stdout does not match {block.expect_output!r}{shown}"


def _in_session(pid: int, sid: int) -> bool:
    try:
        return os.getsid(pid) == sid
    except (ProcessLookupError, PermissionError):
        return False


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    root = tmp_path_factory.mktemp("runbook")
    adopted = _set_subreaper(True)
    runner = Runner(root, ProcGroup(root / "procs"))
    try:
        yield runner
    finally:
        runner.close()
        if adopted:
            _set_subreaper(False)


@pytest.fixture(scope="module")
def ran(runner: Runner, request: pytest.FixtureRequest) -> Runner:
    """Every selected block has run (all at once, homes in parallel)."""
    this = sys.modules[__name__]
    selected = [cast(Block, item.callspec.params["block"])
                for item in request.session.items
                if isinstance(item, pytest.Function) and item.module is this
                and item.originalname == "test_block"]
    runner.run_all(selected)
    return runner


# ---------------------------------------------------------------------------- tests
def test_runbook_blocks_are_well_formed() -> None:
    assert BLOCKS, f"{RUNBOOK} has no code blocks"
    known = EXECUTED_TAGS | SHOWN_TAGS | OUTPUT_TAGS
    for b in BLOCKS:
        assert b.tag in known, (f"runbook.md:{b.line}: fence tag {b.tag!r}: use sh (run by "
                                f"this test), console (shown only) or text/json (output)")
        assert b.section, f"runbook.md:{b.line}: a block before the first ## section"
    for b in SH_BLOCKS:
        assert b.variant in VARIANTS, f"runbook.md:{b.line}: unknown home variant {b.home!r}"
        if b.expect_output not in ("", "any"):
            re.compile(b.expect_output)
    commands = [b for b in BLOCKS if b.tag in EXECUTED_TAGS | SHOWN_TAGS]
    share = len(SH_BLOCKS) / len(commands)
    assert share >= MIN_EXECUTED_SHARE, (
        f"only {len(SH_BLOCKS)} of {len(commands)} command blocks ({share:.0%}) are executed;"
        f" at least {MIN_EXECUTED_SHARE:.0%} must be ```sh")


@pytest.mark.parametrize("block", SH_BLOCKS, ids=[b.test_id for b in SH_BLOCKS])
def test_block(ran: Runner, block: Block) -> None:
    missing = [cmd for cmd in block.requires if shutil.which(cmd) is None]
    if missing:
        pytest.skip(skip_reason(*missing))
    if block.index not in ran.results:
        ran.run_all([block])  # not collected up front (e.g. a re-run of one test)
    ran.check(block)


def _harness_lines(code: str) -> Iterator[list[str]]:
    """The argv of every `$ harness ...` command line of a console block (up to the first
    shell operator; continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", code)
    for line in text.splitlines():
        if not line.startswith("$ "):
            continue
        words = shlex.split(line[2:], comments=True)
        cut = next((i for i, w in enumerate(words) if w in ("|", "||", "&&", ";", ">", "&")),
                   len(words))
        words = words[:cut]
        if words and words[0] == "harness":
            yield words[1:]


def _parse_cli(argv: list[str]) -> dict[str, Any]:
    """Resolve ``harness ARGV`` through the real click tree without running it."""
    from daemons.cli import cli

    cmd: click.Command = cli
    args, name, parent = list(argv), "harness", None
    while True:
        ctx = cmd.make_context(name, args, parent=parent)
        if not isinstance(cmd, click.Group):
            return dict(ctx.params)
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        sub, found, args = cmd.resolve_command(ctx, rest)
        assert found is not None and sub is not None, f"no command in {argv}"
        cmd, name, parent = found, sub, ctx


def test_console_harness_commands_parse() -> None:
    checked = 0
    for b in BLOCKS:
        if b.tag not in SHOWN_TAGS:
            continue
        for argv in _harness_lines(b.code):
            try:
                _parse_cli(argv)
            except click.ClickException as exc:
                raise AssertionError(f"runbook.md:{b.line}: `harness {shlex.join(argv)}`: "
                                     f"{exc.format_message()}") from None
            checked += 1
    assert checked, "no `$ harness ...` line in a console block"


def test_runbook_covers_every_command_and_script() -> None:
    from daemons.cli import cli

    text = "\n".join(b.code for b in BLOCKS if b.tag in EXECUTED_TAGS | SHOWN_TAGS)
    names = cli.list_commands(click.Context(cli))  # includes the lazily loaded ones
    missing = [f"harness {name}" for name in names
               if not re.search(rf"\bharness (--home \S+ )?{re.escape(name)}\b", text)]
    missing += [f"scripts/{p.name}" for p in sorted((REPO / "scripts").glob("*.sh"))
                if f"scripts/{p.name}" not in text]
    assert not missing, f"the runbook never runs or shows: {', '.join(missing)}"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^a-z0-9 -]", "", text).replace(" ", "-")


def test_runbook_links_resolve() -> None:
    text = RUNBOOK.read_text()
    anchors = {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.MULTILINE)}
    local = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert local, "no in-page links"
    assert not local - anchors, f"links to missing sections: {sorted(local - anchors)}"
    for doc, anchor in re.findall(r"\]\(([a-z]+\.md)(?:#([^)]+))?\)", text):
        target = RUNBOOK.parent / doc
        assert target.exists(), f"link to missing {doc}"
        if anchor:
            theirs = {_anchor(m.group(1)) for m in
                      re.finditer(r"^#+ (.+)$", target.read_text(), re.MULTILINE)}
            assert anchor in theirs, f"link to missing section {doc}#{anchor}"


@needs("shellcheck")
def test_sh_blocks_pass_shellcheck() -> None:
    problems = []
    for b in SH_BLOCKS:
        proc = subprocess.run(["shellcheck", "--shell=bash", "--severity=warning",
                               "--format=gcc", "-"], input=b.code, capture_output=True,
                              text=True, timeout=60, check=False)
        if proc.returncode != 0:
            problems.append(f"runbook.md:{b.line}:\n{proc.stdout}{proc.stderr}")
    assert not problems, "\n".join(problems)
