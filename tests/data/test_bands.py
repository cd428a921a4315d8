import numpy as np
import pytest

from mmfuse_fast import config
from mmfuse_fast.data.bands import (
    BAND_RESOLUTION_M,
    BAND_STATS,
    MODALITY_BANDS,
    band_mean_std,
    native_size_px,
    resolve_bands,
    resolve_modalities,
)


def test_band_tables_are_complete_and_consistent():
    assert MODALITY_BANDS == {"s1": config.S1_BANDS, "s2": config.S2_BANDS}
    assert "B10" not in MODALITY_BANDS["s2"] and len(MODALITY_BANDS["s2"]) == 12
    for modality, names in MODALITY_BANDS.items():
        assert set(BAND_STATS[modality]) == set(names)
        assert all(std > 0 for _, std in BAND_STATS[modality].values())
    assert {b for b, r in BAND_RESOLUTION_M.items() if r == 60} == {"B01", "B09"}
    assert {b for b, r in BAND_RESOLUTION_M.items() if r == 10} == {"VV", "VH", "B02", "B03", "B04", "B08"}
    assert (native_size_px("B02"), native_size_px("B05"), native_size_px("B01")) == (120, 60, 20)


def test_resolve_and_stats_by_name():
    assert resolve_bands(("s1", "s2"), {"s2": ["B04", "B02"]}) == {"s1": ("VV", "VH"), "s2": ("B04", "B02")}
    mean, std = band_mean_std("s2", ("B04", "B02"), {"B02": (1.0, 2.0)})
    assert mean.shape == (2, 1, 1) and mean.dtype == np.float32
    assert mean[1, 0, 0] == 1.0 and std[1, 0, 0] == 2.0 and mean[0, 0, 0] == np.float32(BAND_STATS["s2"]["B04"][0])
    with pytest.raises(ValueError, match="unknown band 'B10'"):
        resolve_bands(("s2",), {"s2": ["B10"]})
    with pytest.raises(ValueError, match="listed twice"):
        resolve_bands(("s1",), {"s1": ["VV", "VV"]})
    with pytest.raises(ValueError, match="not among the requested"):
        resolve_bands(("s1",), {"s2": ["B02"]})
    with pytest.raises(ValueError, match="unknown modality 'rgb'"):
        resolve_modalities(["rgb"])
    assert resolve_modalities("s2") == ("s2",)
