import os
import socket
from pathlib import Path

import pytest

from emoshield.tiers.mqtt import start_mosquitto

ROOT = Path(__file__).resolve().parent.parent

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers on 2 cores: one thread each
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # (before torch is imported; subprocesses inherit)
        os.environ.setdefault(_name, "1")
os.environ["EMOSHIELD_HINTS"] = "0"  # stderr as the tests expect it, whatever else the machine runs
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


# ---- a small model trained on real CK+48 faces and its signed bundle (shared by the tier tests) ----

@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_root):
    from tests.test_cli import run

    out = tmp_path_factory.mktemp("tiers") / "run"
    run("train", "--dataset", "ckplus48", "--data-root", data_root, "--classes", FIVE, "--protocol", "subject",
        "--fold", "0", "--limit-per-class", "80", "--backbone", "mobilenet_v2", "--weights", "imagenet",
        "--input-size", "48", "--epochs", "8", "--batch-size", "32", "--schedule", "cosine", "--out", out, "--quiet")
    # 80 faces per class (267 train, 90 test), 8 epochs: ~83% on unseen people, 11 s. With 40 per
    # class (138 train) int8 agreement with fp32 was 92% on one CPU's training and 98% on another's:
    # a model that weak measures its own quantization sensitivity, not the int8 kernels.
    return out


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    from emoshield.tiers.signing import generate_keys

    folder = tmp_path_factory.mktemp("keys")
    generate_keys(folder)
    return folder


@pytest.fixture(scope="session")
def bundle(trained, keys, tmp_path_factory):
    from tests.test_cli import run

    out = tmp_path_factory.mktemp("bundles") / "v1"
    proc = run("bundle", "export", "--model", trained, "--key", keys / "private.key", "--out", out,
               "--calibration-images", "64")
    assert "int8 accuracy change" in proc.stdout
    return out


def resigned_bundle(bundle, keys, dst, version, break_model=False):
    """A copy of `bundle` re-sealed as `version` (optionally with both graphs broken)."""
    import shutil

    from emoshield.tiers.bundle import ONNX_FP32, ONNX_INT8, read_manifest, seal_bundle
    from emoshield.tiers.signing import load_private_key

    shutil.copytree(bundle, dst)
    if break_model:  # both graphs: a broken int8 alone gives way to fp32 (the self-check)
        (dst / ONNX_INT8).write_bytes(b"not an onnx graph")
        (dst / ONNX_FP32).write_bytes(b"not an onnx graph")
    manifest = {k: v for k, v in read_manifest(dst).items() if k not in ("files", "format")}
    seal_bundle(dst, {**manifest, "version": version}, load_private_key(keys / "private.key"))
    return dst


def trust_repository(edge_root: Path) -> Path:
    """An edge's TUF update repository, its root key kept beside (outside) the edge's folder;
    returns the devices' trust root (1.root.json)."""
    from emoshield.tiers.trust import TrustRepository

    repo = TrustRepository.init(edge_root / "trust", edge_root.parent / f"{edge_root.name}-offline-root.key")
    return repo.metadata_dir / "1.root.json"


def small_trained_model(data_root: Path, classes: str, epochs: int, test_images: int):
    """smallcnn at 32 px trained on CK+48 `classes` (reference split, seed 0), in eval mode, with
    the first `test_images` of its test faces as model inputs: (model, x, y)."""
    import tempfile

    import torch

    from emoshield.data import load_dataset, make_split
    from emoshield.data.images import decode_images, to_model_input
    from emoshield.models import ModelConfig, build_model
    from emoshield.training import TensorData, TrainConfig, Trainer

    ds = load_dataset("ckplus48", data_root, classes)
    parts = {}
    for name, recs in make_split(ds, "reference").parts().items():
        dec = decode_images(ds.root, recs, 32)
        parts[name] = TensorData(torch.from_numpy(dec.pixels),
                                 torch.tensor([ds.classes.index(r.label) for r in dec.records]))
    torch.manual_seed(0)
    model = build_model(ModelConfig("smallcnn", list(ds.classes), 32))
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(model, TrainConfig(epochs=epochs, batch_size=32, schedule="constant"), tmp, progress=False,
                log=lambda _m: None).fit(parts["train"], parts["val"])
    model.eval()
    return model, to_model_input(parts["test"].pixels[:test_images]), parts["test"].labels[:test_images]


HOLDER = """import sys, time
from pathlib import Path
from emoshield.reproduce import step_lock
with step_lock(Path(sys.argv[1])) as mine:
    print(mine, flush=True)
    time.sleep(600)
"""


def hold_step(step: Path):
    """Another live process holding emoshield.reproduce.step_lock(step): a Popen to kill (its lock
    goes with it, as when a real holder dies)."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(step)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    if holder.stdout.readline().strip() != "True":
        holder.kill()
        holder.wait()
        raise AssertionError("the holder could not take the lock")
    return holder
