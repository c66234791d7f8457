"""Ed25519 keys and signatures for model bundles (torch-free).

Keys are PEM files: private.key (PKCS#8, unencrypted, mode 0600) and public.key
(SubjectPublicKeyInfo). A signature is the raw 64 bytes, stored base64 in a text file.
"""

from __future__ import annotations

import base64
from pathlib import Path

from ..errors import EmoshieldError
from ..paths import write_atomic

PRIVATE_KEY = "private.key"
PUBLIC_KEY = "public.key"


def generate_keys(out_dir: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair into out_dir; refuse to overwrite an existing one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out_dir = Path(out_dir)
    private_path, public_path = out_dir / PRIVATE_KEY, out_dir / PUBLIC_KEY
    if not overwrite and (private_path.exists() or public_path.exists()):
        raise EmoshieldError(f"{out_dir} already holds a key pair (refusing to overwrite it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    write_private_key(private_path, key)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def write_private_key(path: Path, key) -> None:
    """PKCS#8 PEM, unencrypted, mode 0600 from the first byte, replacing `path` atomically."""
    from cryptography.hazmat.primitives import serialization

    write_atomic(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))


def load_private_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = _load(path, lambda data: serialization.load_pem_private_key(data, password=None))
    if not isinstance(key, Ed25519PrivateKey):
        raise EmoshieldError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = _load(path, serialization.load_pem_public_key)
    if not isinstance(key, Ed25519PublicKey):
        raise EmoshieldError(f"{path} is not an Ed25519 public key")
    return key


def _load(path: Path, parse):
    path = Path(path)
    if not path.is_file():
        raise EmoshieldError(f"key file {path} does not exist")
    try:
        return parse(path.read_bytes())
    except (ValueError, TypeError) as exc:
        raise EmoshieldError(f"{path} is not a PEM key ({exc.__class__.__name__})") from None


def sign(data: bytes, private_key) -> str:
    """Base64 Ed25519 signature of data."""
    return base64.b64encode(private_key.sign(data)).decode("ascii")


def signature_valid(data: bytes, signature_b64: str, public_key) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(base64.b64decode(signature_b64.strip(), validate=True), data)
        return True
    except (InvalidSignature, ValueError):
        return False
