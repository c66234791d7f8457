"""MQTT fan-out against a real Mosquitto on 127.0.0.1: retained bundle announcements,
heartbeats recorded by the edge's store, isolation between edges, reconnection after the
broker comes up late; and the edge's sample-count trigger for training jobs."""

import json
import time
from pathlib import Path

import pytest

from emoshield.errors import EmoshieldError
from emoshield.tiers.edge import EdgeConfig, EdgeNode, EdgeStore
from emoshield.tiers.mqtt import DeviceLink, EdgeAnnouncer, parse_broker, start_mosquitto
from tests.conftest import FIVE, free_port, trust_repository

PNG = b"\x89PNG\r\n\x1a\n"


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_parse_broker():
    assert parse_broker("mqtt://10.0.0.2:1884") == ("10.0.0.2", 1884)
    assert parse_broker("127.0.0.1:1999") == ("127.0.0.1", 1999)
    assert parse_broker("broker.local") == ("broker.local", 1883)
    for bad in ("host:port", "h:0", "h:65536", "h:99999999999999999999", "h:-1"):
        with pytest.raises(EmoshieldError, match="HOST:PORT"):
            parse_broker(bad)


def test_retained_announcement_reaches_late_devices_and_heartbeats_are_recorded(broker, tmp_path):
    store = EdgeStore(tmp_path / "edge")
    device_id, _ = store.enrol("camera-a")
    announcer = EdgeAnnouncer(broker, "edge-1", store.record_heartbeat)
    other_edge = EdgeAnnouncer(broker, "edge-2", lambda *a: None)
    links = []
    try:
        assert announcer.start() and other_edge.start()
        announcer.announce(3, {"name": "edge-1", "created": "now"})
        other_edge.announce(9, {"name": "edge-2"})
        time.sleep(0.2)
        # the device connects after the announcement: the retained message still tells it v3,
        # and the other edge's v9 never reaches it
        link = DeviceLink(broker, "edge-1", device_id)
        links.append(link)
        assert link.start()
        assert wait_for(lambda: link.announced == 3)
        announcer.announce(4, {"name": "edge-1"})
        assert wait_for(lambda: link.announced == 4)
        time.sleep(0.2)
        assert link.announced == 4

        link.heartbeat({"version": 4, "frames": 120, "fps": 21.5})
        assert wait_for(lambda: store.devices()[0]["running_version"] == 4)
        row = store.devices()[0]
        assert row["telemetry"]["frames"] == 120 and row["last_seen"] > time.time() - 60
        # a heartbeat naming a device this edge never enrolled is dropped
        stranger = DeviceLink(broker, "edge-1", "d-not-enrolled")
        links.append(stranger)
        assert stranger.start()
        stranger.heartbeat({"version": 99})
        time.sleep(0.5)
        assert [d["id"] for d in store.devices()] == [device_id]
        assert not store.record_heartbeat("d-not-enrolled", {"version": 1})
        assert not store.record_heartbeat(device_id, {"version": 5, "junk": "x" * 5000})  # oversized: dropped
        assert store.devices()[0]["running_version"] == 4
    finally:
        for client in (*links, announcer, other_edge):
            client.stop()


def test_device_link_connects_when_the_broker_comes_up_late(tmp_path):
    port = free_port()
    link = DeviceLink(f"127.0.0.1:{port}", "edge-late", "d1")
    announcer = None
    proc = None
    try:
        assert not link.start(wait=0.5)  # no broker yet: the device polls meanwhile
        proc = start_mosquitto(port, tmp_path)
        announcer = EdgeAnnouncer(f"127.0.0.1:{port}", "edge-late", lambda *a: None)
        assert announcer.start()
        announcer.announce(2, {})
        assert wait_for(lambda: link.connected.is_set(), timeout=20)
        assert wait_for(lambda: link.announced == 2)
    finally:
        link.stop()
        if announcer is not None:
            announcer.stop()
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)


def test_train_every_queues_one_job_per_batch_of_new_samples(tmp_path):
    config = EdgeConfig(root=tmp_path / "edge", key=tmp_path / "k", classes=FIVE.split(","), cloud_url="http://x",
                        backbone="b", admin_token="t" * 16, train_every=3)
    trust_repository(config.root)
    node = EdgeNode(config)  # worker not started: jobs stay queued
    device_id, _ = node.store.enrol("camera")
    queued = []
    for i in range(7):
        node.store.add_sample(device_id, PNG + bytes([i]), "happy", "png")
        queued.append(node.sample_added())
    # the third sample queues a job; while it is pending no second job is queued
    assert queued[:2] == [None, None] and isinstance(queued[2], int) and queued[3:] == [None] * 4
    assert [j["trigger"] for j in node.store.jobs()] == ["auto"]
    # a finished job consumed its samples: the count starts again
    node.store.update_job(queued[2], status="finished")
    node.store.mark_samples_used(queued[2], [s["id"] for s in node.store.samples()])
    for i in range(2):
        node.store.add_sample(device_id, PNG + bytes([10 + i]), "sad", "png")
        assert node.sample_added() is None
    node.store.add_sample(device_id, PNG + bytes([20]), "sad", "png")
    assert isinstance(node.sample_added(), int)
    assert Path(config.root / "edge.sqlite3").is_file()


def test_per_device_accounts_and_topic_acls_on_a_broker_that_refuses_anonymous_clients(tmp_path):
    """Mosquitto with the dynamic security plugin: the edge (its admin account) creates one
    account per enrolled device; a device may publish only its own heartbeat topic and read only
    its edge's model topic; anonymous and wrong-password clients are refused; revocation deletes
    the account and disconnects the device at once."""
    port, admin = free_port(), ("edge-admin", "admin-password-123")
    proc = start_mosquitto(port, tmp_path, admin=admin)
    broker = f"127.0.0.1:{port}"
    store = EdgeStore(tmp_path / "edge")
    announcer = EdgeAnnouncer(broker, "edge-s", store.record_heartbeat, admin=admin)
    links = []

    def link(*args):
        links.append(DeviceLink(broker, *args))
        return links[-1]

    try:
        assert announcer.start()
        (a, token_a), (b, token_b) = store.enrol("cam-a"), store.enrol("cam-b")
        for device_id, token in ((a, token_a), (b, token_b)):
            announcer.grant_device(device_id, token)
        announcer.announce(7, {"name": "edge-s"})
        device_a = link("edge-s", a, token_a)
        assert device_a.start() and wait_for(lambda: device_a.announced == 7)
        assert not link("edge-s", "anonymous").start(wait=2)  # no account: refused
        assert not link("edge-s", a, token_b).start(wait=2)  # a's name, b's password: refused
        device_a.heartbeat({"version": 7})
        assert wait_for(lambda: {d["id"]: d["running_version"] for d in store.devices()}[a] == 7)
        # a publishes on b's heartbeat topic and a forged announcement: the broker drops both
        device_a.client.publish(f"emoshield/edge-s/devices/{b}/heartbeat", json.dumps({"version": 99}), qos=1)
        device_a.client.publish("emoshield/edge-s/model", json.dumps({"version": 999}), qos=1, retain=True)
        # a may not read other topics: a subscription to everything brings nothing
        seen = []
        device_a.client.on_message = lambda client, userdata, message: seen.append(message.topic)
        device_a.client.subscribe("emoshield/#", qos=1)
        device_b = link("edge-s", b, token_b)
        assert device_b.start() and wait_for(lambda: device_b.announced == 7)
        device_b.heartbeat({"version": 6})
        assert wait_for(lambda: {d["id"]: d["running_version"] for d in store.devices()}[b] == 6)
        time.sleep(0.5)
        assert device_b.announced == 7 and not [t for t in seen if "/devices/" in t]
        # revocation: the account is deleted and the device disconnected; it cannot come back
        announcer.revoke_device(a)
        assert wait_for(lambda: not device_a.connected.is_set(), timeout=10)
        assert not link("edge-s", a, token_a).start(wait=2)
    finally:
        for client in (*links, announcer):
            client.stop()
        proc.terminate()
        proc.wait(timeout=10)
