"""The edge node as an HTTP service: devices enrol and upload labelled faces; training jobs
(one worker, queued) fine-tune a backbone fetched from the cloud service and verified by
hash, with the perturbation-aware defense; each finished job publishes a signed bundle
with a higher version, which devices pull.

    POST /devices                 admin  {"name"} -> {"device_id", "token"}
    GET  /devices                 admin  enrolled devices (no tokens), last heartbeat and running version
    DELETE /devices/{id}          admin  revoke a device (its token is refused from the next request on)
    GET  /me                      device its id, the edge's name and MQTT broker (for announcements)
    POST /samples                 device multipart file (PNG/JPEG, <= max size) + label [+ subject tag]
    GET  /samples                 device that device's own samples only
    POST /jobs                    admin  queue a training job
    GET  /jobs, /jobs/{id}        admin  status; /jobs/{id}/log: the job's log text
    GET  /bundles/latest          device the newest bundle's manifest
    GET  /bundles/{v}/{file}      device a bundle file (manifest.json, manifest.sig, *.onnx, weights)
    GET  /metrics                 admin  Prometheus text format (emoshield.tiers.metrics)
    GET  /health
    GET  /, /login, /dashboard/*  the operator's web dashboard (emoshield.tiers.dashboard: a session
                                  cookie from a login with the admin token)

Tokens travel as `Authorization: Bearer T`; only their sha256 is stored. Metadata lives in a
SQL database (emoshield.tiers.store: SQLite in the edge's folder by default, or any SQLAlchemy
URL, e.g. PostgreSQL); image bytes in a content-addressed folder (cas/ab/cdef...), so file names
sent by devices are never used as paths. A job tests on people it never trained on when uploads
carry subject tags (see `evaluation_protocol`) and says which protocol it used. Training runs `emoshield train`,
`emoshield evaluate` (the robustness headline the bundle's signed manifest carries) and `emoshield bundle export`
as subprocesses, logging to jobs/<id>/log.txt. With a broker
(`--mqtt HOST:PORT`), each new bundle is announced as a retained MQTT message and device
heartbeats are recorded (emoshield.tiers.mqtt).
"""


import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..data.images import decode_image, image_size  # noqa: F401 - image_size re-exported
from ..errors import EmoshieldError, one_line
from .bundle import BUNDLE_FILES, MANIFEST, SIGNATURE, read_manifest, sha256_file
from .store import EdgeStore, hash_token
from .trust import TrustRepository, lifetimes_for
from .wire import MAX_VERSION, MIN_TOKEN_LENGTH, SUBJECT_PATTERN, RemoteValueError, parse_file_name, parse_sha256, parse_token

IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpg"}
SERVED_FILES = (MANIFEST, SIGNATURE, *BUNDLE_FILES)
MULTIPART_OVERHEAD = 16_384  # bytes a multipart upload may add around its image (boundaries, label)
MAX_BACKBONE_BYTES = 2_000_000_000
MIN_SUBJECTS = 3  # tagged subjects a job needs to hold whole people out (train, validation, test)
MIN_HEARTBEAT_GAP = 0.05  # seconds: a device's heartbeats closer than this are dropped before the store


def valid_device_name(name: object) -> bool:
    """1-64 printable characters (no control, format or bidi-override characters)."""
    return isinstance(name, str) and 0 < len(name) <= 64 and name.isprintable()


class UploadError(EmoshieldError):
    """An upload the edge refuses; `status` is the HTTP status it answers with."""

    status = 415


class UploadTooLarge(UploadError):
    status = 413


try:  # the request body model must live at module level for FastAPI to resolve it
    from pydantic import BaseModel

    class Enrolment(BaseModel):
        name: str
except ImportError:  # pragma: no cover - pydantic comes with fastapi, which only the services need
    Enrolment = None


@dataclass
class EdgeConfig:
    """What an edge node trains and how it guards its inputs."""

    root: Path
    key: Path  # Ed25519 private key that signs bundles
    classes: list[str]
    cloud_url: str
    backbone: str  # library entry name on the cloud
    admin_token: str
    name: str = "edge"
    epochs: int = 10
    input_size: int = 48
    batch_size: int = 64
    defense: str = "fgsm:0.5,rfgsm:0.5"
    eps: float = 0.01
    extra_train_args: list[str] = field(default_factory=list)
    train_every: int = 0  # queue a job when this many new samples arrived (0 = only on request)
    max_upload_bytes: int = 2_000_000
    max_upload_pixels: int = 16_777_216  # 4096 x 4096: checked from the image header before decoding
    min_samples: int = 10
    database: str | None = None  # SQLAlchemy URL of the metadata store (None = SQLite in root)
    mqtt: str | None = None  # broker HOST:PORT for announcements and heartbeats (None = HTTP polling only)
    # the broker's dynamic-security admin (user, password): per-device MQTT accounts and ACLs
    mqtt_admin: tuple[str, str] | None = None
    # how long a signed TUF timestamp stays valid: a device whose edge stops re-signing (a freeze,
    # or a replayed old state) notices within this time; the node re-signs 8 times per lifetime
    timestamp_expiry: float = 86400.0
    # attacks each job's model is evaluated with at `eps` before export (the manifest's robustness
    # headline, shown on the dashboard); "" skips the evaluation
    eval_attacks: str = "fgsm,rfgsm,pgd"
    dashboard_session_seconds: float = 8 * 3600.0  # a dashboard login lasts this long


def check_image(data: bytes, max_bytes: int, max_pixels: int = 16_777_216) -> str:
    """The image kind (png/jpg) of an upload, or UploadError: size, type, declared pixel count
    (checked before decoding) and decodability."""
    if len(data) > max_bytes:
        raise UploadTooLarge(f"upload is {len(data)} bytes; the limit is {max_bytes}")
    kind = next((k for magic, k in IMAGE_MAGIC.items() if data.startswith(magic)), None)
    if kind is None:
        raise UploadError("upload is not a PNG or JPEG image")
    size = image_size(data)
    if size is None:
        raise UploadError(f"upload is a {kind.upper()} without a readable size header (truncated or malformed)")
    if size[0] * size[1] > max_pixels:
        raise UploadTooLarge(f"upload declares {size[0]}x{size[1]} pixels; the limit is {max_pixels} pixels")
    image = decode_image(data)
    if image is None or min(image.shape[:2]) < 16:
        raise UploadError("upload does not decode to an image of at least 16x16 pixels")
    return kind


STORAGE_FULL = "the edge cannot store uploads now (storage full); keep the face and retry later"
MAX_LOG_BYTES = 2_000_000  # GET /jobs/ID/log serves at most this tail of a job's log


BACKBONE_RETRY_SECONDS = 5.0  # the cloud's Retry-After while an entry is being replaced


class _BackboneChanged(EmoshieldError):
    """The weights fetched are not the ones the metadata named: the entry was replaced meanwhile."""


def fetch_backbone(cloud_url: str, name: str, cache: Path, timeout: float = 60,
                   deadline_s: float = 1800.0) -> tuple[dict, Path]:
    """Metadata and local weights file of a cloud library entry, verified by sha256. A cloud that
    answers slowly or not at all fails the job within `deadline_s` (the weights take most of it):
    the node's one job worker is never held by it. An entry being replaced (the cloud's 503, or
    weights that no longer match the metadata fetched a moment before) is asked for again, twice
    at most, while the deadline allows."""
    from .client import ServiceError

    deadline, tries = time.monotonic() + deadline_s, 1
    while True:
        try:
            return _fetch_backbone_once(cloud_url, name, cache, timeout, deadline)
        except (ServiceError, _BackboneChanged) as exc:
            replaced = isinstance(exc, _BackboneChanged) or exc.status == 503
            if not replaced or tries == 3 or time.monotonic() + BACKBONE_RETRY_SECONDS >= deadline:
                raise
            tries += 1
            time.sleep(BACKBONE_RETRY_SECONDS)


def _fetch_backbone_once(cloud_url: str, name: str, cache: Path, timeout: float, deadline: float) -> tuple[dict, Path]:
    from .client import download, request

    meta = request("GET", f"{cloud_url.rstrip('/')}/backbones/{name}", timeout=timeout,
                   deadline=min(deadline, time.monotonic() + 4 * timeout))
    if not isinstance(meta, dict) or meta.get("name") != name:
        raise EmoshieldError(f"cloud {cloud_url} answered backbone {name} with no metadata object of that entry")
    try:  # the digest names a file in our cache: it must be a digest, never a path
        digest = parse_sha256(meta.get("sha256"), f"backbone {name}'s sha256 from {cloud_url}")
        # the architecture goes on the training child's command line: a plain name, never an option
        parse_file_name(meta.get("backbone"), f"backbone {name}'s architecture from {cloud_url}")
    except RemoteValueError as exc:
        raise EmoshieldError(str(exc)) from None
    path = cache / f"{digest}.safetensors"
    if not path.is_file() or sha256_file(path) != meta["sha256"]:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        # cut off past MAX_BACKBONE_BYTES, nothing left behind on failure
        download(f"{cloud_url.rstrip('/')}/backbones/{name}/weights", tmp, timeout=timeout,
                 max_bytes=MAX_BACKBONE_BYTES, deadline=deadline)
        if sha256_file(tmp) != meta["sha256"]:
            tmp.unlink()
            raise _BackboneChanged(f"backbone {name} from {cloud_url} does not match its sha256 {meta['sha256'][:12]}")
        tmp.replace(path)
    return meta, path


class EdgeNode:
    """Store + job worker; the HTTP app is a thin shell over it."""

    def __init__(self, config: EdgeConfig, on_publish: Callable[[int, dict], None] | None = None):
        parse_token(config.admin_token, "admin token", MIN_TOKEN_LENGTH)  # refused before anything starts
        self.config = config
        self.store = EdgeStore(config.root, config.database)  # marks jobs a dead node left "running" failed
        from .dashboard.state import LiveFeed

        self.feed = LiveFeed()  # accepted heartbeats, for the dashboard's live timeline
        self._heartbeats_lock = threading.Lock()  # a heartbeat and a revoke never interleave
        # enrolment (its row, then its MQTT account) and revocation never interleave: a revoke landing
        # between the two would leave a revoked device an account on the broker
        self._accounts_lock = threading.Lock()
        self._last_heartbeat: dict[str, float] = {}
        self.on_publish = on_publish
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="edge-jobs", daemon=True)
        self.worker_fault: str | None = None  # the job worker's last fault while it retries (/health)
        self._unrecorded_failure: tuple[int, str, float] | None = None  # a job failure the store refused
        self._record_attempts = 0
        self._child: subprocess.Popen | None = None
        self._child_lock = threading.Lock()
        self.announcer = None
        self.trust = TrustRepository(config.root / "trust", lifetimes_for(config.timestamp_expiry))
        self.trust.check()  # no update repository, or its online keys gone: refuse to start
        self.trust.save_lifetimes()  # `emoshield trust rotate` signs with the node's lifetimes
        self._resigner = threading.Thread(target=self._keep_signed, name="edge-tuf", daemon=True)
        self._stop_orphans()

    def start(self) -> None:
        swept = self.store.sweep()  # what uploads cut short by a kill left in the image folder
        if swept:
            print(f"edge: removed {swept} partial or unreferenced image file(s) left by an earlier run",
                  file=sys.stderr, flush=True)
        if self.config.mqtt:
            from .mqtt import EdgeAnnouncer

            self.announcer = EdgeAnnouncer(self.config.mqtt, self.config.name, self.record_heartbeat,
                                           admin=self.config.mqtt_admin)
            if not self.announcer.start():
                print(f"edge: MQTT broker {self.config.mqtt} not reachable yet; retrying in the background "
                      "(devices poll meanwhile)", file=sys.stderr, flush=True)
            version = self.store.latest_version()
            if version:  # the broker may have lost its retained message (restart without persistence)
                self.announcer.announce(version, read_manifest(self.store.bundle_dir(version)))
        version = self.store.latest_version()
        if version and self.trust.latest_version() != version:  # the node died between recording and signing
            self._sign_bundle(version)
        self.trust.refresh()
        self._resigner.start()
        self._worker.start()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def record_heartbeat(self, device_id: str, telemetry: dict) -> bool:
        """Keep a device's heartbeat (the store drops what does not fit) and pass it to the live
        feed. A device flooding the broker costs one dictionary lookup per extra message."""
        now = time.monotonic()
        with self._heartbeats_lock:
            if now - self._last_heartbeat.get(device_id, -1e9) < MIN_HEARTBEAT_GAP:
                return False
            if not self.store.record_heartbeat(device_id, telemetry):
                return False
            if len(self._last_heartbeat) > 100_000:  # names of devices never enrolled do not get here
                self._last_heartbeat.clear()
            self._last_heartbeat[device_id] = now
            self.feed.publish(device_id, telemetry)
            return True

    def _sign_bundle(self, version: int) -> None:
        """List bundle `version`'s files in the TUF targets metadata and name it the newest."""
        folder = self.store.bundle_dir(version)
        self.trust.publish(version, folder, [MANIFEST, SIGNATURE, *read_manifest(folder)["files"]])

    def _keep_signed(self) -> None:
        """Re-sign TUF roles before they expire, for as long as the node runs."""
        interval = max(0.25, min(self.config.timestamp_expiry / 8, 300.0))
        while not self._stop.wait(interval):
            try:
                self.trust.refresh()
            except Exception as exc:  # noqa: BLE001 - disk full, a key file gone: retried, never a dead thread
                print(f"edge: cannot re-sign the update metadata ({exc.__class__.__name__}: {exc}); retrying "
                      "(devices report 'frozen' if this lasts past the timestamp's lifetime)", file=sys.stderr,
                      flush=True)

    def stop(self, grace: float = 10.0) -> None:
        """Stop the worker and the job it runs: the job's `emoshield` child (its own process
        group, so its workers too) gets SIGTERM, then SIGKILL after `grace` seconds; the job is
        recorded as failed. Nothing the node started outlives it."""
        if self._stop.is_set() and not self._worker.is_alive():
            return  # stopped already (the service's shutdown hook, then the CLI)
        self._stop.set()
        self._wake.set()
        with self._child_lock:
            child = self._child
        if child is not None:
            _stop_group(child.pid, grace, child)
        if self._worker.is_alive():
            self._worker.join(timeout=grace + 20)
        if self.announcer is not None:
            self.announcer.stop()

    def _stop_orphans(self) -> None:
        """Kill job children a node that died without stopping (SIGKILL, power loss) left running;
        they are found by the pid files their jobs write and checked to be our process groups."""
        for pid_file in (self.config.root / "jobs").glob("*/child.pid"):
            try:
                pid = int(pid_file.read_text())
                if os.getsid(pid) == pid and b"emoshield" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    _stop_group(pid, 5.0)
            except (OSError, ValueError):
                pass  # gone already, or not ours
            pid_file.unlink(missing_ok=True)

    def enrol(self, name: str) -> tuple[str, str]:
        """A new device id and token; with broker accounts, its MQTT account too."""
        with self._accounts_lock:  # a revoke of this id (listed on the dashboard already) waits for the grant
            device_id, token = self.store.enrol(name)
            if self.announcer is not None:
                self.announcer.grant_device(device_id, token)
        return device_id, token

    def revoke(self, device_id: str) -> bool:
        """Refuse the device from now on, over HTTP and (with broker accounts) MQTT."""
        with self._accounts_lock:
            with self._heartbeats_lock:
                if not self.store.revoke(device_id):
                    return False
                self.feed.forget(device_id)
            if self.announcer is not None:
                self.announcer.revoke_device(device_id)
        return True

    def queue_job(self, trigger: str) -> int:
        job_id = self.store.create_job(trigger)
        self._wake.set()
        return job_id

    def sample_added(self) -> int | None:
        """Queue a job when enough new samples arrived (train_every) and none is pending."""
        every = self.config.train_every
        job_id = self.store.queue_job_if_due("auto", every) if every else None
        if job_id is not None:
            self._wake.set()
        return job_id

    WORKER_RETRY_SECONDS = 5.0

    def _work(self) -> None:
        """The job worker. A fault outside a job (the database restarting or locked, a full disk)
        is printed, shown by /health and retried: the thread never ends before stop(), because a
        dead worker would leave every later job queued while the node looked healthy."""
        while not self._stop.is_set():
            try:
                self._next_job()
                self.worker_fault = None
            except Exception as exc:  # noqa: BLE001 - retried, never a dead thread
                self.worker_fault = one_line(exc)
                print(f"edge: job worker: {self.worker_fault}; retrying in {self.WORKER_RETRY_SECONDS:.0f} s",
                      file=sys.stderr, flush=True)
                self._stop.wait(self.WORKER_RETRY_SECONDS)

    def _next_job(self) -> None:
        """Record a failure the store refused last time, then run the next queued job (or wait)."""
        if self._unrecorded_failure is not None:
            self._record_failure()
        job_id = self.store.claim_next_job()
        if job_id is None:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            return
        try:
            self.run_job(job_id)
        except Exception as exc:  # a failed job is recorded, the node keeps serving
            self._unrecorded_failure = (job_id, one_line(exc, 300), time.time())
            try:
                self._log(job_id, f"failed: {exc}")
            except OSError:
                pass  # a full disk: the job's failure still goes to the store
            self._record_failure()

    def _record_failure(self) -> None:
        """Store the pending job failure. A database that is down raises (the worker retries until
        it is back); one that refuses what the record holds gets a plain text after 3 tries, so the
        job is not left 'running' (which would hold back every automatic job)."""
        from sqlalchemy.exc import OperationalError

        job_id, error, finished = self._unrecorded_failure
        try:
            self.store.update_job(job_id, status="failed", finished=finished, error=error)
        except OperationalError:
            raise
        except Exception:
            self._record_attempts += 1
            if self._record_attempts < 3:
                raise
            print(f"edge: job {job_id}'s error text could not be recorded; recording a plain one",
                  file=sys.stderr, flush=True)
            self.store.update_job(job_id, status="failed", finished=finished,
                                  error="failed (its error text was refused by the database; see the edge's log)")
        self._unrecorded_failure, self._record_attempts = None, 0

    def job_dir(self, job_id: int) -> Path:
        return self.config.root / "jobs" / str(int(job_id))

    def _log(self, job_id: int, text: str) -> None:
        folder = self.job_dir(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "log.txt", "a") as f:
            f.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")

    def _run(self, job_id: int, args: list[str]) -> None:
        """One `emoshield` step of a job as a child in its own session (process group), so stop()
        and a restarted node can end it with everything it started."""
        if self._stop.is_set():
            raise EmoshieldError("interrupted: the edge node is stopping")
        self._log(job_id, "$ emoshield " + " ".join(args))
        pid_file = self.job_dir(job_id) / "child.pid"
        with open(self.job_dir(job_id) / "log.txt", "a") as log, self._child_lock:
            self._child = subprocess.Popen([sys.executable, "-m", "emoshield", *args], stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
            pid_file.write_text(str(self._child.pid))
        try:
            returncode = self._child.wait()
        finally:
            with self._child_lock:
                self._child = None
            pid_file.unlink(missing_ok=True)
        if self._stop.is_set():
            raise EmoshieldError(f"interrupted: the edge node stopped during `emoshield {args[0]}`")
        if returncode != 0:
            raise EmoshieldError(f"`emoshield {args[0]}` exited with {returncode} (see the job log)")

    def run_job(self, job_id: int) -> dict:
        cfg, store = self.config, self.store
        samples = store.samples()
        if len(samples) < cfg.min_samples:
            raise EmoshieldError(f"{len(samples)} samples; a job needs at least {cfg.min_samples}")
        folder = self.job_dir(job_id)
        data = folder / "data"
        for s in samples:  # an ImageFolder whose file names are <subject>_<sha>
            target = data / s["label"] / f"{_subject_key(s)}_{s['sha256'][:16]}.{s['kind']}"
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                try:
                    os.link(store.cas_path(s["sha256"]), target)
                except OSError:
                    shutil.copyfile(store.cas_path(s["sha256"]), target)
        self._log(job_id, f"{len(samples)} samples from {len({s['device_id'] for s in samples})} device(s)")
        protocol, split_args = evaluation_protocol(samples)
        self._log(job_id, f"evaluation: {protocol['description']}")
        meta, weights = fetch_backbone(cfg.cloud_url, cfg.backbone, cfg.root / "backbones")
        self._log(job_id, f"backbone {meta['name']} ({meta['backbone']}) sha256 {meta['sha256'][:16]} verified")
        run_dir = folder / "run"
        self._run(job_id, ["train", "--dataset", "folder", "--data-root", str(data),
                           "--classes", ",".join(cfg.classes), *split_args,
                           "--backbone", meta["backbone"], "--weights", str(weights),
                           "--input-size", str(cfg.input_size), "--epochs", str(cfg.epochs),
                           "--batch-size", str(cfg.batch_size), "--defense", cfg.defense, "--eps", str(cfg.eps),
                           *cfg.extra_train_args, "--quiet", "--out", str(run_dir)])
        robustness = []
        if cfg.eval_attacks:
            self._run(job_id, ["evaluate", "--model", str(run_dir), "--attacks", cfg.eval_attacks,
                               "--eps", str(cfg.eps), "--out", str(folder / "robustness")])
            robustness = ["--robustness", str(folder / "robustness" / "robustness.json")]
        version = store.latest_version() + 1
        bundle = store.bundle_dir(version)
        if bundle.exists():
            shutil.rmtree(bundle)  # left by a job that died before recording it
        self._run(job_id, ["bundle", "export", "--model", str(run_dir), "--key", str(cfg.key), "--out", str(bundle),
                           "--version", str(version), "--name", cfg.name, "--calibration-images", "128", *robustness])
        manifest = read_manifest(bundle)
        store.add_bundle(version, job_id)
        self._sign_bundle(version)  # devices learn of it from the signed TUF metadata
        store.mark_samples_used(job_id, [s["id"] for s in samples])
        metrics = {k: manifest["metrics"].get(k) for k in ("test_accuracy", "onnx_int8_accuracy", "test_images")}
        metrics.update(protocol=protocol["protocol"], subjects=protocol["subjects"],
                       test_subjects=protocol.get("test_subjects"))
        store.update_job(job_id, status="finished", finished=time.time(), samples=len(samples), version=version,
                         metrics=metrics)
        self._tell_published(job_id, version, manifest, metrics)
        return manifest

    def _tell_published(self, job_id: int, version: int, manifest: dict, metrics: dict) -> None:
        """After a job is recorded finished: the job log, MQTT and the on_publish hook. Each only tells
        others, so a fault in one (a full disk, a broker gone, a hook's bug) is one line on stderr and
        neither stops the next nor turns the finished job into a failed one."""
        for step, tell in (("log", lambda: self._log(job_id, f"published bundle v{version}: {metrics}")),
                           ("announce", lambda: self.announcer and self.announcer.announce(version, manifest)),
                           ("on_publish", lambda: self.on_publish and self.on_publish(version, manifest))):
            try:
                tell()
            except Exception as exc:  # noqa: BLE001 - devices still learn of v{version} from TUF metadata
                print(f"edge: job {job_id} published v{version}; its {step} failed ({one_line(exc, 160)})",
                      file=sys.stderr, flush=True)


def _subject_key(sample: dict) -> str:
    """Who a sample shows, for the job's split: its tag ("s.<tag>") or, untagged, its device."""
    return f"s.{sample['subject']}" if sample.get("subject") else sample["device_id"]


def evaluation_protocol(samples: list[dict]) -> tuple[dict, list[str]]:
    """How a job holds out its test faces, and the `emoshield train` arguments for it.

    With subject tags from at least MIN_SUBJECTS people, whole people are held out (subject
    protocol, fold 0 of min(5, subjects) folds): the test accuracy then predicts what a camera
    measures on people the model never saw. Otherwise faces are split at random (reference
    protocol) and the same people can sit in train and test, which reads optimistic."""
    tagged = {s["subject"] for s in samples if s.get("subject")}
    subjects = {_subject_key(s) for s in samples}
    if len(tagged) >= MIN_SUBJECTS:
        folds = min(5, len(subjects))
        test = len(sorted(subjects)[::folds])
        return ({"protocol": "subject", "subjects": len(subjects), "test_subjects": test,
                 "description": f"subject protocol: the test faces show {test} of {len(subjects)} people, "
                                "none of them in training or validation"},
                ["--protocol", "subject", "--subject-pattern", r"^(.+)_[0-9a-f]{16}$", "--fold", "0",
                 "--folds", str(folds)])
    why = (f"only {len(tagged)} tagged subject(s), {MIN_SUBJECTS} needed" if tagged else "no subject tags")
    return ({"protocol": "reference", "subjects": len(tagged) or None,
             "description": f"reference protocol ({why}): random held-out faces; the same people may be in "
                            "training, so the test accuracy reads optimistic for new people"},
            ["--protocol", "reference"])


def _stop_group(pid: int, grace: float, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM to process group `pid`, SIGKILL once `grace` seconds have passed."""
    import signal

    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def create_app(node: EdgeNode, max_concurrent_decodes: int = 2):
    """The HTTP shell over `node`. Authentication comes before any body is read (the upload
    route parses its multipart body itself, after the token check, from a stream cut at the
    size limit), and image decoding runs on worker threads, at most `max_concurrent_decodes`
    at a time, so no upload stalls the event loop."""
    import asyncio
    from typing import Annotated

    from fastapi import Depends, FastAPI, Header, HTTPException, Request
    from fastapi import Path as PathParam
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
    from starlette.concurrency import run_in_threadpool

    store, cfg = node.store, node.config
    admin_sha256 = hash_token(parse_token(cfg.admin_token, "admin token", MIN_TOKEN_LENGTH))
    decodes = asyncio.Semaphore(max_concurrent_decodes)
    # no /docs or /redoc: their pages load scripts from a CDN, on the origin where the dashboard's
    # session cookie lives (the schema stays at /openapi.json)
    app = FastAPI(title="emoshield edge", description="Edge node: devices, samples, training jobs, bundles.",
                  version="1", docs_url=None, redoc_url=None)
    Id = Annotated[int, PathParam(ge=1, le=MAX_VERSION)]  # job ids and bundle versions alike
    from .metrics import CONTENT_TYPE_LATEST, EdgeMetrics, MetricsMiddleware

    metrics = EdgeMetrics(store)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(UploadError)
    async def upload_refused(request: Request, exc: UploadError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    from sqlalchemy.exc import OperationalError

    from .http import answer_503_while_the_database_is_down

    answer_503_while_the_database_is_down(app, "edge")  # a token check, a listing

    def bearer(authorization: str | None) -> str:
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401, "missing bearer token")
        try:
            return parse_token(authorization.removeprefix("Bearer "), "bearer token")
        except EmoshieldError:
            raise HTTPException(401, "malformed bearer token") from None

    def is_admin(token: str) -> bool:
        return secrets.compare_digest(hash_token(token), admin_sha256)

    def admin(authorization: str | None = Header(default=None)) -> None:
        if not is_admin(bearer(authorization)):
            raise HTTPException(403, "admin token required")

    def device(authorization: str | None = Header(default=None)) -> str:
        device_id = store.device_for(bearer(authorization))
        if device_id is None:
            raise HTTPException(403, "unknown device token")
        return device_id

    def device_or_admin(authorization: str | None = Header(default=None)) -> str:
        return "admin" if is_admin(bearer(authorization)) else device(authorization)

    from .dashboard import add_dashboard

    add_dashboard(app, node, is_admin, cfg.dashboard_session_seconds)

    @app.get("/health")
    def health() -> dict:
        """'degraded' while the job worker retries after a store or disk fault (the fault itself
        goes to the edge's stderr only: /health answers anyone, and a database error names hosts)."""
        if node.worker_fault:
            return {"status": "degraded", "name": cfg.name, "classes": cfg.classes,
                    "job_worker": "retrying after a fault (see the edge's log)"}
        return {"status": "ok", "name": cfg.name, "latest_version": store.latest_version(),
                "classes": cfg.classes}

    @app.get("/metrics", dependencies=[Depends(admin)], response_class=PlainTextResponse)
    def prometheus_metrics() -> Response:
        """Prometheus text format (scrape with the admin token as bearer): requests and latency per
        route, uploads accepted and refused by reason, devices online and their heartbeat age and
        version, jobs by state and duration, bundles published (emoshield.tiers.metrics)."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/devices", dependencies=[Depends(admin)])
    def enrol(body: Enrolment) -> dict:
        if not valid_device_name(body.name):
            raise HTTPException(422, "device name must be 1-64 printable characters")
        device_id, token = node.enrol(body.name)
        return {"device_id": device_id, "token": token}

    @app.get("/devices", dependencies=[Depends(admin)])
    def devices() -> list[dict]:
        return store.devices()

    @app.delete("/devices/{device_id}", dependencies=[Depends(admin)])
    def revoke(device_id: Annotated[str, PathParam(max_length=32, pattern=r"^d[0-9a-f]{12}$")]) -> dict:
        """Revoke a device: its token is refused from the next request on; its samples stay."""
        if not node.revoke(device_id):
            raise HTTPException(404, f"no device {device_id}")
        return {"revoked": device_id}

    @app.get("/me")
    def me(device_id: str = Depends(device)) -> dict:
        """What a device needs to join the edge's MQTT fan-out: its id, the edge's name, the broker."""
        known = store.device(device_id)
        if known is None:  # revoked between the token check and now
            raise HTTPException(403, "unknown device token")
        return {**known, "edge": cfg.name, "mqtt": cfg.mqtt,
                # "token": the broker knows this device as user <id> with its edge token as password
                "mqtt_auth": "token" if cfg.mqtt and cfg.mqtt_admin else None}

    async def bounded_body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise UploadTooLarge(f"request body declares {declared[:20]} bytes; the limit is {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise UploadTooLarge(f"request body is over the limit of {limit} bytes")
        return bytes(body)

    @app.post("/samples", openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["file", "label"],
                   "properties": {"file": {"type": "string", "format": "binary"},
                                  "label": {"type": "string", "enum": list(cfg.classes)},
                                  "subject": {"type": "string", "pattern": SUBJECT_PATTERN, "maxLength": 64}}}}}}})
    async def upload(request: Request, device_id: str = Depends(device)) -> dict:
        """A labelled face (PNG/JPEG, at most the edge's size and pixel limits), multipart fields
        `file` and `label`, and optionally `subject` (who it shows: 1-64 of A-Z a-z 0-9 . _ -,
        so jobs can test on people held out of training). The token is checked before a byte of
        the body is read."""
        from starlette.datastructures import UploadFile as StarletteUpload

        body = await bounded_body(request, cfg.max_upload_bytes + MULTIPART_OVERHEAD)

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HTTPException(422, "send the face as multipart/form-data fields file and label")
        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=4)
        except OSError as exc:  # a file part over 1 MB is spooled to a temporary file: the disk is full
            print(f"edge: cannot spool an upload ({one_line(exc, 160)})", file=sys.stderr, flush=True)
            raise HTTPException(507, STORAGE_FULL) from None
        except Exception as exc:  # starlette/python-multipart raise several types for malformed bodies
            raise HTTPException(422, f"malformed multipart body ({exc.__class__.__name__})") from None
        label, file = form.get("label"), form.get("file")
        if not isinstance(label, str) or not isinstance(file, StarletteUpload):
            raise HTTPException(422, "multipart fields file (an image) and label (text) are required")
        if label not in cfg.classes:
            raise HTTPException(422, f"label {label[:40]!r} is not one of {', '.join(cfg.classes)}")
        subject = form.get("subject")
        if subject is not None and (not isinstance(subject, str) or not re.fullmatch(SUBJECT_PATTERN, subject)):
            raise HTTPException(422, "subject is 1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or digit")
        data = await file.read(cfg.max_upload_bytes + 1)
        async with decodes:  # bounded: at most this many images in memory being decoded
            kind = await run_in_threadpool(check_image, data, cfg.max_upload_bytes, cfg.max_upload_pixels)
        try:
            sample = await run_in_threadpool(store.add_sample, device_id, data, label, kind, subject)
        except (OSError, OperationalError) as exc:  # a full disk or file-size limit; a database down or full
            if isinstance(exc, OperationalError) and "full" not in str(exc.orig):  # the driver's own message
                raise  # down: the app's OperationalError handler answers 503
            print(f"edge: cannot store an upload ({one_line(exc, 160)})", file=sys.stderr, flush=True)
            raise HTTPException(507, STORAGE_FULL) from None
        if sample is None:  # revoked while its body arrived: refused, nothing stored
            raise HTTPException(403, "unknown device token")
        try:  # the sample is stored: a fault here must not make the device send it again
            job = await run_in_threadpool(node.sample_added)
        except Exception as exc:  # noqa: BLE001
            print(f"edge: sample {sample['id']} stored; queueing a job failed ({one_line(exc, 160)})",
                  file=sys.stderr, flush=True)
            job = None
        return {**sample, "queued_job": job}

    @app.get("/samples")
    def samples(device_id: str = Depends(device)) -> list[dict]:
        return store.samples(device_id)

    @app.post("/jobs", dependencies=[Depends(admin)])
    def queue() -> dict:
        return {"job_id": node.queue_job("request")}

    @app.get("/jobs", dependencies=[Depends(admin)])
    def jobs() -> list[dict]:
        return store.jobs()

    @app.get("/jobs/{job_id}", dependencies=[Depends(admin)])
    def job(job_id: Id) -> dict:
        found = store.job(job_id)
        if found is None:
            raise HTTPException(404, f"no job {job_id}")
        return found

    @app.get("/jobs/{job_id}/log", dependencies=[Depends(admin)], response_class=PlainTextResponse)
    def job_log(job_id: Id) -> str:
        path = node.job_dir(job_id) / "log.txt"
        if store.job(job_id) is None or not path.is_file():
            raise HTTPException(404, f"no log for job {job_id}")
        with open(path, "rb") as f:  # the tail of a long log; bytes a child wrote that are not UTF-8 shown as U+FFFD
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - MAX_LOG_BYTES))
            text = f.read().decode("utf-8", errors="replace")
        return (f"[... the first {size - MAX_LOG_BYTES} bytes left out ...]\n" if size > MAX_LOG_BYTES else "") + text

    @app.get("/bundles/latest", dependencies=[Depends(device_or_admin)])
    def latest() -> dict:
        version = store.latest_version()
        if version == 0:
            raise HTTPException(404, "no bundle published yet")
        return {"version": version, "manifest": json.loads((store.bundle_dir(version) / MANIFEST).read_text())}

    @app.get("/tuf/{name}", dependencies=[Depends(device_or_admin)])
    def tuf_metadata(name: Annotated[str, PathParam(max_length=40)]):
        """TUF metadata for devices: timestamp.json, N.root.json, N.snapshot.json, N.targets.json."""
        path = node.trust.metadata_file(name)
        try:  # read whole: timestamp.json is replaced in place and old versions are collected
            data = path.read_bytes() if path is not None else None
        except OSError:
            data = None
        if data is None:
            raise HTTPException(404, f"no metadata file {name[:40]!r}")
        return Response(data, media_type="application/json")

    @app.get("/bundles/{version}/{name}", dependencies=[Depends(device_or_admin)])
    def bundle_file(version: Id, name: str):
        path = store.bundle_dir(version) / name
        if name not in SERVED_FILES or not path.is_file():
            raise HTTPException(404, f"no file {name[:40]!r} in bundle v{version}")
        return FileResponse(path, media_type="application/octet-stream")

    return app
