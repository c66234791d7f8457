"""MQTT, the IoT convention for fan-out between an edge node and its devices.

The edge announces every new bundle as a *retained* message on `emoshield/<edge>/model`, so a
device that connects later still learns the current version at once, and thousands of devices
learn of an update without polling the edge's HTTP API. Devices publish heartbeats (running
version, frames, FPS) on `emoshield/<edge>/devices/<device>/heartbeat`; the edge records them.

An announcement is only a hint: the device still pulls the bundle over HTTP with its token and
verifies signature, hashes and version, so a forged message can at most cause a fetch. Without
a reachable broker, devices fall back to polling the edge (`device run --poll`).

Torch-free (paho-mqtt 2.x only), because devices import it.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

from ..errors import EmoshieldError
from .wire import parse_version

MAX_PAYLOAD = 8192  # bytes; heartbeats are under 4 KB, announcements under 1 KB
MODEL_TOPIC = "emoshield/{edge}/model"
HEARTBEAT_TOPIC = "emoshield/{edge}/devices/{device}/heartbeat"


def parse_broker(address: str) -> tuple[str, int]:
    """'mqtt://host:port', 'host:port' or 'host' (port 1883) -> (host, port)."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, _, port = rest.rstrip("/").rpartition(":") if ":" in rest else (rest, "", "1883")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise EmoshieldError(f"bad MQTT broker address {address!r}; expected HOST:PORT") from None


def _client(client_id: str):
    try:
        import paho.mqtt.client as mqtt
    except ImportError as exc:  # pragma: no cover - paho-mqtt is a dependency
        raise EmoshieldError("MQTT needs paho-mqtt (pip install 'paho-mqtt>=2,<3')") from exc
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)


class _Link:
    """One paho client with its network loop on a background thread; reconnects by itself."""

    def __init__(self, broker: str, client_id: str):
        self.host, self.port = parse_broker(broker)
        self.client = _client(client_id)
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.subscriptions: list[str] = []

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return
        for topic in self.subscriptions:  # (re)subscribe on every connect
            client.subscribe(topic, qos=1)
        self.connected.set()

    def start(self, wait: float = 5.0) -> bool:
        """Connect in the background; True when connected within `wait` seconds (the link
        keeps retrying either way)."""
        try:
            self.client.connect_async(self.host, self.port, keepalive=30)
        except OSError:
            return False
        self.client.loop_start()
        return self.connected.wait(wait)

    def publish(self, topic: str, payload: dict, retain: bool = False, wait: float = 0.0) -> None:
        """QoS 1 publish; `wait` > 0 blocks until the broker acknowledged it (or that many seconds)."""
        info = self.client.publish(topic, json.dumps(payload, sort_keys=True), qos=1, retain=retain)
        if wait > 0 and self.connected.is_set():
            try:
                info.wait_for_publish(timeout=wait)
            except (RuntimeError, ValueError):
                pass  # dropped (disconnected meanwhile): heartbeats are best effort

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class EdgeAnnouncer(_Link):
    """The edge's side: announce bundles (retained), collect heartbeats."""

    def __init__(self, broker: str, edge: str, on_heartbeat: Callable[[str, dict], None]):
        super().__init__(broker, f"emoshield-edge-{edge}")
        self.edge = edge
        self.subscriptions = [HEARTBEAT_TOPIC.format(edge=edge, device="+")]
        self.dropped, self.last_drop = 0, ""
        self.client.on_message = lambda client, userdata, message: self._heartbeat(message, on_heartbeat)

    def _heartbeat(self, message, on_heartbeat: Callable[[str, dict], None]) -> None:
        """Record one heartbeat. Nothing a client sends may end paho's loop thread (it would
        silently stop every later heartbeat and announcement): any failure drops the message."""
        try:
            if len(message.payload) > MAX_PAYLOAD:
                raise ValueError(f"{len(message.payload)} bytes")
            device = message.topic.split("/")[-2]
            payload = json.loads(message.payload)
            if isinstance(payload, dict):
                on_heartbeat(device, payload)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            self.dropped += 1
            self.last_drop = f"{exc.__class__.__name__}: {str(exc)[:120]}"

    def announce(self, version: int, manifest: dict) -> None:
        self.publish(MODEL_TOPIC.format(edge=self.edge),
                     {"version": int(version), "name": manifest.get("name"), "created": manifest.get("created"),
                      "announced": time.time()}, retain=True)


class DeviceLink(_Link):
    """The device's side: learn the newest announced version, send heartbeats."""

    def __init__(self, broker: str, edge: str, device_id: str):
        super().__init__(broker, f"emoshield-device-{device_id}")
        self.edge, self.device_id = edge, device_id
        self.subscriptions = [MODEL_TOPIC.format(edge=edge)]
        self.announced: int | None = None
        self.announcements = 0  # counts valid announcements: each one is worth one check with the edge
        self.client.on_message = self._on_model

    def _on_model(self, client, userdata, message) -> None:
        """Keep the latest valid announcement. It is a hint, not a fact: the device asks the edge
        (HTTP, its token) what is latest and verifies the bundle, so a forged version can at most
        cause one check; it is never kept as a high-water mark (a forged 10**9 would hide the real
        next version). Malformed payloads are dropped without ending the loop thread."""
        try:
            if len(message.payload) > MAX_PAYLOAD:
                return
            version = parse_version(json.loads(message.payload)["version"], "announced version", 1)
        except Exception:  # noqa: BLE001 - JSON, key, type, range: any of them drops the message
            return
        self.announced = version
        self.announcements += 1

    def heartbeat(self, payload: dict, wait: float = 0.0) -> None:
        self.publish(HEARTBEAT_TOPIC.format(edge=self.edge, device=self.device_id), {**payload, "time": time.time()},
                     wait=wait)


def start_mosquitto(port: int, folder: Path, timeout: float = 10.0) -> subprocess.Popen:
    """A Mosquitto broker on 127.0.0.1:port (Debian's package; `make setup` installs it), for
    tests, the demo and fleet benchmarks. Anonymous and in memory: loopback use only."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).is_file():
        raise EmoshieldError("mosquitto is not installed: run `make setup` (apt-get install mosquitto)")
    conf = Path(folder) / f"mosquitto-{port}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise EmoshieldError(f"mosquitto exited with {proc.returncode} (port {port} taken?)") from None
            time.sleep(0.05)
    proc.kill()
    raise EmoshieldError(f"mosquitto did not listen on 127.0.0.1:{port} within {timeout:.0f} s")
