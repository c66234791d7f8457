"""Prometheus metrics of an edge node (GET /metrics, text exposition format).

Two kinds: what this process saw (requests and their latency per route, uploads accepted and
refused by reason), counted by an ASGI middleware that never reads a body; and the fleet's
state (devices enrolled and online, heartbeat age and running version per device, jobs by state
and their durations, bundles published), read from the metadata store at scrape time, so every
edge process sharing one database reports the same numbers. Label values come from fixed sets
(route templates, status classes), never from what a client sent, so a hostile client cannot
grow the series count."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

ONLINE_WITHIN_SECONDS = 60.0  # a device whose last heartbeat is younger counts as online
JOB_STATES = ("queued", "running", "finished", "failed")
JOB_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 3600, 7200)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# why an upload was refused, by the status it was answered with (the edge's own fixed set)
REFUSAL_REASONS = {400: "bad_request", 401: "no_token", 403: "unknown_device", 413: "too_large",
                   415: "not_an_image", 422: "invalid_fields", 429: "rate_limited"}

__all__ = ["CONTENT_TYPE_LATEST", "EdgeMetrics", "MetricsMiddleware"]


class EdgeMetrics:
    """The registry of one edge app (its own, so several apps in one process do not clash)."""

    def __init__(self, store, online_within: float = ONLINE_WITHIN_SECONDS):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Histogram("emoshield_http_request_duration_seconds", "HTTP request latency by route",
                                  ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.uploads = Counter("emoshield_uploads", "Face samples accepted", registry=self.registry)
        self.refused = Counter("emoshield_uploads_rejected", "Uploads refused, by reason", ["reason"],
                               registry=self.registry)
        for reason in sorted(set(REFUSAL_REASONS.values()) | {"server_error", "other"}):
            self.refused.labels(reason)  # every reason present from the start (rate() needs a zero)
        self.registry.register(_FleetCollector(store, online_within))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).observe(seconds)
        if method == "POST" and route == "/samples":
            if status == 200:
                self.uploads.inc()
            else:
                reason = REFUSAL_REASONS.get(status, "server_error" if status >= 500 else "other")
                self.refused.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI: times each HTTP request and labels it with its route template ('unmatched' for
    paths no route serves), its method (one of a fixed set) and its response status."""

    METHODS = {"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"}

    def __init__(self, app, metrics: EdgeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "") if scope.get("method") in self.METHODS else "other"
            self.metrics.observe(method, route, status[0], time.perf_counter() - started)


class _FleetCollector:
    """Devices, jobs and bundles as the store holds them now."""

    def __init__(self, store, online_within: float):
        self.store, self.online_within = store, online_within

    def describe(self):
        return []  # read at scrape time only (no store query when registering)

    def collect(self):
        now = time.time()
        devices = self.store.devices()
        seen = [d for d in devices if d.get("last_seen") is not None]
        yield GaugeMetricFamily("emoshield_devices_enrolled", "Devices enrolled", value=len(devices))
        yield GaugeMetricFamily("emoshield_devices_online",
                                f"Devices whose last heartbeat is under {self.online_within:g} s old",
                                value=sum(now - d["last_seen"] < self.online_within for d in seen))
        age = GaugeMetricFamily("emoshield_device_heartbeat_age_seconds", "Seconds since each device's last "
                                "heartbeat", labels=["device"])
        version = GaugeMetricFamily("emoshield_device_running_version", "Bundle version each device reports "
                                    "running", labels=["device"])
        for d in seen:
            age.add_metric([d["id"]], max(0.0, now - d["last_seen"]))
            if d.get("running_version") is not None:
                version.add_metric([d["id"]], d["running_version"])
        yield age
        yield version
        jobs = self.store.jobs()
        states = GaugeMetricFamily("emoshield_jobs", "Training jobs by state", labels=["state"])
        for state in JOB_STATES:
            states.add_metric([state], sum(j["status"] == state for j in jobs))
        yield states
        done = [j["finished"] - j["started"] for j in jobs
                if j["status"] in ("finished", "failed") and j.get("started") and j.get("finished")]
        buckets = [(f"{b:g}", sum(d <= b for d in done)) for b in JOB_BUCKETS] + [("+Inf", len(done))]
        duration = HistogramMetricFamily("emoshield_job_duration_seconds", "Wall time of ended training jobs")
        duration.add_metric([], buckets, sum_value=sum(done))
        yield duration
        latest = self.store.latest_version()
        yield CounterMetricFamily("emoshield_bundles_published", "Signed bundles published",
                                  value=self.store.bundle_count())
        yield GaugeMetricFamily("emoshield_bundle_latest_version", "Latest published bundle version", value=latest)
