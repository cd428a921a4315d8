"""Fetch the 24-patch real BigEarthNet v2 sample that ships inside the PyPI wheel `configilm==0.7.1`.

The wheel is downloaded with pip (no dependencies, binary only), its sha256 is checked before anything is read
from it, and only the sample files are extracted. configilm itself is never installed or imported.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
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
CACHE_ENV_VAR = "MMFUSE_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "mmfuse_fast")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(dest_dir: Path) -> Path:
    """Download the configilm wheel into `dest_dir` with pip and return its path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        WHEEL_REQUIREMENT, "-d", str(dest_dir),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(f"`{' '.join(command)}` failed (exit {result.returncode}):\n{result.stderr.strip()[-2000:]}")
    wheels = sorted(Path(dest_dir).glob("configilm-*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"expected one configilm wheel in {dest_dir} after pip download, found {wheels}")
    return wheels[0]


def extract_sample(wheel: Path, target: Path, expected_sha256: str | None = None) -> Path:
    """Verify `wheel` (against `WHEEL_SHA256` by default) and extract the sample into `target` atomically
    (a temp dir renamed into place)."""
    expected_sha256 = expected_sha256 or WHEEL_SHA256
    actual = sha256_of(wheel)
    if actual != expected_sha256:
        raise FetchError(f"sha256 mismatch for {wheel}: expected {expected_sha256}, got {actual}; nothing extracted")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = set(archive.namelist())
            for relative in SAMPLE_FILES:
                member = WHEEL_SAMPLE_PREFIX + relative
                if member not in members:
                    raise FetchError(f"{wheel} has no member {member}")
                destination = staging / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, open(destination, "wb") as sink:
                    shutil.copyfileobj(source, sink)
        try:
            os.rename(staging, target)
        except OSError:
            if not is_complete_sample(target):  # another process finished first: keep its copy
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


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
    target = _cache_target(cache_dir)
    if is_complete_sample(target):
        return target
    if target.exists():
        raise FetchError(f"{target} exists but is incomplete; remove it and fetch again")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mmfuse-wheel-", dir=target.parent) as download_dir:
        wheel = download(Path(download_dir))
        return extract_sample(wheel, target)
