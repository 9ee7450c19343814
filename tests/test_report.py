"""``harness report``: the text summary and the self-contained HTML page (rendered by a real
headless Chromium where one is installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import Known, build_known_home, make_home, skip_reason

from coordination import clock
from coordination.events import emit
from coordination.metrics import take_snapshot
from coordination.store import append_line
from daemons.cli import cli
from daemons.reporting.report import html_report, line_chart

CHART_IDS = ("chart-queue", "chart-throughput", "chart-durations", "chart-workers",
             "chart-success")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def known(tmp_path: Path) -> Known:
    k = build_known_home(tmp_path)
    for i in range(30):
        take_snapshot(k.home, k.now - 29 * 60 + 60 * i)
    snap = take_snapshot(k.home, k.now + 60)
    # A hostile value: markup and a secret in a snapshot and in an alert.
    snap["health"]["reasons"] = ["<script>alert(1)</script> sk-ant-api03-abcdefghijklmnopqrst"]
    snap["timestamp"] = clock.iso(k.now + 120)
    append_line(k.home.metrics_file, snap, "none")
    emit(k.home, "disk_low", severity="warning",
         message='<img src="http://evil.example/x.png"> password=hunter2')
    return k


def _external_refs(page: str) -> list[str]:
    return re.findall(r"""(?:src|href|action|srcset|poster|data)\s*=\s*["']?\s*(?:https?:)?//""",
                      page, re.IGNORECASE)


def test_html_report_is_self_contained(known: Known) -> None:
    page = html_report(known.home)
    assert page.startswith("<!DOCTYPE html>")
    assert _external_refs(page) == []
    # The only URL is the alert's text, escaped (not an attribute of any element).
    assert page.replace("&lt;img src=&quot;http://evil.example", "").count("http") == 0
    assert "<link" not in page.lower() and "@import" not in page and "url(" not in page
    assert page.count("<script>") == 1  # the tiny inline script, nothing else
    assert "<script>alert" not in page
    assert "hunter2" not in page and "abcdefghijklmnopqrst" not in page
    assert "&lt;img src=" in page  # the alert's markup is escaped text
    for chart in CHART_IDS:
        assert f'id="{chart}"' in page
    assert page.count("<svg") == len(CHART_IDS)
    assert page.count('class="series"') >= 8  # every series of the charts has a line


def test_report_cli_writes_html_and_text(known: Known, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    runner = CliRunner()
    result = runner.invoke(cli, ["report", "--home", str(known.home.root), "--html", str(out)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("<!DOCTYPE html>")
    text = runner.invoke(cli, ["--home", str(known.home.root), "report"],
                         catch_exceptions=False)
    assert text.exit_code == 0
    assert "32 snapshots" in text.output and "tasks finished (all time): completed 2" \
        in text.output
    stdout = runner.invoke(cli, ["--home", str(known.home.root), "report", "--html", "-",
                                 "--limit", "5"], catch_exceptions=False)
    assert stdout.output.startswith("<!DOCTYPE html>") and "5</b>" in stdout.output
    as_json = runner.invoke(cli, ["--home", str(known.home.root), "report", "--json"],
                            catch_exceptions=False)
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    assert data["snapshots"] == 32 and data["tasks_total"]["completed"] == 2
    assert data["from"] <= data["to"] and data["now"]["health"] in (
        "healthy", "degraded", "unhealthy")


def test_report_without_snapshots(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    page = html_report(home)
    assert "No metrics snapshots" in page and page.count("no data") == len(CHART_IDS)
    result = CliRunner().invoke(cli, ["--home", str(home.root), "report"])
    assert result.exit_code == 0 and "no metrics snapshots" in result.output
    empty = CliRunner().invoke(cli, ["--home", str(home.root), "report", "--json"])
    assert empty.exit_code == 0
    data = json.loads(empty.output)
    assert data["snapshots"] == 0 and data["from"] is None and data["tasks_total"] == {}


def test_line_chart_breaks_lines_at_gaps_and_buckets_long_series() -> None:
    svg = line_chart("c", "t", [("a", "#000", [(0.0, 1.0), (60.0, 2.0), (120.0, None),
                                                (180.0, 3.0), (240.0, 4.0)])])
    assert svg.count("<polyline") == 2
    long = line_chart("c", "t", [("a", "#000", [(float(i), float(i % 7))
                                                for i in range(5000)])])
    points = re.search(r'points="([^"]+)"', long)
    assert points is not None and len(points.group(1).split()) <= 720


@pytest.mark.skipif(CHROMIUM is None, reason=skip_reason("chromium"))
def test_report_renders_in_headless_chromium_without_script_errors(known: Known,
                                                                   tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(html_report(known.home))
    profile = tmp_path / "chromium-profile"
    assert CHROMIUM is not None
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    assert "Uncaught" not in proc.stderr
    dom = proc.stdout
    assert 'data-report-ready="' in dom  # the inline script ran to its end
    for chart in CHART_IDS:
        assert f'id="{chart}"' in dom
    assert dom.count("<polyline") >= 8 and dom.count("<svg") == len(CHART_IDS)
