import numpy as np
import pytest
import torch

from mmfuse_fast.config import DataConfig
from mmfuse_fast.data import SEN12MS, DataFileError, build_dataset
from mmfuse_fast.data.sen12ms import IGBP2DFC, SEN12MS_S2_BANDS, sample_id_of
from mmfuse_fast.data.synthetic import write_sen12ms, write_tif

rasterio = pytest.importorskip("rasterio")


@pytest.fixture
def sen_root(tmp_path):
    root = write_sen12ms(tmp_path / "sen12ms", size=16)
    (root / "train.txt").write_text("ROIs1158_spring_s2_1_p30.tif\nROIs1868_summer_7_p30\n")
    (root / "test.txt").write_text("ROIs1158_spring_1_p31\n")
    return root


def test_layout_bands_and_majority_label(sen_root):
    ds = SEN12MS(sen_root, split=None, normalize=False)
    assert len(ds) == 4 and ds.ids[0] == "ROIs1158_spring_1_p30"
    assert ds.bands["s2"] == SEN12MS_S2_BANDS and len(ds.bands["s2"]) == 13 and ds.bands["s1"] == ("VV", "VH")
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["s1"].shape == (2, 16, 16) and sample["s2"].shape == (13, 16, 16)
        paths = ds.triplet_paths(i)
        with rasterio.open(paths["lc"]) as src:
            igbp = src.read(1)
        with rasterio.open(paths["s2"]) as src:
            assert torch.equal(sample["s2"], torch.from_numpy(src.read().astype(np.float32)))
        simplified = IGBP2DFC[igbp] - 1
        assert int(sample["label"]) == np.bincount(simplified.ravel(), minlength=10).argmax()
        assert sample["label"].dtype == torch.int64 and 0 <= int(sample["label"]) < 10


def test_band_selection_normalization_and_splits(sen_root):
    ds = SEN12MS(sen_root, split="train", modalities=["s2"], bands={"s2": ["B04", "B10"]})
    raw = SEN12MS(sen_root, split="train", modalities=["s2"], normalize=False)
    assert ds.ids == ["ROIs1158_spring_1_p30", "ROIs1868_summer_7_p30"]
    x = ds[0]["s2"]
    assert x.shape == (2, 16, 16) and "s1" not in ds[0]
    mean, std = ds.stats["s2"]["B10"]
    assert torch.allclose(x[1], (raw[0]["s2"][SEN12MS_S2_BANDS.index("B10")] - mean) / std, atol=1e-5)
    # the statistics come from every patch found, so every split normalizes alike
    assert SEN12MS(sen_root, split="test").stats == SEN12MS(sen_root, split="train").stats
    assert sample_id_of("ROIs1158_spring_lc_1_p30.tif") == "ROIs1158_spring_1_p30"
    ds = build_dataset(DataConfig(dataset="sen12ms", root=str(sen_root)), ["test"], {"s1": ["VH"]})
    assert len(ds) == 1 and ds[0]["s1"].shape == (1, 16, 16)


def test_bad_inputs_name_the_file(sen_root):
    ds = SEN12MS(sen_root, split=None, normalize=False)
    lc = ds.triplet_paths(0)["lc"]
    bad = np.full((4, 16, 16), 5, np.uint8)
    bad[0, 0, 0] = 0  # not an IGBP class
    write_tif(lc, bad, origin=(300000.0, 4000000.0))
    with pytest.raises(DataFileError, match=f"{lc.name}.*out of range"):
        ds[0]
    s1 = ds.triplet_paths(1)["s1"]
    write_tif(s1, np.zeros((2, 16, 16), np.float32), crs="EPSG:32632", origin=(302560.0, 4000000.0))
    with pytest.raises(DataFileError, match=f"{s1.name}.*CRS"):
        ds[1]
    s2 = ds.triplet_paths(2)["s2"]
    write_tif(s2, np.zeros((13, 8, 8), np.uint16))
    with pytest.raises(DataFileError, match=f"{s2.name}.*size"):
        ds[2]
    skipping = SEN12MS(sen_root, split=None, normalize=False, on_error="skip")
    with pytest.warns(UserWarning, match="skipping bad sample 0"):
        assert skipping[0]["id"] == ds.ids[3]  # the next good sample
    assert skipping.skipped == 3
    ds.triplet_paths(3)["s1"].unlink()
    with pytest.raises(DataFileError, match="file missing.*_s1_"):
        ds[3]
    with pytest.raises(FileNotFoundError, match="no SEN12MS patches"):
        SEN12MS(sen_root / "ROIs1158_spring" / "s1_1")
