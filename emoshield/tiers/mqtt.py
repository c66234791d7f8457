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
        number = int(port)
    except ValueError:
        number = 0
    if not 1 <= number <= 65535:
        raise EmoshieldError(f"bad MQTT broker address {address!r:.80}; expected HOST:PORT (port 1-65535)")
    return host or "127.0.0.1", number


def _client(client_id: str):
    try:
        import paho.mqtt.client as mqtt
    except ImportError as exc:  # pragma: no cover - paho-mqtt is a dependency
        raise EmoshieldError("MQTT needs paho-mqtt (pip install 'paho-mqtt>=2,<3')") from exc
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)


class _Link:
    """One paho client with its network loop on a background thread; reconnects by itself."""

    def __init__(self, broker: str, client_id: str, username: str | None = None, password: str | None = None):
        self.host, self.port = parse_broker(broker)
        self.client = _client(client_id)
        if username is not None:
            self.client.username_pw_set(username, password)
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


DYNSEC_TOPIC = "$CONTROL/dynamic-security/v1"


class EdgeAnnouncer(_Link):
    """The edge's side: announce bundles (retained), collect heartbeats and, given the broker's
    dynamic-security admin account (`admin=(user, password)`), manage one MQTT account per
    device: created at enrolment (user = device id, password = its edge token, client id
    bound), allowed to publish only its own heartbeat topic and to read only this edge's model
    topic, deleted (and disconnected) at revocation. Anonymous clients are refused by the broker."""

    def __init__(self, broker: str, edge: str, on_heartbeat: Callable[[str, dict], None],
                 admin: tuple[str, str] | None = None):
        super().__init__(broker, f"emoshield-edge-{edge}", *(admin or (None, None)))
        self.edge = edge
        self.admin = admin[0] if admin else None
        self.subscriptions = [HEARTBEAT_TOPIC.format(edge=edge, device="+")]
        if admin:  # the edge's own right to publish announcements, granted to its admin account
            self._control([{"command": "createRole", "rolename": self._edge_role,
                             "acls": [{"acltype": "publishClientSend", "topic": MODEL_TOPIC.format(edge=edge),
                                       "allow": True}]},
                           {"command": "addClientRole", "username": self.admin, "rolename": self._edge_role}])
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

    @property
    def _edge_role(self) -> str:
        return f"emoshield-edge-{self.edge}"

    def _control(self, commands: list[dict]) -> None:
        """Dynamic-security commands (queued by paho until connected; QoS 1). Re-creating an
        existing role or client is answered with an error the broker logs and we ignore."""
        self.client.publish(DYNSEC_TOPIC, json.dumps({"commands": commands}), qos=1)

    def grant_device(self, device_id: str, token: str) -> None:
        if not self.admin:
            return
        role = f"emoshield-device-{device_id}"
        self._control([
            {"command": "createRole", "rolename": role, "acls": [
                {"acltype": "publishClientSend", "allow": True,
                 "topic": HEARTBEAT_TOPIC.format(edge=self.edge, device=device_id)},
                {"acltype": "subscribeLiteral", "allow": True, "topic": MODEL_TOPIC.format(edge=self.edge)}]},
            {"command": "createClient", "username": device_id, "password": token,
             "clientid": f"emoshield-device-{device_id}", "roles": [{"rolename": role}]}])

    def revoke_device(self, device_id: str) -> None:
        if self.admin:
            self._control([{"command": "deleteClient", "username": device_id},
                           {"command": "deleteRole", "rolename": f"emoshield-device-{device_id}"}])

    def announce(self, version: int, manifest: dict) -> None:
        self.publish(MODEL_TOPIC.format(edge=self.edge),
                     {"version": int(version), "name": manifest.get("name"), "created": manifest.get("created"),
                      "announced": time.time()}, retain=True)


class DeviceLink(_Link):
    """The device's side: learn the newest announced version, send heartbeats."""

    def __init__(self, broker: str, edge: str, device_id: str, token: str | None = None):
        # with per-device accounts the user is the device id and the password its edge token
        super().__init__(broker, f"emoshield-device-{device_id}", *((device_id, token) if token else (None, None)))
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


DYNSEC_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"


def write_dynsec_config(path: Path, user: str, password: str) -> None:
    """The dynamic security plugin's starting config (what `mosquitto_ctrl dynsec init` writes,
    without the password on a command line): one admin account whose role may use the plugin's
    control topics and read every topic; everything else is denied until roles grant it. Mode 0600."""
    import base64
    import hashlib
    import os
    import secrets

    salt, iterations = secrets.token_bytes(12), 101
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    control = "$CONTROL/dynamic-security/#"
    acls = [{"acltype": kind, "topic": topic, "allow": True} for kind, topic in (
        ("publishClientSend", control), ("publishClientReceive", control), ("subscribePattern", control),
        ("publishClientReceive", "$SYS/#"), ("subscribePattern", "$SYS/#"), ("publishClientReceive", "#"),
        ("subscribePattern", "#"), ("unsubscribePattern", "#"))]
    config = {"clients": [{"username": user, "textName": "emoshield edge (dynsec admin)",
                           "password": base64.b64encode(digest).decode(), "salt": base64.b64encode(salt).decode(),
                           "iterations": iterations, "roles": [{"rolename": "admin"}]}],
              "roles": [{"rolename": "admin", "acls": acls}], "groups": [],
              "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True, "subscribe": False,
                                   "unsubscribe": True}}
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)


def start_mosquitto(port: int, folder: Path, timeout: float = 10.0,
                    admin: tuple[str, str] | None = None) -> subprocess.Popen:
    """A Mosquitto broker on 127.0.0.1:port (Debian's package; `make setup` installs it), for
    tests, the demo and fleet benchmarks, in memory. Without `admin` it is anonymous (loopback
    use only); with `admin=(user, password)` it refuses anonymous clients and runs the dynamic
    security plugin with that admin account, through which the edge issues per-device accounts
    and topic ACLs (EdgeAnnouncer)."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).is_file():
        raise EmoshieldError("mosquitto is not installed: run `make setup` (apt-get install mosquitto)")
    conf = Path(folder) / f"mosquitto-{port}.conf"
    if admin is None:
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    else:
        plugin = next((p for p in (Path(DYNSEC_PLUGIN), *Path("/usr/lib").glob("*/mosquitto_dynamic_security.so"))
                       if p.is_file()), None)
        if plugin is None:
            raise EmoshieldError("mosquitto's dynamic security plugin is missing (Debian's mosquitto package has it)")
        dynsec = Path(folder) / f"dynsec-{port}.json"
        write_dynsec_config(dynsec, *admin)
        import getpass

        # `user`: a broker started as root would switch to the mosquitto user, which cannot read
        # the 0600 account file; it stays the user who started it (ignored when not root)
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\npersistence false\n"
                        f"user {getpass.getuser()}\nplugin {plugin}\nplugin_opt_config_file {dynsec}\n")
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
