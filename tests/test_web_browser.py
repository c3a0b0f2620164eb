"""The monitoring page in a real headless Chromium (SQLite; live progress on PostgreSQL too).

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/test.sh`` installs them);
without them the test is skipped (failed with ``CI=true``). Set
``SQLRESULTS_WEB_SCREENSHOT=docs/monitoring.png`` to retake the screenshot in docs/usage.md
(``pytest tests/test_web_browser.py::test_monitoring_page``; it adds running tasks first).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery import group as celery_group

from tests.conftest import IN_CI, REDIS_URL, ROOT, Worker, client_app
from tests.test_web import HTML, put

uvicorn = pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from celery_sqlresults.web import app as web_app  # noqa: E402
from celery_sqlresults.web import create_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

#: The databases the page is driven on (each test its own: a browser is costly).
ON_SQLITE = pytest.mark.parametrize("db_kind", ["sqlite"])
#: The states the page's filter always offers, in its order.
STATE_ORDER = ["PENDING", "RECEIVED", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED"]


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    """Where the browser saves downloads."""
    path = tmp_path / "downloads"
    path.mkdir()
    return path


@pytest.fixture
def browser(tmp_path: Path, downloads: Path) -> Iterator[webdriver.Chrome]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        msg = "chromium/chromium-driver not installed (apt-get install chromium chromium-driver)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1400,900",
    ):
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def serve() -> Iterator[Callable[[Celery], str]]:
    """Run the app with uvicorn in a thread on a free 127.0.0.1 port; return its URL."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(app: Celery) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(create_app(app), log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{sock.getsockname()[1]}/"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def _wait(
    driver: webdriver.Chrome, what: Callable[[webdriver.Chrome], object], t: float = 10
) -> None:
    try:
        WebDriverWait(driver, t, poll_frequency=0.1).until(what)
    except TimeoutException:
        pytest.fail(f"timed out; page text:\n{driver.find_element(By.TAG_NAME, 'body').text}")


def _rows(driver: webdriver.Chrome) -> list[str]:
    """Task ids listed, read in one script (the list is redrawn while polling)."""
    script = "return [...document.querySelectorAll('#tasks tbody tr')].map(r => r.dataset.taskId)"
    return list(driver.execute_script(script))


def _text(driver: webdriver.Chrome, element_id: str) -> str:
    """An element's text; empty while the page redraws it (it is briefly not there)."""
    script = f"const e = document.getElementById('{element_id}'); return e ? e.innerText : ''"
    return str(driver.execute_script(script))


def _cells(driver: webdriver.Chrome, task_id: str) -> list[str]:
    """The texts of one task's row in the list, read in one script."""
    script = (
        "return [...document.querySelectorAll('#tasks tr[data-task-id=\"' + arguments[0] + "
        "'\"] td')].map(c => c.innerText)"
    )
    return [str(t) for t in driver.execute_script(script, task_id)]


def _click(driver: webdriver.Chrome, by: str, selector: str) -> None:
    """Click, retrying when a poll redrew the element between finding and clicking it."""
    for _ in range(20):
        try:
            driver.find_element(by, selector).click()
            return
        except StaleElementReferenceException:
            time.sleep(0.05)
    pytest.fail(f"could not click {selector}")


@ON_SQLITE
def test_monitoring_page(
    make_app: Callable[..., Celery],
    serve: Callable[[Celery], str],
    browser: webdriver.Chrome,
    downloads: Path,
) -> None:
    app = make_app(result_extended=True)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    for i in range(6):
        put(
            app,
            f"add-{i}",
            "SUCCESS",
            i * 2,
            date=now - timedelta(minutes=10 - i),
            name="proj.tasks.add",
            worker="w1@host",
            args=[i, i],
        )
    put(
        app,
        "fail-1",
        "FAILURE",
        {"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"},
        date=now - timedelta(minutes=3),
        date_started=now - timedelta(minutes=3, seconds=5),  # ran 5 s
        traceback='Traceback (most recent call last):\n  File "tasks.py", line 9\nValueError: boom',
        name="proj.tasks.parse",
        worker="w2@host",
        args=["input.csv"],
    )
    put(app, "html-1", "SUCCESS", HTML, date=now - timedelta(minutes=2), name="proj.tasks.render")
    started = now - timedelta(minutes=1)
    put(app, "run-1", "STARTED", None, date=started, date_started=started, name="proj.tasks.export")
    # A custom state, as update_state(state="PROGRESS", meta=…) stores it.
    put(
        app,
        "prog-1",
        "PROGRESS",
        {"done": 3},
        date=now,
        date_started=started,
        name="proj.tasks.etl",
    )
    big = "y" * (2 * web_app.DETAIL_VALUE_BYTES)  # over both bounds: previews, and a download
    put(app, "big-1", "SUCCESS", big, date=now - timedelta(minutes=11), name="proj.tasks.dump")
    app.GroupResult("batch-1", [app.AsyncResult(i) for i in ("add-1", "run-1", "later")]).save(
        backend=app.backend
    )

    browser.get(serve(app))
    # Counts per state, and the list.
    _wait(browser, lambda d: len(_rows(d)) == 11)
    counts = _text(browser, "counts")
    assert "SUCCESS 8" in counts and "FAILURE 1" in counts and "STARTED 1" in counts
    assert "PROGRESS 1" in counts

    # Running tasks show when they started and for how long they have run; others how long
    # they took.
    for task_id in ("run-1", "prog-1"):
        assert started.strftime("%Y-%m-%d %H:%M:%S") in _cells(browser, task_id)
        assert re.fullmatch(r"running \d+m \d\ds", _cells(browser, task_id)[5]), task_id
        assert _cells(browser, task_id)[6] == "\u2013", task_id  # not finished: no finish time
    assert _cells(browser, "fail-1")[5] == "5s"
    assert _cells(browser, "add-1")[5] == "\u2013"  # never STARTED (task_track_started off)

    # Filtering by state.
    Select(browser.find_element(By.ID, "f-state")).select_by_visible_text("FAILURE")
    _wait(browser, lambda d: _rows(d) == ["fail-1"])
    _click(browser, By.CSS_SELECTOR, '#counts button[data-state="FAILURE"]')
    _wait(browser, lambda d: len(_rows(d)) == 11)  # clicking the active state clears the filter

    # A custom state stored is offered by the filter (with Celery's own).
    options = [o.text for o in Select(browser.find_element(By.ID, "f-state")).options]
    assert options[:8] == ["any", *STATE_ORDER] and options[8:] == ["PROGRESS"]
    Select(browser.find_element(By.ID, "f-state")).select_by_visible_text("PROGRESS")
    _wait(browser, lambda d: _rows(d) == ["prog-1"])
    Select(browser.find_element(By.ID, "f-state")).select_by_visible_text("any")
    _wait(browser, lambda d: len(_rows(d)) == 11)

    # A task stored after the page opened shows up without a reload.
    put(app, "new-1", "SUCCESS", 42, date=datetime.now(timezone.utc).replace(tzinfo=None))
    _wait(browser, lambda d: "new-1" in _rows(d), t=8)
    _wait(browser, lambda d: "SUCCESS 9" in _text(d, "counts"))

    # The detail view of a running task, then of a failed one with its traceback.
    _click(browser, By.LINK_TEXT, "run-1")
    _wait(browser, lambda d: _text(d, "d-runtime").startswith("running "))

    # The detail view shows the traceback.
    _click(browser, By.LINK_TEXT, "fail-1")
    _wait(browser, lambda d: "ValueError: boom" in _text(d, "d-traceback"))
    assert '"input.csv"' in _text(browser, "d-args")

    # An HTML-bearing result is shown as text, never parsed.
    _click(browser, By.LINK_TEXT, "html-1")
    _wait(browser, lambda d: HTML in _text(d, "d-result"))
    assert browser.find_elements(By.ID, "pwn") == []
    assert browser.execute_script("return window.pwned === undefined")
    cell = "return document.querySelector('#tasks tr[data-task-id=\"html-1\"] td.result').innerText"
    assert str(browser.execute_script(cell)).startswith('<b id="pwn">')

    # A large result: a preview in the list and the detail, the whole value as a download.
    cell = "return document.querySelector('#tasks tr[data-task-id=\"big-1\"] td.result').innerText"
    assert str(browser.execute_script(cell)).startswith('"yyyy')
    _click(browser, By.LINK_TEXT, "big-1")
    _wait(browser, lambda d: "download whole" in _text(d, "d-result-cut"))
    assert "512.0 KB stored" in _text(browser, "d-result-cut")
    shown = _text(browser, "d-result")
    assert shown.startswith('"yyy') and shown.endswith(" …") and len(shown) < len(big)
    _click(browser, By.CSS_SELECTOR, "#d-result-cut button")
    saved = downloads / "big-1-result.bin"
    _wait(browser, lambda d: saved.exists() and saved.stat().st_size == len(big) + 2)
    assert saved.read_bytes() == b'"' + big.encode() + b'"'

    # The group view with its progress.
    browser.find_element(By.ID, "f-group").send_keys("batch-1")
    _click(browser, By.ID, "open-group")
    _wait(browser, lambda d: "1 / 3 done" in _text(d, "g-text"))
    assert browser.find_element(By.ID, "g-progress").get_attribute("value") == "1"
    put(app, "run-1", "SUCCESS", 1, date=datetime.now(timezone.utc).replace(tzinfo=None))
    _wait(browser, lambda d: "2 / 3 done" in _text(d, "g-text"), t=8)

    shot = os.environ.get("SQLRESULTS_WEB_SCREENSHOT")
    if shot:
        # The docs' picture: running tasks beside the finished ones, one with a progress bar.
        at = datetime.now(timezone.utc).replace(tzinfo=None)
        put(app, "run-2", "STARTED", None, date=at, date_started=at, name="proj.tasks.export")
        meta = {"current": 7, "total": 10}
        put(
            app, "prog-2", "PROGRESS", meta, date=at, date_started=started, name="proj.tasks.import"
        )
        _wait(browser, lambda d: _card(d, "prog-2").get("value") == 7, t=8)
        _wait(browser, lambda d: _card(d, "run-2").get("state") == "STARTED")
        browser.set_window_size(1800, 1050)  # the list beside the detail without wrapping
        _click(browser, By.LINK_TEXT, "fail-1")
        _wait(browser, lambda d: "ValueError: boom" in _text(d, "d-traceback"))
        browser.save_screenshot(str(ROOT / shot))


def _card(driver: webdriver.Chrome, task_id: str) -> dict[str, object]:
    """One running task's card: its state, text and progress bar, read in one script."""
    script = (
        "const c = document.querySelector('#running-list .card[data-task-id=\"' + arguments[0]"
        " + '\"]'); if (!c) return {}; const p = c.querySelector('progress');"
        "return {state: c.dataset.state, text: c.innerText,"
        " value: p ? p.value : null, max: p ? p.max : null}"
    )
    return dict(driver.execute_script(script, task_id))


@pytest.mark.worker
@pytest.mark.parametrize("db_kind", ["sqlite", "postgresql"])  # polled, and notified
def test_live_progress(
    db_url: str,
    worker_factory: Callable[..., Worker],
    serve: Callable[[Celery], str],
    browser: webdriver.Chrome,
) -> None:
    """A worker task reporting progress three times is seen at each step, then done.

    The task waits for a go-ahead in Redis before each step, so each state lasts until
    the page has shown it. Polling is switched off (*live* unticked) once the task is
    shown: from then on only the event streams (the task's card, its group's view)
    can move the page.
    """
    worker = worker_factory(db_url)
    app = client_app(db_url, worker.queue)
    # A custom state whose meta is no count: shown raw.
    app.backend.store_result("stage-1", {"stage": "loading <b>"}, "LOADING")
    key = f"go-{uuid.uuid4().hex}"
    go = redis.Redis.from_url(REDIS_URL)
    batch = celery_group([app.signature("t.steps", (key, 3))]).apply_async()
    batch.save()
    result = batch.results[0]
    browser.get(serve(app) + f"#group/{batch.id}")

    _wait(browser, lambda d: _card(d, result.id).get("state") == "STARTED", t=30)
    _wait(browser, lambda d: "STARTED" in _text(d, "g-members"))
    # LOADING is seen as a custom state on the first refresh, and followed from the next.
    _wait(browser, lambda d: '"stage": "loading <b>"' in str(_card(d, "stage-1").get("text")))
    assert _card(browser, "stage-1")["state"] == "LOADING"
    _click(browser, By.ID, "f-live")  # no more polling
    assert not browser.find_element(By.ID, "f-live").is_selected()

    for step in (1, 2, 3):
        go.rpush(key, "go")
        _wait(browser, lambda d, n=step: _card(d, result.id).get("value") == n, t=30)
        card = _card(browser, result.id)
        assert card["state"] == "PROGRESS" and card["max"] == 3
        assert f"{step} / 3" in str(card["text"]) and "t.steps" in str(card["text"])
        _wait(browser, lambda d: "PROGRESS" in _text(d, "g-members"))  # its own stream
    go.rpush(key, "go")
    _wait(browser, lambda d: _card(d, result.id).get("state") == "SUCCESS", t=30)
    _wait(browser, lambda d: "1 / 1 done" in _text(d, "g-text"))
    assert result.get(timeout=30) == 3
