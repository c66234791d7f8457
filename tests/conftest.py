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
