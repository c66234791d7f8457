import os
from pathlib import Path

import pytest

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
