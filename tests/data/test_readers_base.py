"""The shared reader layer: split lists (.csv.bz2, "all", empty selections), statistics CSVs keyed by band number,
reader options forwarded from the data config, bands defaulting to those the data declares."""

import bz2

import numpy as np
import pytest
import torch

from mmfuse_fast.config import DataConfig, FinetuneConfig, load_config
from mmfuse_fast.data import (SEN12MS, SegmentationTiles, build_dataset, declared_bands, read_stats_csv,
                              skipped_count)
from mmfuse_fast.data.splits import read_split_list, select_split
from mmfuse_fast.errors import ConfigError, DataError, DataFileError

pytest.importorskip("rasterio")  # the synthetic datasets are GeoTIFFs
from mmfuse_fast.data.synthetic import write_seg_tiles, write_sen12ms  # noqa: E402


def test_split_lists_compressed_with_crlf_and_header(tmp_path):
    (tmp_path / "train.csv.bz2").write_bytes(bz2.compress(b"patch_id\r\nA_1\r\nB_2.tif\r\n"))
    (tmp_path / "val.txt").write_text("C_3\n")
    assert read_split_list(tmp_path / "train.csv.bz2") == ["A_1", "B_2"]
    ids = ["A_1", "B_2", "C_3", "D_4"]
    assert select_split(ids, tmp_path, "train", None) == (["A_1", "B_2"], {"A_1": "train", "B_2": "train"})
    every, split_of = select_split(ids, tmp_path, "all", None)
    assert every == ids and split_of == {"A_1": "train", "B_2": "train", "C_3": "validation", "D_4": None}
    assert select_split(ids, tmp_path, ["val", "all"], None)[0] == ids
    (tmp_path / "test.csv").write_text("")
    with pytest.raises(DataError, match=r"split 'test' selects no sample .*test.csv"):
        select_split(ids, tmp_path, "test", None)
    (tmp_path / "val.txt.bz2").write_bytes(b"not bz2 data")
    with pytest.raises(DataFileError, match="val.txt.bz2: unreadable split list"):
        read_split_list(tmp_path / "val.txt.bz2")


def test_all_reads_data_without_split_lists(tmp_path):
    root = write_seg_tiles(tmp_path / "tiles", n=3, size=16, splits=False)
    with pytest.raises(FileNotFoundError, match="no split list for split 'train'.*'all'"):
        SegmentationTiles(root, split="train", normalize=False)
    ds = SegmentationTiles(root, split="all", normalize=False)
    assert len(ds) == 3 and set(ds.split_of.values()) == {None}
    built = build_dataset(DataConfig(dataset="seg_tiles", root=str(root)), ["all"], {"rgb": []})
    assert len(built) == 3


def test_stats_csv_by_band_number_is_used_not_recomputed(tmp_path):
    root = write_seg_tiles(tmp_path / "tiles", n=3, size=16, modalities={"hsi": (4, 1)})
    csv = tmp_path / "Normalize_Bands.csv"
    csv.write_text("Band_Number,std,mean\n1,2.0,10.0\n2,3.0,20.0\n3,,\n4,5.0,40.0\n")
    table = read_stats_csv(csv, ("hsi_0", "hsi_1", "hsi_2", "hsi_3"))
    assert table["hsi_0"] == (10.0, 2.0) and table["hsi_3"] == (40.0, 5.0) and np.isnan(table["hsi_2"][0])
    with pytest.warns(UserWarning, match="no statistics for the hsi bands hsi_2"):
        ds = SegmentationTiles(root, split="train", stats={"hsi": str(csv)})
    assert ds.stats["hsi"]["hsi_1"] == (20.0, 3.0) and ds.stats["hsi"]["hsi_2"] != (20.0, 3.0)
    raw = SegmentationTiles(root, split="train", normalize=False)[0]["hsi"]
    torch.testing.assert_close(ds[0]["hsi"][0], (raw[0] - 10.0) / 2.0)
    csv.write_text("Band_Number,std,mean\n1,2.0,10.0\n9,3.0,20.0\n")
    with pytest.raises(DataFileError, match=r"Normalize_Bands.csv: row 2 is for band 9"):
        SegmentationTiles(root, split="train", stats={"hsi": str(csv)})
    csv.write_text("band,std,mean\nhsi_0,2.0,10.0\n")
    with pytest.raises(DataFileError, match=r"Normalize_Bands.csv: no statistics for the hsi bands hsi_1"):
        SegmentationTiles(root, split="train", stats={"hsi": str(csv)})
    csv.write_text("band,std,mean\nhsi_0,0.0,10.0\n")
    with pytest.raises(DataFileError, match=r"Normalize_Bands.csv: band 'hsi_0' has mean 10.0, std 0.0"):
        SegmentationTiles(root, split="train", bands={"hsi": ["hsi_0"]}, stats={"hsi": str(csv)})


def test_enmap_statistics_file_is_read(enmap_root):
    csv = enmap_root / "Normalize_Bands.csv"
    ds = SegmentationTiles(enmap_root, split="train", modalities={"hsi": "images"}, reduce_zero_label=True,
                           bands={"hsi": ["band 1 (418.24 Nanometers)"]}, stats={"hsi": str(csv)})
    first = read_stats_csv(csv, ds.available_bands["hsi"])["band 1 (418.24 Nanometers)"]
    assert ds.stats["hsi"]["band 1 (418.24 Nanometers)"] == pytest.approx(first)
    assert first == pytest.approx((395.78097098214283, 239.3026075959728))


def test_data_options_forwarded_and_unknown_ones_named(tmp_path):
    root = write_sen12ms(tmp_path / "sen", size=16)
    (tmp_path / "mine.txt").write_text("ROIs1158_spring_1_p31\n")
    cfg = DataConfig(dataset="sen12ms", root=str(root), options={"split_files": {"train": str(tmp_path / "mine.txt")},
                                                                  "seasons": ["spring"]})
    ds = build_dataset(cfg, ["train"], {"s2": ["B04"]})
    assert isinstance(ds, SEN12MS) and ds.ids == ["ROIs1158_spring_1_p31"]
    with pytest.raises(ConfigError, match=r"config key 'data.options.sesons': reader sen12ms has no option"):
        DataConfig(dataset="sen12ms", root=str(root), options={"sesons": ["spring"]})
    with pytest.raises(ConfigError, match=r"'data.options.split': set by data.splits"):
        DataConfig(dataset="sen12ms", options={"split": "train"})


def test_data_options_load_from_a_config_file():
    loaded = load_config(FinetuneConfig, {"data": {"dataset": "seg_tiles", "options": {"class_names": ["a", "b"]}}})
    assert loaded.data.options == {"class_names": ["a", "b"]}


def test_bands_default_to_those_the_data_declares(tmp_path, enmap_root):
    cfg = DataConfig(dataset="seg_tiles", root=str(enmap_root), modality_dirs={"hsi": "images"},
                     reduce_zero_label=True, num_classes=6)
    names = declared_bands(cfg, ["hsi"])["hsi"]
    assert len(names) == 224 and names[0] == "band 1 (418.24 Nanometers)"
    ds = build_dataset(DataConfig(**{**cfg.__dict__, "options": {"normalize": False}}), ["test"], {"hsi": []})
    assert ds.bands["hsi"] == names and ds[0]["hsi"].shape == (224, 32, 32)
    with pytest.raises(ConfigError, match="'model.modalities' names \\['rgb'\\]"):
        declared_bands(DataConfig(dataset="sen12ms"), ["rgb"])


def test_skipped_samples_are_counted_across_workers(tmp_path):
    root = write_seg_tiles(tmp_path / "tiles", n=4, size=16, modalities={"rgb": (3, 1)})
    for i in (1, 2):
        (root / "rgb" / f"tile_00{i}.tif").write_bytes(b"II*\x00 broken")
    ds = SegmentationTiles(root, split="all", normalize=False, on_error="skip", num_classes=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2)
    ids = [batch["id"][0] for batch in loader]  # the workers warn in their own processes
    assert sorted(set(ids)) == ["tile_000", "tile_003"]
    assert ds.skipped == 2 and skipped_count(torch.utils.data.Subset(ds, [0])) == 2
    assert sorted(ds.skipped_ids()) == ["tile_001", "tile_002"]
