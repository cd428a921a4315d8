import numpy as np
import pytest
import torch

from mmfuse_fast.data import DataFileError, SegmentationTiles
from mmfuse_fast.data.synthetic import write_seg_tiles, write_tif

rasterio = pytest.importorskip("rasterio")


@pytest.fixture
def seg_root(tmp_path):
    # C2Seg-style: rgb and dem on the label grid, sar at half resolution over the same footprint
    return write_seg_tiles(tmp_path / "tiles", n=4, size=16, num_classes=5, nodata_tile=1)


def test_modalities_resampled_to_label_grid(seg_root):
    ds = SegmentationTiles(seg_root, normalize=False)
    assert ds.modalities == ("dem", "rgb", "sar") and ds.num_classes == 5
    assert ds.bands["rgb"] == ("rgb_0", "rgb_1", "rgb_2")  # band names from the band descriptions
    sample = ds[0]
    assert sample["sar"].shape == (2, 16, 16) and sample["rgb"].shape == (3, 16, 16)
    assert sample["label"].shape == (16, 16) and sample["label"].dtype == torch.int64
    with rasterio.open(seg_root / "sar" / "tile_000.tif") as src:
        sar = torch.from_numpy(src.read())
    expected = torch.nn.functional.interpolate(sar[None], size=(16, 16), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(sample["sar"], expected)
    with rasterio.open(seg_root / "labels" / "tile_000.tif") as src:
        assert torch.equal(sample["label"], torch.from_numpy(src.read(1).astype(np.int64)))


def test_nodata_ignore_index_splits_and_selection(seg_root):
    ds = SegmentationTiles(seg_root, split="train", modalities={"rgb": "rgb", "radar": "sar"},
                           bands={"rgb": ["rgb_2", "rgb_0"]}, num_classes=5, ignore_index=99)
    assert ds.ids == ["tile_000", "tile_001"]
    sample = ds[1]  # tile 1 has nodata in its top-left corner (every band)
    assert (sample["label"][:2, :2] == 99).all() and (sample["label"][8:, 8:] != 99).all()
    assert torch.isfinite(sample["radar"]).all() and (sample["rgb"][:, :2, :2] == 0).all()
    assert sample["rgb"].shape[0] == 2
    raw = SegmentationTiles(seg_root, split="train", modalities={"rgb": "rgb"}, normalize=False)
    mean, std = ds.stats["rgb"]["rgb_2"]
    assert torch.allclose(ds[0]["rgb"][0], (raw[0]["rgb"][2] - mean) / std, atol=1e-5)
    zero = SegmentationTiles(seg_root, modalities=["dem"], reduce_zero_label=True, normalize=False)
    assert zero.num_classes == 4
    label0 = SegmentationTiles(seg_root, modalities=["dem"], normalize=False)[0]["label"]
    assert torch.equal(zero[0]["label"], torch.where(label0 == 0, torch.tensor(255), label0 - 1))


def test_enmap_tiles(enmap_root):
    ds = SegmentationTiles(enmap_root, split="train", modalities={"hsi": "images"}, reduce_zero_label=True,
                           stats={"hsi": str(enmap_root / "Normalize_Bands.csv")})
    assert len(ds) == 14 and ds.num_classes == 6 and len(ds.bands["hsi"]) == 224
    assert ds.bands["hsi"][0] == "band 1 (418.24 Nanometers)"
    sample = ds[3]
    assert sample["hsi"].shape == (224, 32, 32) and torch.isfinite(sample["hsi"]).all()
    labels = torch.cat([ds[i]["label"].flatten() for i in range(len(ds))])
    assert set(labels.unique().tolist()) <= {0, 1, 2, 3, 4, 5, 255}
    counts = torch.bincount(labels[labels != 255], minlength=6)
    assert counts[:4].tolist() == [402, 704, 847, 1660]  # Summary_train_val.csv, classes 1-4
    assert {len(SegmentationTiles(enmap_root, split=s, modalities={"hsi": "images"}, num_classes=6,
                                  reduce_zero_label=True, normalize=False)) for s in ("val", "test")} == {2}


def test_bad_inputs_name_the_file(seg_root):
    ds = SegmentationTiles(seg_root, normalize=False, num_classes=5)
    label = seg_root / "labels" / "tile_002.tif"
    write_tif(label, np.full((16, 16), 7, np.uint8), origin=(400000.0 + 2 * 160, 5000000.0))
    with pytest.raises(DataFileError, match=r"tile_002.tif: label values \[7\] out of range"):
        ds[2]
    with pytest.raises(DataFileError, match="tile_002.tif: label values"):
        SegmentationTiles(seg_root, normalize=False, reduce_zero_label=False, num_classes=5)[2]
    dem = seg_root / "dem" / "tile_003.tif"
    write_tif(dem, np.zeros((1, 16, 16), np.float32), crs="EPSG:4326", origin=(400000.0 + 3 * 160, 5000000.0))
    with pytest.raises(DataFileError, match="tile_003.tif: CRS"):
        ds[3]
    write_tif(dem, np.zeros((1, 12, 12), np.float32), origin=(400000.0 + 3 * 160, 5000000.0))
    with pytest.raises(DataFileError, match="tile_003.tif: footprint"):
        ds[3]
    rgb = seg_root / "rgb" / "tile_000.tif"
    rgb.write_bytes(rgb.read_bytes()[:300])  # truncated: a corrupt tif
    with pytest.raises(DataFileError, match="corrupt or unreadable GeoTIFF .*tile_000.tif"):
        ds[0]
    (seg_root / "sar" / "tile_001.tif").unlink()
    with pytest.raises(DataFileError, match="sar file missing: .*tile_001.tif"):
        ds[1]
    with pytest.raises(FileNotFoundError, match="label folder not found"):
        SegmentationTiles(seg_root, label_dir="masks")
