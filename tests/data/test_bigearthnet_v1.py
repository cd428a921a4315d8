import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmfuse_fast.config import S1_BANDS, S2_BANDS, DataConfig
from mmfuse_fast.data import BIGEARTHNET_CLASSES, BigEarthNetDataError, BigEarthNetV1, build_dataset
from mmfuse_fast.data.bands import BAND_STATS, native_size_px
from mmfuse_fast.data.bigearthnet import CORINE_43_CLASSES, corine_43_to_19

rasterio = pytest.importorskip("rasterio")
Affine = pytest.importorskip("affine").Affine

# (s2 name, s1 name, 43-class labels, expected 19-class labels)
PATCHES = [
    ("S2A_MSIL2A_20170613T101031_0_48", "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_0_48",
     ["Discontinuous urban fabric", "Non-irrigated arable land", "Burnt areas"], ["Urban fabric", "Arable land"]),
    ("S2A_MSIL2A_20170613T101031_0_49", "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_0_49",
     ["Transitional woodland/shrub", "Sea and ocean", "Estuaries", "Road and rail networks and associated land"],
     ["Transitional woodland, shrub", "Marine waters"]),
    ("S2B_MSIL2A_20180204T094161_1_2", "S1B_IW_GRDH_1SDV_20180204T164812_34VFN_1_2",
     ["Peatbogs", "Natural grassland", "Sparsely vegetated areas", "Vineyards"],
     ["Inland wetlands", "Natural grassland and sparsely vegetated areas", "Permanent crops"]),
]  # fmt: skip


def write_tif(path, array):
    with rasterio.open(
        path, "w", driver="GTiff", height=array.shape[0], width=array.shape[1], count=1, dtype=array.dtype,
        crs="EPSG:32633", transform=Affine(1200 / array.shape[1], 0, 500000, 0, -1200 / array.shape[0], 5000000),
    ) as dst:  # fmt: skip
        dst.write(array, 1)


def pixel_values(seed, band, modality):
    rng = np.random.default_rng(seed)
    size = native_size_px(band)
    if modality == "s1":
        return rng.normal(-15, 4, (size, size)).astype(np.float32)
    return rng.integers(1, 10000, (size, size)).astype(np.uint16)


@pytest.fixture
def v1_root(tmp_path):
    root = tmp_path / "ben_v1"
    for seed, (s2_name, s1_name, labels, _) in enumerate(PATCHES):
        s1_dir = root / "BigEarthNet-S1-v1.0" / s1_name
        s2_dir = root / "BigEarthNet-v1.0" / s2_name
        s1_dir.mkdir(parents=True)
        s2_dir.mkdir(parents=True)
        for band in S1_BANDS:
            write_tif(s1_dir / f"{s1_name}_{band}.tif", pixel_values(seed, band, "s1"))
        for band in S2_BANDS:
            write_tif(s2_dir / f"{s2_name}_{band}.tif", pixel_values(seed * 100 + S2_BANDS.index(band), band, "s2"))
        meta = {"labels": labels, "corresponding_s2_patch": s2_name, "acquisition_time": "2017-06-13 16:50:43"}
        (s1_dir / f"{s1_name}_labels_metadata.json").write_text(json.dumps(meta))
        (s2_dir / f"{s2_name}_labels_metadata.json").write_text(json.dumps({"labels": labels}))
    (root / "train.csv").write_text(f"{PATCHES[0][0]},{PATCHES[0][1]}\n{PATCHES[1][0]},{PATCHES[1][1]}\n")
    (root / "test.csv").write_text(f"{PATCHES[2][0]}\n")
    (root / "patches_with_seasonal_snow.csv").write_text(f"{PATCHES[1][0]}\n")
    return root


def expected_multi_hot(names):
    vector = torch.zeros(19)
    vector[[BIGEARTHNET_CLASSES.index(n) for n in names]] = 1
    return vector


def test_corine_mapping_is_official():
    assert len(CORINE_43_CLASSES) == 43
    assert corine_43_to_19(["Continuous urban fabric", "Salines", "Coastal lagoons"]) == [
        "Urban fabric", "Coastal wetlands", "Marine waters"]  # fmt: skip
    dropped = ["Road and rail networks and associated land", "Port areas", "Airports", "Mineral extraction sites",
               "Dump sites", "Construction sites", "Green urban areas", "Sport and leisure facilities",
               "Bare rock", "Burnt areas", "Intertidal flats"]  # fmt: skip
    assert corine_43_to_19(dropped) == []
    with pytest.raises(BigEarthNetDataError, match="P9.*'Lava'"):
        corine_43_to_19(["Lava"], "P9")


def test_reads_tifs_and_maps_labels(v1_root):
    ds = BigEarthNetV1(v1_root, normalize=False)
    assert len(ds) == 3 and ds.bands == {"s1": tuple(S1_BANDS), "s2": tuple(S2_BANDS)}
    for seed, (s2_name, s1_name, _, labels19) in enumerate(PATCHES):
        index = ds.ids.index(s2_name)
        sample = ds[index]
        assert sample["id"] == s2_name
        assert torch.equal(sample["label"], expected_multi_hot(labels19))
        assert np.array_equal(ds.labels[index], expected_multi_hot(labels19).numpy())
        for channel, band in enumerate(S1_BANDS):
            assert torch.equal(sample["s1"][channel], torch.from_numpy(pixel_values(seed, band, "s1")))
        for channel, band in enumerate(S2_BANDS):
            raw = torch.from_numpy(pixel_values(seed * 100 + channel, band, "s2").astype(np.float32))
            if raw.shape[-1] != 120:
                raw = F.interpolate(raw[None, None], size=(120, 120), mode="bilinear", align_corners=False)[0, 0]
            assert torch.equal(sample["s2"][channel], raw), band


def test_splits_snow_and_normalization(v1_root):
    train = BigEarthNetV1(v1_root, split="train")
    assert train.ids == [PATCHES[0][0], PATCHES[1][0]] and set(train.split_of.values()) == {"train"}
    assert BigEarthNetV1(v1_root, split="train", drop_snow_cloud=True).ids == [PATCHES[0][0]]
    assert BigEarthNetV1(v1_root, split=["train", "test"]).ids == [p[0] for p in PATCHES]
    with pytest.raises(FileNotFoundError, match="val.csv"):
        BigEarthNetV1(v1_root, split="val")
    (v1_root / "elsewhere.csv").write_text(f"s2,s1\n{PATCHES[2][0]},{PATCHES[2][1]}\n")
    val = BigEarthNetV1(v1_root, split="validation", split_files={"val": v1_root / "elsewhere.csv"})
    assert val.ids == [PATCHES[2][0]]
    physical = BigEarthNetV1(v1_root, split="test", normalize=False, bands={"s2": ["B8A", "B02"]})[0]
    normalized = BigEarthNetV1(v1_root, split="test", bands={"s2": ["B8A", "B02"]})[0]
    mean = torch.tensor([BAND_STATS["s2"][b][0] for b in ("B8A", "B02")]).view(2, 1, 1)
    std = torch.tensor([BAND_STATS["s2"][b][1] for b in ("B8A", "B02")]).view(2, 1, 1)
    torch.testing.assert_close(normalized["s2"], (physical["s2"] - mean) / std)
    assert physical["s2"].shape == (2, 120, 120)


def test_s2_only_without_s1_folder(v1_root):
    import shutil

    shutil.rmtree(v1_root / "BigEarthNet-S1-v1.0")
    with pytest.raises(FileNotFoundError, match="Sentinel-1"):
        BigEarthNetV1(v1_root)
    ds = BigEarthNetV1(v1_root, modalities=["s2"], split="test")
    assert set(ds[0]) == {"s2", "label", "id"}
    assert torch.equal(ds[0]["label"], expected_multi_hot(PATCHES[2][3]))


def test_missing_band_file_and_corrupt_tif(v1_root):
    s2_name = PATCHES[0][0]
    (v1_root / "BigEarthNet-v1.0" / s2_name / f"{s2_name}_B05.tif").unlink()
    corrupt = v1_root / "BigEarthNet-v1.0" / PATCHES[1][0] / f"{PATCHES[1][0]}_B11.tif"
    corrupt.write_bytes(b"II*\x00 definitely not a tiff")
    ds = BigEarthNetV1(v1_root, split="train")
    with pytest.raises(BigEarthNetDataError, match=f"band file missing: .*{s2_name}_B05.tif"):
        ds[0]
    with pytest.raises(BigEarthNetDataError, match=f"corrupt or unreadable GeoTIFF .*{PATCHES[1][0]}_B11.tif"):
        ds[1]
    skipping = BigEarthNetV1(v1_root, split=None, on_error="skip")
    with pytest.warns(UserWarning):
        ids = [skipping[i]["id"] for i in range(len(skipping))]
    assert ids == [PATCHES[2][0]] * 3 and skipping.skipped == 2


def test_size_mismatch_and_unknown_label(v1_root):
    s1_name = PATCHES[2][1]
    write_tif(v1_root / "BigEarthNet-S1-v1.0" / s1_name / f"{s1_name}_VH.tif", np.zeros((100, 120), np.float32))
    ds = BigEarthNetV1(v1_root, split="test")
    with pytest.raises(BigEarthNetDataError, match=rf"{s1_name}_VH.tif has size \(100, 120\)"):
        ds[0]
    meta_path = v1_root / "BigEarthNet-S1-v1.0" / s1_name / f"{s1_name}_labels_metadata.json"
    meta_path.write_text(json.dumps({"labels": ["Lava"], "corresponding_s2_patch": PATCHES[2][0]}))
    with pytest.raises(BigEarthNetDataError, match=f"{PATCHES[2][0]}.*'Lava'"):
        BigEarthNetV1(v1_root)
    with pytest.warns(UserWarning, match="Lava"):
        assert len(BigEarthNetV1(v1_root, on_error="skip")) == 2


def test_build_dataset_v1(v1_root):
    cfg = DataConfig(dataset="bigearthnet_v1", root=str(v1_root))
    ds = build_dataset(cfg, ["train"], {"s1": ["VV"], "s2": ["B02"]})
    assert isinstance(ds, BigEarthNetV1) and len(ds) == 2 and ds[0]["s1"].shape == (1, 120, 120)
    with pytest.raises(ValueError, match="data.root"):
        build_dataset(DataConfig(dataset="bigearthnet_v1"), ["train"], {"s1": ["VV"]})
