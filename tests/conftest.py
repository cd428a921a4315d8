import os
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels run under the interpreter. Triton reads this when it is first imported, so it is
# set here, before any test module (or a library it imports) can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BEN_V2_SAMPLE = SHARED_DATA / "bigearthnet-v2-sample"
ENMAP_TILES = SHARED_DATA / "enmap-hsi-tiles"


@pytest.fixture(scope="session")
def ben_v2_root():
    """The real BigEarthNet v2 sample: ../shared/data's copy when present, else the one `make demo` fetched into
    the project's cache ($MMFUSE_CACHE or ~/.cache/mmfuse_fast); the tests never download it. Session scope: it is
    looked up before any test's own fixtures change the environment."""
    from mmfuse_fast.data.fetch import SAMPLE_DIR_NAME, default_cache_dir, find_sample  # only after TRITON_INTERPRET is set

    pytest.importorskip("lmdb", reason="the BigEarthNet v2 sample is an LMDB")
    root = find_sample([BEN_V2_SAMPLE])
    if root is None:
        pytest.skip(f"real BigEarthNet v2 sample found neither at {BEN_V2_SAMPLE} nor in "
                    f"{default_cache_dir() / SAMPLE_DIR_NAME} (`make demo` fetches it there)")
    return root


@pytest.fixture
def enmap_root():
    if not ENMAP_TILES.exists():
        pytest.skip(f"EnMAP tiles not found at {ENMAP_TILES}")
    return ENMAP_TILES


# Optional readers' dependencies: a test that reaches one where it is not installed (the lent GPU machines have
# neither) is skipped, saying which, instead of failing.
OPTIONAL_MODULES = ("rasterio", "lmdb")


def _missing_optional_module(error: BaseException | None) -> str | None:
    while error is not None:
        if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in OPTIONAL_MODULES:
            return error.name
        error = error.__cause__ or error.__context__
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    missing = _missing_optional_module(call.excinfo.value) if call.excinfo is not None else None
    if missing and report.failed:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: needs {missing}, not installed")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
