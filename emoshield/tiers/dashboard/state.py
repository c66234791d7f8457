"""What the edge's dashboard shows and who may see it, without any HTTP: admin sessions (cookie
values kept only as sha256, each with its own CSRF token and a fixed expiry), a per-IP limit on
failed logins, the live feed of device heartbeats (the timeline's source: counts of faces per
emotion, never images), job progress read from the job's log, and the bundles' headline
figures from their signed manifests."""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

from ..wire import finite

SESSION_SECONDS = 8 * 3600.0
MAX_SESSIONS = 64  # the oldest is ended when a 65th logs in
LOGIN_FAILURES = 10  # failed logins per client IP within LOGIN_WINDOW before it is answered 429
LOGIN_WINDOW = 60.0
MAX_TRACKED_CLIENTS = 1024
TIMELINE_INTERVALS = 120  # heartbeats kept per device for a page that connects later
MIN_HEARTBEAT_GAP = 0.2  # seconds: a device heartbeating faster has the extra ones left out of the feed
MAX_EMOTIONS = 32  # labels a heartbeat's emotion counts may name
MAX_LABEL = 32
MAX_COUNT = 1_000_000  # faces of one emotion in one interval
MAX_TOTAL = 2**53  # running totals (frames, faces since start: a camera passes a million in hours)
MAX_STREAMS = 16  # event streams open at once, all sessions together
MAX_STREAMS_PER_SESSION = 4  # a few tabs; one session cannot take every slot
CLAIM_WITHIN = 10.0  # seconds a reserved stream slot waits for its stream to start
LOG_TAIL_BYTES = 65_536
LOG_TAIL_LINES = 20
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+) ")
STEP_LINE = re.compile(r"^\[[0-9:]+\] \$ emoshield (\w+)")
# what share of a job each step's start stands for on its progress bar (training gets the rest by epoch)
STEP_PROGRESS = {"evaluate": 0.85, "bundle": 0.92}
ATTACK_ORDER = ("fgsm", "rfgsm", "pgd", "apgd", "autoattack")
# the report's names (emoshield.attacks.registry.LABELS, not imported: it pulls in torch)
ATTACK_LABELS = {"clean": "Clean", "fgsm": "FGSM", "rfgsm": "R+FGSM", "pgd": "PGD", "apgd": "APGD-CE",
                 "apgdt": "APGD-T", "fabt": "FAB-T", "square": "Square", "autoattack": "AutoAttack"}


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


MAX_PENDING_TOKENS = 8  # devices enrolled in one session whose tokens were not shown yet


@dataclass
class Session:
    csrf: str
    created: float
    expires: float
    # what the next GET /dashboard/enrolled shows once (new devices' tokens): post, redirect, get, so
    # reloading that page never enrols another device; a list, so two enrolments at once (a double
    # click, two tabs) each show their token
    pending: list[dict] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def has_room(self) -> bool:
        with self._lock:
            return len(self.pending) < MAX_PENDING_TOKENS

    def add_pending(self, enrolled: dict) -> None:
        with self._lock:
            self.pending.append(enrolled)

    def take_pending(self) -> list[dict]:
        """The tokens not shown yet, each handed out once."""
        with self._lock:
            taken, self.pending = self.pending, []
        return taken


class Sessions:
    """Logged-in admins, in memory (an edge restart logs everyone out). The cookie value is a
    random 256-bit token; only its sha256 is kept, so a memory dump shows no usable cookie."""

    def __init__(self, seconds: float = SESSION_SECONDS, max_sessions: int = MAX_SESSIONS):
        if not 0 < seconds <= 30 * 86400:
            raise ValueError("a dashboard session lasts between 1 second and 30 days")
        self.seconds, self.max_sessions = seconds, max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def create(self) -> tuple[str, Session]:
        cookie, now = secrets.token_urlsafe(32), time.time()
        session = Session(csrf=secrets.token_urlsafe(32), created=now, expires=now + self.seconds)
        with self._lock:
            self._sessions[_digest(cookie)] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return cookie, session

    def get(self, cookie: str | None) -> Session | None:
        if not cookie or len(cookie) > 128:
            return None
        key = _digest(cookie)
        with self._lock:
            session = self._sessions.get(key)
            if session is not None and session.expires <= time.time():
                del self._sessions[key]
                return None
            return session

    def end(self, cookie: str | None) -> None:
        if cookie and len(cookie) <= 128:
            with self._lock:
                self._sessions.pop(_digest(cookie), None)

    def check_csrf(self, session: Session, value: object) -> bool:
        return isinstance(value, str) and secrets.compare_digest(value.encode(), session.csrf.encode())


class LoginLimiter:
    """At most LOGIN_FAILURES failed logins per client address per LOGIN_WINDOW seconds; the
    admin token is long and random, this only keeps a guessing client from costing CPU."""

    def __init__(self, failures: int = LOGIN_FAILURES, window: float = LOGIN_WINDOW,
                 max_clients: int = MAX_TRACKED_CLIENTS):
        self.failures, self.window, self.max_clients = failures, window, max_clients
        self._seen: OrderedDict[str, deque] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque:
        times = self._seen.setdefault(client, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        return times

    def blocked(self, client: str) -> bool:
        with self._lock:
            return len(self._recent(client, time.monotonic())) >= self.failures

    def failed(self, client: str) -> None:
        with self._lock:
            self._recent(client, time.monotonic()).append(time.monotonic())
            self._seen.move_to_end(client)
            while len(self._seen) > self.max_clients:
                self._seen.popitem(last=False)


def _count(value: object, high: int = MAX_COUNT) -> int | None:
    return value if type(value) is int and 0 <= value <= high else None


def _total(value: object) -> int | None:
    return _count(value, MAX_TOTAL)


class StreamSlots:
    """Open event streams, bounded in all (`limit`) and per session (`per_session`). A slot is
    taken when the request is answered, before its stream starts (so a burst of requests cannot
    all pass the check); a slot whose stream never started (the client left first) is reclaimed
    after `claim_within` seconds."""

    def __init__(self, limit: int = MAX_STREAMS, per_session: int = MAX_STREAMS_PER_SESSION,
                 claim_within: float = CLAIM_WITHIN):
        self.limit, self.per_session, self.claim_within = limit, per_session, claim_within
        self._slots: dict[object, list] = {}  # ticket -> [session key, reserved at, started]
        self._lock = threading.Lock()

    def reserve(self, session_key: str) -> object | None:
        now = time.monotonic()
        with self._lock:
            for ticket, (_, reserved, started) in list(self._slots.items()):
                if not started and now - reserved > self.claim_within:
                    del self._slots[ticket]
            mine = sum(key == session_key for key, _, _ in self._slots.values())
            if len(self._slots) >= self.limit or mine >= self.per_session:
                return None
            ticket = object()
            self._slots[ticket] = [session_key, now, False]
            return ticket

    def claim(self, ticket: object) -> bool:
        """Mark the stream started; False when its slot was reclaimed meanwhile."""
        with self._lock:
            slot = self._slots.get(ticket)
            if slot is not None:
                slot[2] = True
            return slot is not None

    def release(self, ticket: object) -> None:
        with self._lock:
            self._slots.pop(ticket, None)

    def __len__(self) -> int:
        return len(self._slots)


def emotion_counts(value: object) -> dict[str, int] | None:
    """A heartbeat's faces-per-emotion counts, or None when any part does not fit (all or nothing:
    a half-kept interval would draw a false timeline)."""
    if not isinstance(value, dict) or len(value) > MAX_EMOTIONS:
        return None
    counts = {}
    for label, count in value.items():
        if (not isinstance(label, str) or not 0 < len(label) <= MAX_LABEL or not label.isprintable()
                or _count(count) is None):
            return None
        counts[label] = count
    return counts


def heartbeat_event(device_id: str, telemetry: dict, now: float) -> dict:
    """The timeline's view of one heartbeat the store accepted: only fields of known shape."""
    version = telemetry.get("version")
    return {"device": device_id, "time": now, "version": version if _count(version) is not None else None,
            "fps": finite(telemetry.get("fps")), "faces_now": _count(telemetry.get("faces_now")),
            "interval": finite(telemetry.get("interval"), 0.0, 86400.0),
            "emotions": emotion_counts(telemetry.get("emotions"))}


class LiveFeed:
    """Heartbeats as numbered events: the last TIMELINE_INTERVALS per device, so a page that
    connects later draws the recent past at once and a reconnecting one (Last-Event-ID) misses
    nothing still kept. Written from the MQTT thread, read by the event streams."""

    def __init__(self, per_device: int = TIMELINE_INTERVALS, min_gap: float = MIN_HEARTBEAT_GAP):
        self.per_device, self.min_gap = per_device, min_gap
        self._events: dict[str, deque] = {}
        self._last: dict[str, float] = {}  # when each device's last event was kept (monotonic)
        self._seq = 0
        self._lock = threading.Lock()

    @property
    def last_id(self) -> int:
        return self._seq

    def publish(self, device_id: str, telemetry: dict) -> int | None:
        """The new event's id, or None when the device sent its previous one under `min_gap` seconds
        ago (a flooding device costs every open page nothing)."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(device_id, -math.inf) < self.min_gap:
                return None
            self._last[device_id] = now
            self._seq += 1
            self._events.setdefault(device_id, deque(maxlen=self.per_device)).append(
                (self._seq, heartbeat_event(device_id, telemetry, time.time())))
            return self._seq

    def forget(self, device_id: str) -> None:
        with self._lock:
            self._events.pop(device_id, None)
            self._last.pop(device_id, None)

    def since(self, event_id: int) -> list[tuple[int, dict]]:
        with self._lock:
            if event_id >= self._seq:
                return []
            found = [e for events in self._events.values() for e in events if e[0] > event_id]
        return sorted(found, key=lambda e: e[0])


def read_tail(path: Path, max_bytes: int = LOG_TAIL_BYTES) -> str:
    """The last `max_bytes` of a text file ('' when missing), cut at a line start."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read(max_bytes)
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    return text.split("\n", 1)[1] if size > max_bytes and "\n" in text else text


def job_progress(job: dict, log_text: str) -> dict:
    """Where a job is, from its log: the step running (train, evaluate, bundle), the last epoch
    line, a 0-1 fraction for its bar, and the last LOG_TAIL_LINES lines."""
    lines = [line for line in log_text.splitlines() if line.strip()]
    step, epoch, epochs = None, None, None
    for line in lines:
        found = STEP_LINE.match(line)
        if found:
            step = found.group(1)
        found = EPOCH_LINE.match(line)
        if found:
            epoch, epochs = int(found.group(1)), int(found.group(2))
    if step is None and epoch is not None:  # a long training's log: its step line left the tail
        step = "train"
    if job["status"] == "finished":
        fraction = 1.0
    elif job["status"] == "queued" or step is None:
        fraction = 0.0
    elif step in STEP_PROGRESS:
        fraction = STEP_PROGRESS[step]
    else:
        fraction = 0.8 * (epoch / epochs if epoch and epochs else 0.0)
    return {"step": step, "epoch": epoch, "epochs": epochs, "fraction": round(fraction, 3),
            "tail": lines[-LOG_TAIL_LINES:]}


def robustness_headline(metrics: dict) -> list[dict]:
    """A manifest's robustness figures as rows (attack, eps, accuracy), attacks in a fixed order:
    clean first, then FGSM, R+FGSM, PGD, APGD, AutoAttack, others last."""
    figures = (metrics or {}).get("robustness") or {}
    rows = []
    for key, value in figures.items():
        accuracy = finite(value, 0.0, 1.0)
        if accuracy is None:
            continue
        attack, _, eps = str(key).partition("@")
        if finite(_number(eps), 0.0, 1.0) is None and eps:
            continue  # not an eps: left out, never a broken page
        rows.append({"attack": attack, "label": ATTACK_LABELS.get(attack, attack), "eps": eps or None,
                     "accuracy": accuracy})
    order = {name: i for i, name in enumerate(("clean", *ATTACK_ORDER))}
    return sorted(rows, key=lambda r: (order.get(r["attack"], len(order)), r["attack"], float(r["eps"] or 0)))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _mapping(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def bundle_summary(version: int, created: float | None, manifest: dict) -> dict:
    """One bundle's row on the dashboard, from its signed manifest."""
    metrics, training = _mapping(manifest.get("metrics")), _mapping(manifest.get("training"))
    return {"version": version, "created": finite(created, 0, 1e12), "name": _text(manifest.get("name")),
            "backbone": _text(_mapping(manifest.get("backbone")).get("name")),
            "protocol": _text(training.get("protocol")), "dataset": _text(training.get("dataset")),
            # every figure says what made it: faces' size, training length, seed, defense
            "input_size": _count(_mapping(manifest.get("preprocessing")).get("input_size"), 4096),
            "epochs": _count(training.get("epochs"), 100_000), "seed": _count(training.get("seed"), 2**63),
            "defended": bool(training.get("defense")) if "defense" in training else None,
            "test_images": _total(metrics.get("test_images")),
            "test_accuracy": finite(metrics.get("test_accuracy"), 0, 1),
            "int8_accuracy": finite(metrics.get("onnx_int8_accuracy"), 0, 1),
            "robustness": robustness_headline({"robustness": _mapping(metrics.get("robustness"))}),
            "per_class": [{"label": str(k)[:MAX_LABEL], "accuracy": finite(v, 0, 1)}
                          for k, v in list(_mapping(metrics.get("per_class_accuracy")).items())[:MAX_EMOTIONS]]}


def _text(value: object, limit: int = 80) -> str | None:
    return value[:limit] if isinstance(value, str) else None
