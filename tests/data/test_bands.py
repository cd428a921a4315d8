import numpy as np
import pytest

from mmfuse_fast import config
from mmfuse_fast.data.bands import BAND_RESOLUTION_M, BAND_STATS, MODALITY_BANDS, S1_BANDS, S2_BANDS, native_size_px
from mmfuse_fast.data.base import BandDataset
from mmfuse_fast.errors import ConfigError, DataError


def test_band_tables_are_complete_and_consistent():
    assert MODALITY_BANDS == {"s1": S1_BANDS, "s2": S2_BANDS}
    assert (S1_BANDS, S2_BANDS) == (config.S1_BANDS, config.S2_BANDS)  # the model defaults name the same bands
    assert "B10" not in MODALITY_BANDS["s2"] and len(MODALITY_BANDS["s2"]) == 12
    for modality, names in MODALITY_BANDS.items():
        assert set(BAND_STATS[modality]) == set(names)
        assert all(std > 0 for _, std in BAND_STATS[modality].values())
    assert {b for b, r in BAND_RESOLUTION_M.items() if r == 60} == {"B01", "B09"}
    assert {b for b, r in BAND_RESOLUTION_M.items() if r == 10} == {"VV", "VH", "B02", "B03", "B04", "B08"}
    assert (native_size_px("B02"), native_size_px("B05"), native_size_px("B01")) == (120, 60, 20)


def selection(modalities, bands=None):
    dataset = BandDataset()
    dataset.select_bands(modalities, MODALITY_BANDS, bands, normalize=True, on_error="raise")
    return dataset


def test_select_bands_by_name_and_normalize():
    dataset = selection(("s1", "s2"), {"s2": ["B04", "B02"]})
    assert dataset.bands == {"s1": ("VV", "VH"), "s2": ("B04", "B02")}
    assert selection(("s2",), {"s2": []}).bands["s2"] == S2_BANDS  # no band listed: every band the data declares
    assert selection("s1").modalities == ("s1",)
    dataset.set_mean_std({"s1": BAND_STATS["s1"], "s2": {"B04": (1.0, 2.0), "B02": (3.0, 4.0)}})
    image = np.ones((2, 3, 3), np.float32)
    assert np.allclose(dataset.normalize_in_place(image, "s2")[:, 0, 0], [0.0, -0.5])
    with pytest.raises(DataError, match="non-positive std.*B02"):
        dataset.set_mean_std({"s1": BAND_STATS["s1"], "s2": {"B04": (1.0, 2.0), "B02": (3.0, 0.0)}})


@pytest.mark.parametrize("modalities, bands, error, message", [
    (("s2",), {"s2": ["B10"]}, DataError, "unknown band 'B10'"),
    (("s1",), {"s1": ["VV", "VV"]}, ConfigError, "listed twice"),
    (("s1",), {"s2": ["B02"]}, ConfigError, "not among the requested"),
    (("rgb",), None, DataError, "unknown modality 'rgb'"),
    ((), None, ConfigError, "no modality requested"),
    (("s1", "s1"), None, ConfigError, "modality listed twice"),
])
def test_bad_band_selection_names_it(modalities, bands, error, message):
    with pytest.raises(error, match=message):
        selection(modalities, bands)


def test_on_error_is_checked():
    with pytest.raises(ConfigError, match="on_error"):
        BandDataset().select_bands(("s1",), MODALITY_BANDS, None, normalize=True, on_error="ignore")
