"""``GET /metrics`` in Prometheus' text format, parsed by prometheus_client, on each database."""

from __future__ import annotations

import re
import time
import uuid
import warnings
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from celery import Celery
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from celery_sqlresults.web import create_app
from celery_sqlresults.web import metrics as web_metrics
from tests.conftest import ROOT, Worker, client_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

QUEUE_WAIT = "celery_sqlresults_queue_wait_seconds"
RUN = "celery_sqlresults_run_seconds"


def scrape(
    app: Celery | TestClient, **options: Any
) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``/metrics`` parsed by prometheus_client: {sample name: {sorted labels: value}}."""
    client = (
        app
        if isinstance(app, TestClient)
        else TestClient(create_app(app, **options), base_url="http://localhost")
    )
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            out.setdefault(sample.name, {})[labels] = sample.value
    return out


def buckets(samples: dict[str, Any], metric: str, name: str) -> dict[str, float]:
    """The ``le`` buckets of one task name's histogram."""
    return {
        dict(labels)["le"]: value
        for labels, value in samples.get(f"{metric}_bucket", {}).items()
        if dict(labels)["name"] == name
    }


def store(app: Celery, task_id: str, state: str, name: str | None, **dates: datetime) -> None:
    row: dict[str, Any] = {
        "task_id": task_id,
        "status": state,
        "result": b"null",
        "traceback": None,
        "date_done": None,
        "name": name,
        **dates,
    }
    app.backend.store.store_task(row)


def now() -> datetime:
    """Now in whole seconds: MySQL's DATETIME (Celery's column type) keeps no fraction."""
    return datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)


@pytest.fixture
def app(make_app: Callable[..., Celery]) -> Celery:
    return make_app(result_extended=True)


def test_counts_and_buckets(app: Celery) -> None:
    """Counts cover the whole table; histograms what finished in the window, bucketed in SQL."""
    t = now()
    s = timedelta(seconds=1)
    # (queue wait, run time) in seconds, finished just now.
    for i, (wait, run) in enumerate([(0, 0), (3, 1), (100, 4000)]):
        done = t - s * i
        started = done - s * run
        store(app, f"a{i}", "SUCCESS", "p.add", date_created=started - s * wait,
              date_started=started, date_done=done)  # fmt: skip
    store(app, "f", "FAILURE", "p.mul", date_created=t - 3 * s, date_started=t - 2 * s,
          date_done=t)  # fmt: skip
    # Finished two hours ago: counted, but out of the default ten-minute window.
    old = t - timedelta(hours=2)
    store(app, "old", "SUCCESS", "p.add", date_created=old - 9 * s, date_started=old - 8 * s,
          date_done=old)  # fmt: skip
    store(app, "run", "PROGRESS", "p.add", date_created=t - s, date_started=t)  # not done
    store(app, "anon", "SUCCESS", None, date_done=t)  # no name, no start: no durations

    m = scrape(app)
    results = {tuple(v for _, v in k): n for k, n in m["celery_sqlresults_results"].items()}
    assert results == {
        ("p.add", "SUCCESS"): 4,
        ("p.add", "PROGRESS"): 1,
        ("p.mul", "FAILURE"): 1,
        ("", "SUCCESS"): 1,
    }
    assert m["celery_sqlresults_window_seconds"][()] == 600.0

    run = buckets(m, RUN, "p.add")
    assert run["0.005"] == 1 and run["0.5"] == 1 and run["1.0"] == 2
    assert run["3600.0"] == 2 and run["+Inf"] == 3
    wait = buckets(m, QUEUE_WAIT, "p.add")
    assert wait["0.005"] == 1 and wait["2.5"] == 1 and wait["5.0"] == 2
    assert wait["60.0"] == 2 and wait["300.0"] == 3 and wait["+Inf"] == 3
    assert m[f"{RUN}_gcount"][(("name", "p.add"),)] == 3
    assert m[f"{RUN}_gsum"][(("name", "p.add"),)] == pytest.approx(4001, abs=0.01)
    assert m[f"{QUEUE_WAIT}_gsum"][(("name", "p.add"),)] == pytest.approx(103, abs=0.01)
    assert buckets(m, RUN, "p.mul")["1.0"] == 0 and buckets(m, RUN, "p.mul")["2.5"] == 1
    assert not buckets(m, RUN, "")  # no start stored: nothing to measure
    values = [run[le] for le in sorted(run, key=lambda le: float(le))]
    assert values == sorted(values)  # cumulative


def test_window_setting_and_bound(make_app: Callable[..., Celery], monkeypatch: Any) -> None:
    """``sqlresults_metrics_window`` narrows the histograms; ``NEWEST`` bounds the rows read."""
    app = make_app(result_extended=True, sqlresults_metrics_window=60)
    t = now()
    for i, age in enumerate((1, 2, 3, 120)):  # seconds ago
        done = t - timedelta(seconds=age)
        store(app, f"w{i}", "SUCCESS", "p.w", date_created=done - timedelta(seconds=2),
              date_started=done - timedelta(seconds=1), date_done=done)  # fmt: skip
    m = scrape(app)
    assert m["celery_sqlresults_window_seconds"][()] == 60.0
    assert buckets(m, RUN, "p.w")["+Inf"] == 3
    monkeypatch.setattr(web_metrics, "NEWEST", 2)
    assert buckets(scrape(app), RUN, "p.w")["+Inf"] == 2


def results(client: TestClient) -> dict[tuple[str, ...], float]:
    counted = scrape(client).get("celery_sqlresults_results", {})
    return {tuple(v for _, v in k): n for k, n in counted.items()}


def test_counts_refresh_in_the_background(app: Celery, monkeypatch: Any) -> None:
    """The whole-table count is reused, then counted again while scrapes get the last one."""
    client = TestClient(create_app(app), base_url="http://localhost")
    store(app, "c1", "SUCCESS", "p.c", date_done=now())
    assert results(client) == {("p.c", "SUCCESS"): 1}
    store(app, "c2", "SUCCESS", "p.c", date_done=now())
    assert results(client) == {("p.c", "SUCCESS"): 1}  # within COUNT_TTL
    monkeypatch.setattr(web_metrics, "COUNT_TTL", 0.0)
    assert results(client) == {("p.c", "SUCCESS"): 1}  # the last count, while it recounts
    deadline = time.monotonic() + 30
    while results(client) != {("p.c", "SUCCESS"): 2}:
        assert time.monotonic() < deadline, "the count was never refreshed"
        time.sleep(0.05)


def test_empty_table(app: Celery) -> None:
    m = scrape(app)
    assert "celery_sqlresults_results" not in m  # a family without samples
    assert not buckets(m, RUN, "p.add")


def test_openmetrics_when_asked(app: Celery) -> None:
    """Prometheus asks for OpenMetrics first: there the histograms are gauge histograms."""
    t = now()
    store(app, "o", "SUCCESS", "p.o", date_created=t, date_started=t, date_done=t)
    client = TestClient(create_app(app), base_url="http://localhost")
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    answer = client.get("/metrics", headers={"Accept": accept})
    assert answer.headers["content-type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(answer.text)}
    assert families[RUN].type == "gaugehistogram"
    samples = {(s.name, s.labels.get("le")): s.value for s in families[RUN].samples}
    assert samples[(f"{RUN}_bucket", "+Inf")] == 1 and samples[(f"{RUN}_gcount", None)] == 1


def test_same_auth_as_the_api(app: Celery) -> None:
    client = TestClient(create_app(app, token="s3cret"), base_url="http://localhost")
    assert client.get("/metrics").status_code == 401
    answer = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
    assert answer.status_code == 200
    assert "celery_sqlresults_window_seconds" in answer.text


@pytest.mark.worker
def test_metrics_of_a_real_worker(db_url: str, worker_factory: Callable[..., Worker]) -> None:
    """Tasks run by a worker, published with record-on-publish: every one is measured."""
    worker = worker_factory(db_url)
    app = client_app(db_url, worker.queue, sqlresults_record_on_publish=True)
    sent = [app.signature("t.tracked", (i, i)).delay() for i in range(3)]
    assert [r.get(timeout=60) for r in sent] == [0, 2, 4]
    failed = app.signature("t.fail", (f"boom-{uuid.uuid4().hex[:6]}",)).delay()
    with pytest.raises(ValueError):
        failed.get(timeout=60)

    m = scrape(app)
    results = {tuple(v for _, v in k): n for k, n in m["celery_sqlresults_results"].items()}
    assert results == {("t.tracked", "SUCCESS"): 3, ("t.fail", "FAILURE"): 1}
    run = buckets(m, RUN, "t.tracked")
    assert run["+Inf"] == 3 and run["60.0"] == 3  # quick additions
    wait = buckets(m, QUEUE_WAIT, "t.tracked")
    assert wait["+Inf"] == 3  # published (date_created) then started (date_started)
    assert m[f"{QUEUE_WAIT}_gsum"][(("name", "t.tracked"),)] >= 0
    assert not buckets(m, RUN, "t.fail")  # not tracked: no start stored


def test_dashboard_reads_what_is_served(app: Celery) -> None:
    """Every metric docs/grafana-dashboard.json queries is one /metrics serves."""
    store(app, "d", "SUCCESS", "p.d", date_created=now(), date_started=now(), date_done=now())
    served = set(scrape(app))
    dashboard = (ROOT / "docs" / "grafana-dashboard.json").read_text()
    asked = set(re.findall(r"celery_sqlresults_\w+", dashboard))
    assert asked and asked <= served, asked - served
