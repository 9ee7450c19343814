"""The dashboard in a real browser: Debian's chromium driven by selenium and chromedriver.

``harness web`` runs as a real subprocess on a free loopback port against a tmp home. The
overview shows a task added through the CLI without a reload (Server-Sent Events, no
polling); a task is cancelled from its page with the token; a hostile description renders
as text. Screenshots are saved under test-artifacts/web/ (ignored by git).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from helpers import REPO_ROOT, ProcGroup, daemon_env, make_home, skip_reason

from coordination.paths import Home

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason=skip_reason(*(["chromium"] if CHROMIUM is None else []),
                       *(["chromedriver"] if CHROMEDRIVER is None else [])) or "")

TOKEN = "browser-test-token-0123456789abcdef"
HOSTILE = "<img src=x onerror=alert(1)>"
ARTIFACTS = REPO_ROOT / "test-artifacts" / "web"


def harness(home: Home, *args: str) -> str:
    exe = Path(sys.executable).with_name("harness")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "daemons"]
    proc = subprocess.run([*argv, "--home", str(home.root), *args], capture_output=True,
                          text=True, timeout=60, env=daemon_env(), check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture
def served(tmp_path: Path, procs: ProcGroup) -> Iterator[tuple[Home, str]]:
    home = make_home(tmp_path)
    exe = Path(sys.executable).with_name("harness")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "daemons"]
    child = procs.spawn("web", [*argv, "web", "--home", str(home.root),
                                "--listen", "127.0.0.1:0"],
                        env=daemon_env(HARNESS_WEB_TOKEN=TOKEN))
    line = child.wait_for_line("harness web: serving", timeout=60)
    url = line.split(" at ", 1)[1].split()[0].rstrip(";")
    yield home, url.rstrip("/")
    child.kill(signal.SIGTERM)  # open event streams end, the server shuts down cleanly ...
    stopped = time.monotonic()
    # ... and uvicorn then re-raises the signal, so the status says SIGTERM (which systemd
    # counts as a clean stop).
    assert child.wait(15) in (0, -signal.SIGTERM), child.stderr()
    assert time.monotonic() - stopped < 10
    assert "Traceback" not in child.stderr(), child.stderr()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    service = Service(executable_path=str(CHROMEDRIVER),
                      log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()  # stops chromium and chromedriver and waits for them


def shot(driver: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def wait_for(driver: Any, condition: Any, timeout: float, what: str) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.02).until(condition)
    except TimeoutException:
        shot(driver, f"timeout-{what.replace(' ', '-')}")
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def text_of(driver: Any, css: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return str(driver.find_element("css selector", css).text)
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def no_alert(driver: Any) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        driver.switch_to.alert  # noqa: B018 - raises when no alert is open
    except NoAlertPresentException:
        return True
    return False


def test_live_overview_cancel_and_escaping(served: tuple[Home, str], browser: Any) -> None:
    home, url = served
    browser.get(url + "/")
    wait_for(browser, lambda d: d.find_element("id", "conn").get_attribute("data-state")
             == "live", 15, "the event stream")
    assert text_of(browser, "#queued b") == "0"
    browser.execute_script("document.body.setAttribute('data-kept', 'yes')")
    shot(browser, "01-overview-empty")

    # A task added through the CLI shows up without a reload (the marker survives).
    task_id = harness(home, "task", "add", "-d", HOSTILE, "--", "true")
    added = time.monotonic()
    wait_for(browser, lambda d: text_of(d, "#queued b") == "1", 1.0,
             "the new task on the overview")
    latency = time.monotonic() - added
    assert browser.find_element("tag name", "body").get_attribute("data-kept") == "yes"
    (ARTIFACTS / "live-latency.json").write_bytes(orjson.dumps({"seconds": latency}))
    shot(browser, "02-overview-one-task")
    # Rendering reads the home but never wakes the feed again: no refresh loop. (The CLI's
    # later writes of the same command, e.g. its event line, may bring one more notice.)
    time.sleep(1.0)
    generation = browser.find_element("tag name", "html").get_attribute("data-live-generation")
    time.sleep(1.5)
    assert browser.find_element("tag name", "html").get_attribute(
        "data-live-generation") == generation

    # The hostile description is text, on the list and on the task's page.
    browser.get(url + "/tasks")
    row = f'tr[data-task-id="{task_id}"] td.desc'
    wait_for(browser, lambda d: text_of(d, row) == HOSTILE, 10, "the task row")
    assert browser.find_elements("css selector", "#tasks img") == []
    assert no_alert(browser)
    shot(browser, "03-tasks-hostile-text")

    browser.get(f"{url}/tasks/{task_id}")
    assert text_of(browser, "#task-description") == HOSTILE
    assert browser.find_elements("css selector", "main img") == []
    assert no_alert(browser)
    wait_for(browser, lambda d: d.find_element("id", "conn").get_attribute("data-state")
             == "live", 15, "the event stream on the task page")

    # Cancel it from its page with the token.
    form = browser.find_element("css selector", 'form[data-action="cancel"]')
    form.find_element("name", "reason").send_keys("not needed")
    form.find_element("name", "token").send_keys(TOKEN)
    shot(browser, "04-task-before-cancel")
    form.find_element("css selector", "button[type=submit]").click()
    wait_for(browser, lambda d: "done=cancel" in d.current_url, 10, "the redirect")
    wait_for(browser, lambda d: text_of(d, "#task-status") == "cancelled", 10,
             "the cancelled status")
    shot(browser, "05-task-cancelled")
    shown = orjson.loads(harness(home, "task", "show", task_id, "--json"))
    assert shown["status"] == "cancelled"
    assert no_alert(browser)


def test_wrong_token_is_refused_in_the_browser(served: tuple[Home, str], browser: Any) -> None:
    home, url = served
    task_id = harness(home, "task", "add", "-d", "keep me", "--", "true")
    browser.get(f"{url}/tasks/{task_id}")
    form = browser.find_element("css selector", 'form[data-action="cancel"]')
    form.find_element("name", "token").send_keys("not-the-token-0123456789")
    form.find_element("css selector", "button[type=submit]").click()
    wait_for(browser, lambda d: "wrong web token" in text_of(d, "#error-message"), 10,
             "the refusal")
    shot(browser, "06-wrong-token")
    assert orjson.loads(harness(home, "task", "show", task_id, "--json"))["status"] == "queued"
    assert os.path.exists(ARTIFACTS / "06-wrong-token.png")

    # The event stream page grows live; an event's message is text too.
    browser.get(f"{url}/events")
    wait_for(browser, lambda d: d.find_element("id", "conn").get_attribute("data-state")
             == "live", 15, "the event stream on the events page")
    harness(home, "events", "emit", "--type", "deploy_started", "--message", f"go {HOSTILE}")
    wait_for(browser, lambda d: f"go {HOSTILE}" in text_of(d, "#events tbody tr"), 5,
             "the new event at the top")
    assert browser.find_elements("css selector", "#events img") == []
    assert no_alert(browser)
    shot(browser, "07-events-live")
