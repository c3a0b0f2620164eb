"""``GET /metrics``: the stored results in Prometheus' text format, through ``prometheus_client``.

A custom collector reads the table at each scrape (nothing is kept between
scrapes but the whole-table count, refreshed in the background): results per state and
task name, and histograms of queue wait and run time over the tasks that
finished within ``sqlresults_metrics_window``. Those are *gauge* histograms:
they describe a moving window, not counters since start-up, so Grafana reads
them with ``histogram_quantile`` directly, without ``rate()``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ..exceptions import one_line
from ..query import Durations, ResultQuery

__all__ = [
    "BUCKETS",
    "COUNT_TTL",
    "NEWEST",
    "ResultsCollector",
    "exposition",
    "registry_for",
]

#: Upper bounds (seconds) of the histograms' buckets: from a quick task's milliseconds
#: to an hour's backlog; ``+Inf`` is added.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
           900.0, 3600.0)  # fmt: skip
#: The most recent finished tasks the histograms read at one scrape: what bounds their
#: cost when the window holds more (docs/monitoring.md).
NEWEST = 100_000
#: Seconds the whole-table count per state and name is reused before it is counted again
#: (in the background): the one part of the metrics that reads every row
#: (docs/monitoring-benchmarks.md).
COUNT_TTL = 60.0
_PREFIX = "celery_sqlresults"
logger = logging.getLogger("celery_sqlresults.web")


class ResultsCollector(Collector):
    """Yield the metric families of the results ``query`` sees, read at each ``collect()``."""

    def __init__(self, query: ResultQuery, window: float) -> None:
        self.query = query
        self.window = window
        self._counted: tuple[float, dict[str | None, dict[str, int]]] | None = None
        self._refreshing = False
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        results = GaugeMetricFamily(
            f"{_PREFIX}_results",
            "Task results stored, by state and task name (name empty without result_extended).",
            labels=["state", "name"],
        )
        for name, counts in sorted(self._counts().items(), key=lambda kv: kv[0] or ""):
            for state, n in sorted(counts.items()):
                results.add_metric([state, name or ""], n)
        yield results
        yield GaugeMetricFamily(
            f"{_PREFIX}_window_seconds",
            "Seconds back from now whose finished tasks the duration histograms describe.",
            value=self.window,
        )
        recent = self.query.filter(since=timedelta(seconds=self.window))
        histograms = recent.durations(BUCKETS, NEWEST)
        yield _histogram(
            "queue_wait_seconds",
            "Seconds from publish (date_created) to start (date_started) of the tasks "
            "finished in the window; needs sqlresults_record_on_publish and task_track_started.",
            histograms["queue_wait"],
        )
        yield _histogram(
            "run_seconds",
            "Seconds from start (date_started) to done (date_done) of the tasks finished "
            "in the window; needs task_track_started.",
            histograms["run_time"],
        )

    def _counts(self) -> dict[str | None, dict[str, int]]:
        """The whole-table count: counted now the first time, then refreshed in the background.

        A scrape never waits for a recount: past :data:`COUNT_TTL` it gets the last
        count while a thread counts again, so the database counts the table at most
        once per :data:`COUNT_TTL` and a scrape costs the histograms' bounded reads.
        """
        with self._lock:
            counted, refreshing = self._counted, self._refreshing
            stale = counted is None or time.monotonic() - counted[0] >= COUNT_TTL
            if counted is not None and stale and not refreshing:
                self._refreshing = True
                threading.Thread(
                    target=self._recount, name="sqlresults-metrics", daemon=True
                ).start()
        if counted is None:
            return self._count()
        return counted[1]

    def _count(self) -> dict[str | None, dict[str, int]]:
        counts = self.query.stats(by_name=True)
        with self._lock:
            self._counted = (time.monotonic(), counts)
        return counts

    def _recount(self) -> None:
        try:
            self._count()
        except Exception as exc:  # the last count stays; the next scrape tries again
            logger.warning("metrics: counting the results failed: %s", one_line(exc))
        finally:
            with self._lock:
                self._refreshing = False


def _histogram(
    name: str, documentation: str, by_name: dict[str | None, Durations]
) -> GaugeHistogramMetricFamily:
    family = GaugeHistogramMetricFamily(f"{_PREFIX}_{name}", documentation, labels=["name"])
    for task, durations in sorted(by_name.items(), key=lambda kv: kv[0] or ""):
        buckets = [(_le(bound), float(n)) for bound, n in durations.buckets]
        buckets.append(("+Inf", float(durations.count)))
        family.add_metric([task or ""], buckets, gsum_value=durations.sum)
    return family


def _le(bound: float) -> str:
    """A bucket bound as Prometheus' clients write it (``1.0``, ``0.005``)."""
    return repr(float(bound))


def registry_for(query: ResultQuery, window: float) -> CollectorRegistry:
    """A registry of its own (not the process-wide default) holding only our collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ResultsCollector(query, window))
    return registry


def exposition(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The registry in the format the ``Accept`` header asks for, and its content type.

    Prometheus' text format (``generate_latest``) unless OpenMetrics is asked for, where
    gauge histograms have a type of their own.
    """
    encode, content_type = choose_encoder(accept)
    return encode(registry), content_type
