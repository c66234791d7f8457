import os
import socket
from pathlib import Path

import pytest

from emoshield.tiers.mqtt import start_mosquitto

ROOT = Path(__file__).resolve().parent.parent
FIVE = "happy,sad,surprise,disgust,fear"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real datasets: $EMOSHIELD_DATA, else ../shared/data beside the project."""
    root = Path(os.environ.get("EMOSHIELD_DATA") or ROOT.parent / "shared" / "data")
    if not (root / "ckplus48").is_dir():
        raise RuntimeError(f"real datasets not found at {root}: set EMOSHIELD_DATA")
    return root


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep emoshield's caches (face boxes) inside the test run."""
    os.environ["EMOSHIELD_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """'127.0.0.1:PORT' of a Mosquitto started for the test session."""
    port = free_port()
    proc = start_mosquitto(port, tmp_path_factory.mktemp("mosquitto"))
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


MQTT_ADMIN = ("edge-admin", "mqtt-admin-password")


@pytest.fixture(scope="session")
def secure_broker(tmp_path_factory):
    """'127.0.0.1:PORT' of a Mosquitto that refuses anonymous clients: accounts and ACLs come from
    its dynamic security plugin, administered by MQTT_ADMIN (the edge)."""
    port = free_port()
    proc = start_mosquitto(port, tmp_path_factory.mktemp("mosquitto-secure"), admin=MQTT_ADMIN)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def postgres():
    """SQLAlchemy URL of a PostgreSQL server started for the test session (127.0.0.1, free port)."""
    from emoshield.tiers.postgres import start_postgres, stop_postgres

    server, url = start_postgres(free_port())
    yield url
    stop_postgres(server)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """Each metadata-store test runs on SQLite (the embedded default) and on PostgreSQL; each gets an
    empty database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'edge.sqlite3'}"
    url = request.getfixturevalue("postgres")
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:  # a fresh schema per test
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return url
