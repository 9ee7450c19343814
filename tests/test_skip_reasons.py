"""Tests skip only where a tool is absent, and say so one way per tool: "needs TOOL (how
to get it)", from helpers.skip_reason (never a hand-written variant)."""

from __future__ import annotations

import re

from helpers import TESTS_DIR, TOOL_INSTALL, skip_reason

# A hand-written reason for a missing tool, in any of the wordings the suite used to have.
HAND_WRITTEN = re.compile(r"""(skip\(|reason=)\s*f?["'][^"']*(not installed|"""
                          r"""no systemd-analyze|needs (jq|flock|bash|shellcheck|strace|"""
                          r"""logrotate|chromium|systemd))""")


def test_one_wording_per_tool() -> None:
    assert skip_reason("jq") == "needs jq (apt install jq)"
    assert skip_reason("flock", "shellcheck") == ("needs flock (apt install util-linux); "
                                                  "needs shellcheck (apt install shellcheck)")
    for tool, how in TOOL_INSTALL.items():
        assert skip_reason(tool) == f"needs {tool} ({how})"


def test_no_test_writes_its_own_missing_tool_reason() -> None:
    found = []
    for path in sorted(TESTS_DIR.glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if HAND_WRITTEN.search(line):
                found.append(f"{path.name}:{number}: {line.strip()}")
    assert found == [], "use helpers.needs or helpers.skip_reason:\n" + "\n".join(found)
