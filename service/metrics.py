"""Every Prometheus object of the service (namespace ``imgserve_``), one registry per app.

Latencies and sizes are histograms (so p99 aggregates across pods); labels stay low-cardinality:
``route`` is the route template, per-model series carry ``model`` and ``version``.

With ``WORKERS`` > 1 (``service.workers``) prometheus-client runs in its multiprocess mode: every
value lives in a file under ``PROMETHEUS_MULTIPROC_DIR`` (chosen when the library is imported)
and ``/metrics`` from any process reads them all: counters and histograms summed, gauges as
their ``multiprocess_mode`` says. The process metrics then come from every live service process,
labelled ``worker`` (its index), read from ``/proc`` by prometheus-client's own collector; the GC
collector describes only the answering process and is left out; the GPU memory gauges hold
each process's figure as of its last ``/metrics`` answer. A series cannot be removed from the
files, so ``/metrics`` leaves out an unloaded version's series, as one process does after
removing them (registered again, its counters go on from where they were).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

NAMESPACE = "imgserve"
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
MV = ("model", "version")
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when imported
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "MetricsMiddleware"]


class Metrics:
    """The service's metrics, registered in their own ``CollectorRegistry``.

    ``process_pids``: with ``WORKERS``, the pid of every service process by index (read at each
    scrape), whose process metrics ``/metrics`` shows.
    """

    def __init__(self, process_pids: Callable[[], dict[int, int]] | None = None) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_DIR_ENV))
        self.process_pids = process_pids
        self.unloaded: set[tuple[str, str]] = set()  # multiprocess: (model, version) left out
        self.registry = registry = CollectorRegistry(auto_describe=True)
        if not self.multiprocess:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

        def histogram(name: str, doc: str, labels: tuple[str, ...], buckets: tuple) -> Histogram:
            return Histogram(
                name, doc, labels, namespace=NAMESPACE, buckets=buckets, registry=registry
            )

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            return Counter(name, doc, labels, namespace=NAMESPACE, registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...], **kw: object) -> Gauge:
            return Gauge(name, doc, labels, namespace=NAMESPACE, registry=registry, **kw)

        self.http_requests = counter(
            "http_requests_total", "HTTP requests by route template and status",
            ("method", "route", "status"),
        )  # fmt: skip
        self.http_duration = histogram(
            "http_request_duration_seconds", "HTTP request latency (first byte in to last out)",
            ("method", "route"), LATENCY_BUCKETS,
        )  # fmt: skip
        self.request_duration = histogram(
            "request_duration_seconds", "End-to-end latency of inference requests per model",
            MV, LATENCY_BUCKETS,
        )  # fmt: skip
        self.queue_wait = histogram(
            "queue_wait_seconds", "Time an image waited in the batch queue", MV, LATENCY_BUCKETS
        )
        self.preprocess = histogram(
            "preprocess_seconds", "Decode + preprocess time of one image", MV, LATENCY_BUCKETS
        )
        self.forward = histogram(
            "forward_seconds", "Time of one batched forward pass", MV, LATENCY_BUCKETS
        )
        self.batch_size = histogram("batch_size", "Images per forward pass", MV, BATCH_BUCKETS)
        self.queue_depth = gauge(
            "queue_depth", "Images waiting in the batch queue", MV, multiprocess_mode="livesum"
        )
        self.images = counter("images", "Images accepted for inference", MV)
        self.rejected = counter(
            "rejected", "Requests refused or failed, by reason", (*MV, "reason")
        )
        self.predictions = counter("predictions", "Top-1 predictions by label", (*MV, "label"))
        self.confidence = histogram(
            "confidence", "Top-1 confidence of each prediction", MV, CONFIDENCE_BUCKETS
        )
        self.model_info = gauge(
            "model_info", "Loaded model versions (value 1)", (*MV, "arch", "device", "sha256"),
            multiprocess_mode="livemax",
        )  # fmt: skip
        self.model_load = gauge(
            "model_load_seconds", "Archive load + warm-up time of a version (load-to-ready)", MV,
            multiprocess_mode="livemax",
        )  # fmt: skip
        self.oom_splits = counter(
            "oom_splits", "Batches split in halves after running out of device memory", MV
        )
        self.gpu_allocated = gauge(
            "gpu_memory_allocated_bytes", "torch.cuda.memory_allocated per device", ("device",),
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.gpu_reserved = gauge(
            "gpu_memory_reserved_bytes", "torch.cuda.memory_reserved per device", ("device",),
            multiprocess_mode="livesum",
        )  # fmt: skip

    def forget_model(self, model: str, version: str) -> None:
        """Drop the per-version series of an unloaded model version."""
        if self.multiprocess:  # series live on in the files: zero the gauges, leave them out
            self.unloaded.add((model, version))
            for gauge in (self.queue_depth, self.model_load, self.model_info):
                for labels in _series_of(gauge, model, version):
                    gauge.labels(*labels).set(0)
            return
        for metric in (
            self.queue_wait, self.preprocess, self.forward, self.batch_size, self.queue_depth,
            self.images, self.request_duration, self.oom_splits, self.model_load, self.confidence,
        ):  # fmt: skip
            with contextlib.suppress(KeyError):
                metric.remove(model, version)
        for metric in (self.rejected, self.predictions, self.model_info):
            for labels in _series_of(metric, model, version):
                metric.remove(*labels)

    def model_loaded(self, model: str, version: str) -> None:
        """A version (again) in service: its series are shown."""
        self.unloaded.discard((model, version))

    def render(self) -> bytes:
        self._sample_gpu()
        if self.multiprocess:
            every_process = CollectorRegistry()
            every_process.register(_Without(MultiProcessCollector(None), self.unloaded))
            if self.process_pids is not None:
                every_process.register(_ProcessesOf(self.process_pids))
            PlatformCollector(registry=every_process)  # the interpreter's: the same in each
            return generate_latest(every_process)
        return generate_latest(self.registry)

    def _sample_gpu(self) -> None:
        import torch

        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        for index in range(torch.cuda.device_count()):
            name = f"cuda:{index}"
            self.gpu_allocated.labels(name).set(torch.cuda.memory_allocated(index))
            self.gpu_reserved.labels(name).set(torch.cuda.memory_reserved(index))


def _series_of(metric: Gauge | Counter, model: str, version: str) -> list[tuple[str, ...]]:
    """The label values of ``metric``'s series for one model version."""
    children = list(metric._metrics)  # noqa: SLF001 (no public way to list children)
    return [labels for labels in children if labels[:2] == (model, version)]


class _Without:
    """A collector's metrics without the series of the given (model, version) pairs."""

    def __init__(self, source: MultiProcessCollector, versions: set[tuple[str, str]]) -> None:
        self.source = source
        self.versions = versions

    def collect(self) -> Iterator[Metric]:
        for metric in self.source.collect():
            if self.versions:
                metric.samples = [
                    sample for sample in metric.samples
                    if (sample.labels.get("model"), sample.labels.get("version")) not in self.versions
                ]  # fmt: skip
            yield metric


class _ProcessesOf:
    """prometheus-client's process metrics of several processes, labelled ``worker``."""

    def __init__(self, pids: Callable[[], dict[int, int]]) -> None:
        self.pids = pids

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for worker, pid in sorted(self.pids().items()):
            # a process that is gone yields nothing (the collector skips what it cannot read)
            for metric in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                family = families.setdefault(
                    metric.name, Metric(metric.name, metric.documentation, metric.type)
                )
                for sample in metric.samples:
                    family.add_sample(sample.name, {**sample.labels, "worker": str(worker)},
                                      sample.value, sample.timestamp)  # fmt: skip
        yield from families.values()


class MetricsMiddleware:
    """Pure ASGI middleware counting HTTP requests by method, route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            method = scope.get("method", "GET")
            method = method if method in METHODS else "other"
            self.metrics.http_requests.labels(method, template, str(status)).inc()
            self.metrics.http_duration.labels(method, template).observe(time.perf_counter() - start)
