"""Model bundles: a folder a device can trust without running any of its contents.

    manifest.json        name, version, classes, preprocessing, backbone, per-file sha256,
                         training config, metrics, creation time
    manifest.sig         base64 Ed25519 signature of the canonical manifest
    weights.safetensors  the trained weights (edge/cloud use; never pickle)
    model.onnx           fp32 graph, input "image" N x 3 x S x S in [0, 1], output "logits"
    model.int8.onnx      static QDQ int8 graph for devices
    probes.safetensors   held-out faces (uint8) and the fp32 model's logits on them: the device
                         runs its int8 model on them at install and falls back to fp32 when the
                         two disagree (int8 kernels differ between CPUs)

The signature covers the manifest and the manifest covers every file by hash, so one
signature check plus the hash checks verify the whole bundle. Torch-free: devices use it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import EmoshieldError, printable
from ..paths import read_json, sha256_file
from .signing import load_public_key, sign, signature_valid
from .wire import RemoteValueError, finite, parse_file_name, parse_version

FORMAT = "emoshield.bundle/1"
# /1 plus preprocessing.align: a bundle whose faces must be aligned says so in its format, so a
# device older than alignment refuses it instead of running it on unaligned faces
FORMAT_ALIGNED = "emoshield.bundle/2"
FORMATS = (FORMAT, FORMAT_ALIGNED)
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
WEIGHTS = "weights.safetensors"
ONNX_FP32 = "model.onnx"
ONNX_INT8 = "model.int8.onnx"
PROBES = "probes.safetensors"
BUNDLE_FILES = (WEIGHTS, ONNX_FP32, ONNX_INT8, PROBES)
MAX_PROBES = 4096


class BundleError(EmoshieldError):
    """A bundle is missing, malformed, tampered with or not signed by the expected key."""


class BundleSignatureError(BundleError):
    """Unsigned, or signed by another key, or the manifest changed after signing."""


class BundleHashError(BundleError):
    """A file is missing or differs from its signed sha256 and size."""


class BundleVersionError(BundleError):
    """Not newer than what is installed (a replay or rollback attempt), or a version refused before."""


def canonical_json(value) -> bytes:
    """The bytes that are signed: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def seal_bundle(bundle_dir: Path, manifest: dict, private_key) -> dict:
    """Add the file hashes to `manifest`, write it and its signature into bundle_dir."""
    bundle_dir = Path(bundle_dir)
    files = {}
    for name in BUNDLE_FILES:
        path = bundle_dir / name
        if path.is_file():
            files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    aligned = (manifest.get("preprocessing") or {}).get("align", "none") != "none"
    manifest = {**manifest, "format": FORMAT_ALIGNED if aligned else FORMAT, "files": files}
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    (bundle_dir / SIGNATURE).write_text(sign(canonical_json(manifest), private_key) + "\n")
    return manifest


def write_probes(path: Path, images, logits) -> None:
    """Probe faces (uint8 N x 3 x S x S) and their fp32 logits (float32 N x K) as safetensors."""
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"images": np.ascontiguousarray(images, dtype=np.uint8),
               "fp32_logits": np.ascontiguousarray(logits, dtype=np.float32)}, str(path),
              metadata={"format": "emoshield.probes/1"})


def read_probes(path: Path, input_size: int, classes: int):
    """(images as float32 N x 3 x S x S in [0, 1], fp32 logits N x K); BundleError when the file
    does not hold what the manifest's model expects."""
    import numpy as np
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable probe faces ({exc.__class__.__name__})") from None
    images, logits = tensors.get("images"), tensors.get("fp32_logits")
    if (images is None or logits is None or images.dtype != np.uint8 or logits.dtype != np.float32
            or images.ndim != 4 or images.shape[1:] != (3, input_size, input_size)
            or logits.shape != (len(images), classes) or not 0 < len(images) <= MAX_PROBES
            or not np.isfinite(logits).all()):
        raise BundleError(f"{path}: probe faces do not fit the model ({input_size} px, {classes} classes)")
    return images.astype(np.float32) / 255.0, logits


def read_manifest(bundle_dir: Path) -> dict:
    """The manifest as written, unverified (for inspection and for choosing what to verify)."""
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: no {MANIFEST} (not a bundle)")
    try:
        manifest = read_json(path)
    except EmoshieldError as error:  # not UTF-8, not JSON, nested past the recursion limit
        raise BundleError(str(error)) from None
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
        found = repr(manifest.get("format") if isinstance(manifest, dict) else None)
        raise BundleError(f"{path}: unknown bundle format {found[:60]} (expected {' or '.join(FORMATS)})")
    return manifest


def verify_signature(bundle_dir: Path, public_key) -> dict:
    """The manifest, once its signature checks out against `public_key` (a key object or a PEM
    path); BundleSignatureError otherwise. Enough to trust the file list and sizes before
    downloading the files themselves."""
    bundle_dir = Path(bundle_dir)
    if isinstance(public_key, (str, Path)):
        public_key = load_public_key(Path(public_key))
    manifest = read_manifest(bundle_dir)
    sig_path = bundle_dir / SIGNATURE
    if not sig_path.is_file():
        raise BundleSignatureError(f"{bundle_dir}: no {SIGNATURE} (unsigned bundle)")
    try:
        signature = sig_path.read_text()
    except UnicodeDecodeError:
        signature = ""
    if not signature_valid(canonical_json(manifest), signature, public_key):
        raise BundleSignatureError(f"{bundle_dir}: bad signature (manifest changed or signed by another key)")
    return manifest


def verify_bundle(bundle_dir: Path, public_key, min_version: int | None = None,
                  required: tuple[str, ...] = (ONNX_INT8,), optional: tuple[str, ...] = ()) -> dict:
    """Check signature, every listed file's hash and size, the required files and, when
    given, that the version is strictly above min_version. Files named in `optional` may be
    absent (a device does not download the weights) but must match when present. Returns the
    manifest; raises a BundleError subclass naming the first problem. `public_key` is a key
    object or a PEM path."""
    bundle_dir = Path(bundle_dir)
    manifest = verify_signature(bundle_dir, public_key)
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise BundleError(f"{bundle_dir}: the manifest's file list is not an object")
    for name in required:
        if name not in files:
            raise BundleError(f"{bundle_dir}: manifest lists no {name}")
    for name, entry in files.items():
        try:
            path = bundle_dir / parse_file_name(name, "manifest file")
        except RemoteValueError as exc:
            raise BundleError(f"{bundle_dir}: manifest names an unsafe file ({exc})") from None
        if not path.is_file():
            if name in optional and name not in required:
                continue
            raise BundleHashError(f"{bundle_dir}: {name} is missing")
        if not isinstance(entry, dict) or path.stat().st_size != entry.get("bytes") \
                or sha256_file(path) != entry.get("sha256"):
            raise BundleHashError(f"{bundle_dir}: {name} does not match its sha256 in the manifest (tampered or corrupt)")
    try:
        version = parse_version(manifest.get("version"), "version", 1)
    except RemoteValueError as exc:
        raise BundleVersionError(f"{bundle_dir}: {exc}") from None
    if min_version is not None and version <= min_version:
        raise BundleVersionError(f"{bundle_dir}: version {version} is not newer than the installed {min_version}")
    return manifest


def describe_bundle(manifest: dict) -> str:
    """A few human lines about a bundle (for `emoshield bundle inspect`, which shows unverified
    manifests too: any field may be missing or of another type, and is then shown as '?')."""
    def field(*path):
        value = manifest
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def text(value) -> str:  # printable only: an unverified manifest may carry escapes and newlines
        return printable("?" if value is None or isinstance(value, (dict, list)) else str(value)[:80])

    def number(value, form: str, scale: float = 1.0) -> str:
        value = finite(value, -math.inf, math.inf)  # None for anything else, an integer past float's range too
        return "?" if value is None else format(value / scale, form)

    classes = field("classes")
    lines = [f"{text(field('name'))} v{text(field('version'))} ({text(field('format'))}), created {text(field('created'))}",
             "classes: " + (", ".join(text(c) for c in classes) if isinstance(classes, list) else "?"),
             f"backbone: {text(field('backbone', 'name'))} (initial weights {text(field('backbone', 'weights'))}), "
             f"input {text(field('preprocessing', 'input_size'))} px {text(field('preprocessing', 'channels'))}"]
    for key, label in (("test_accuracy", "test accuracy (torch)"), ("onnx_fp32_accuracy", "ONNX fp32 accuracy"),
                       ("onnx_int8_accuracy", "ONNX int8 accuracy"), ("onnx_max_abs_diff", "max |torch - ONNX|")):
        value = field("metrics", key)
        if value is not None:
            lines.append(f"{label}: {number(value, '.2%') if 'accuracy' in key else number(value, '.2e')}")
    files = field("files")
    for name in (files if isinstance(files, dict) else ()):
        lines.append(f"{text(name)}: {number(field('files', name, 'bytes'), '.2f', 1e6)} MB "
                     f"sha256 {text(field('files', name, 'sha256'))[:16]}...")
    return "\n".join(lines)
