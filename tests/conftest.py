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


@pytest.fixture
def ben_v2_root():
    if not (BEN_V2_SAMPLE / "metadata.parquet").exists():
        pytest.skip(f"real BigEarthNet v2 sample not found at {BEN_V2_SAMPLE}")
    return BEN_V2_SAMPLE


@pytest.fixture
def enmap_root():
    if not ENMAP_TILES.exists():
        pytest.skip(f"EnMAP tiles not found at {ENMAP_TILES}")
    return ENMAP_TILES


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
