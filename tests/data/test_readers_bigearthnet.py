"""BigEarthNet readers against the archives as they are shipped, and against the faults real archives bring."""

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfuse_fast.data import BIGEARTHNET_CLASSES, BigEarthNetV1, BigEarthNetV2
from mmfuse_fast.data.fetch import fetch_bigearthnet_v1_example
from mmfuse_fast.errors import BigEarthNetDataError, DataError, DataFileError, FetchError

pytest.importorskip("rasterio")
from mmfuse_fast.data.synthetic import write_bigearthnet_v1, write_tif  # noqa: E402

SHARED_EXAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "bigearthnet-v1-example"
EXAMPLE_ARCHIVES = ("BigEarthNet-S1-Example.tar.bz2", "BigEarthNet-S2-Example.tar.bz2")
EXAMPLE_LABELS = {  # 19-class labels of the six example patches, from their S1 labels metadata
    "S2A_MSIL2A_20170613T101031_87_48": ["Arable land", "Land principally occupied by agriculture, with "
                                         "significant areas of natural vegetation"],
    "S2A_MSIL2A_20170617T113321_4_55": ["Pastures"],
    "S2B_MSIL2A_20170924T93020_69_24": ["Coniferous forest", "Mixed forest", "Transitional woodland, shrub",
                                        "Inland wetlands", "Inland waters"],
}


@pytest.fixture(scope="module")
def example_source():
    """The wheel's files: ../shared/data/bigearthnet-v1-example when present (archives and lists), else the
    examples fetched from PyPI (bigearthnet-common's wheel, sha256-checked) into the cache, unpacked."""
    if (SHARED_EXAMPLE / EXAMPLE_ARCHIVES[0]).is_file():
        return SHARED_EXAMPLE
    try:
        return fetch_bigearthnet_v1_example()
    except FetchError as error:
        pytest.skip(f"BigEarthNet v1 examples not at {SHARED_EXAMPLE} and not fetchable: {error}")


@pytest.fixture
def example_root(tmp_path, example_source):
    """The S1 + S2 examples and the official .csv.bz2 lists, under folder names of our own."""
    root = tmp_path / "downloads"
    for archive in EXAMPLE_ARCHIVES:
        unpacked = example_source / archive.removesuffix(".tar.bz2")
        if unpacked.is_dir():
            shutil.copytree(unpacked, root / "unpacked" / "v1" / unpacked.name)
        else:
            with tarfile.open(example_source / archive) as tar:
                tar.extractall(root / "unpacked" / "v1", filter="data")
    for listing in example_source.glob("*.csv.bz2"):
        shutil.copy(listing, root / listing.name)
    return root


def test_reads_the_example_archive_as_shipped(example_root):
    ds = BigEarthNetV1(example_root, split="all", normalize=False)
    assert ds.s2_dir.name == "BigEarthNet-S2-Example" and ds.s1_dir.name == "BigEarthNet-S1-Example"
    assert len(ds) == 6 and ds.skipped == 0
    # the official .csv.bz2 lists (CRLF lines) give each patch its split; one example patch is in none
    assert sorted(v for v in ds.split_of.values() if v) == ["test", "train", "train", "train", "train"]
    for patch, labels in EXAMPLE_LABELS.items():
        expected = np.zeros(len(BIGEARTHNET_CLASSES), np.float32)
        expected[[BIGEARTHNET_CLASSES.index(name) for name in labels]] = 1
        assert np.array_equal(ds.labels[ds.ids.index(patch)], expected), patch
    sample = ds[0]
    assert sample["s1"].shape == (2, 120, 120) and sample["s2"].shape == (12, 120, 120)
    assert torch.isfinite(sample["s1"]).all() and sample["s2"].min() >= 0
    assert len(BigEarthNetV1(example_root, split="all", drop_snow_cloud=True)) == 5  # one patch has snow
    explicit = BigEarthNetV1(example_root, split="all", modalities=["s2"], s2_root=ds.s2_dir, s1_root=ds.s1_dir)
    assert explicit.ids == ds.ids
    with pytest.raises(BigEarthNetDataError, match=r"listed in .*train.csv.bz2\) has no labels metadata.*'all'"):
        BigEarthNetV1(example_root, split="train")


@pytest.fixture
def v1_root(tmp_path):
    root = write_bigearthnet_v1(tmp_path / "archive", n=4)
    (root / "BigEarthNet-S1-v1.0").rename(root / "radar")  # folder names of the user's choosing
    (root / "BigEarthNet-v1.0").rename(root / "optical")
    return root


def patch_file(root, index, band):
    ds = BigEarthNetV1(root, split="all", normalize=False)
    folder = ds.s2_dir if band.startswith("B") else ds.s1_dir
    name = ds.ids[index] if band.startswith("B") else ds.s1_names[index]
    return ds, folder / name / f"{name}_{band}.tif"


def test_folders_found_by_content(v1_root):
    ds = BigEarthNetV1(v1_root, split="train")
    assert ds.s1_dir.name == "radar" and ds.s2_dir.name == "optical" and len(ds) == 2
    shutil.copytree(v1_root / "optical", v1_root / "copy" / "optical")
    with pytest.raises(DataError, match="several Sentinel-2 patch folders.*s2_root"):
        BigEarthNetV1(v1_root)
    assert len(BigEarthNetV1(v1_root, s2_root=v1_root / "optical")) == 4


def test_band_crs_and_footprint_checked_against_siblings(v1_root):
    ds, path = patch_file(v1_root, 0, "B05")
    write_tif(path, np.ones((60, 60), np.uint16), crs="EPSG:32632", pixel_size=20.0)
    with pytest.raises(DataFileError, match=rf"patch {ds.ids[0]}: .*{path.name}: CRS EPSG:32632 differs"):
        ds[0]
    ds, path = patch_file(v1_root, 1, "VH")
    write_tif(path, np.ones((120, 120), np.float32), origin=(500100.0, 5000000.0))
    with pytest.raises(DataFileError, match=rf"{path.name}: footprint .* differs"):
        ds[1]
    skipping = BigEarthNetV1(v1_root, split="all", on_error="skip")
    with pytest.warns(UserWarning, match="skipping bad sample 0"):
        assert skipping[0]["id"] == ds.ids[2]  # sample 1 is bad too: skipped on the way
    assert skipping[1]["id"] == ds.ids[2]
    assert skipping.skipped == 2 and sorted(skipping.skipped_ids()) == sorted(ds.ids[:2])


def test_declared_nodata_is_honoured(v1_root):
    ds, path = patch_file(v1_root, 0, "B02")
    values = np.full((120, 120), 500, np.uint16)
    values[:10, :10] = 0
    write_tif(path, values, nodata=0, pixel_size=10.0)
    raw = BigEarthNetV1(v1_root, split="all", normalize=False, bands={"s2": ["B02"]})[0]["s2"][0]
    assert torch.isnan(raw[:10, :10]).all() and (raw[10:, 10:] == 500).all()
    normalized = BigEarthNetV1(v1_root, split="all", bands={"s2": ["B02"]})[0]["s2"][0]
    assert (normalized[:10, :10] == 0).all() and torch.isfinite(normalized).all()
    float_path = patch_file(v1_root, 1, "VV")[1]
    data = np.full((120, 120), -10.0, np.float32)
    data[0, 0] = np.nan
    write_tif(float_path, data)
    with pytest.raises(BigEarthNetDataError, match="band VV contains NaN"):
        BigEarthNetV1(v1_root, split="all", normalize=False)[1]
    write_tif(float_path, data, nodata=float("nan"))
    assert torch.isnan(BigEarthNetV1(v1_root, split="all", normalize=False)[1]["s1"][0, 0, 0])


def test_bad_metadata_names_the_patch(v1_root):
    ds = BigEarthNetV1(v1_root, split="all")
    meta_path = ds.s1_dir / ds.s1_names[1] / f"{ds.s1_names[1]}_labels_metadata.json"
    meta_path.write_text(json.dumps({"labels": None, "corresponding_s2_patch": ds.ids[1]}))
    with pytest.raises(BigEarthNetDataError, match=rf"patch {ds.ids[1]} .*'labels' is None"):
        BigEarthNetV1(v1_root)
    with pytest.warns(UserWarning, match="'labels' is None"):
        skipping = BigEarthNetV1(v1_root, on_error="skip")
    assert len(skipping) == 3 and skipping.skipped == 1
    meta_path.unlink()
    with pytest.raises(BigEarthNetDataError, match=rf"patch {ds.s1_names[1]}: labels metadata missing"):
        BigEarthNetV1(v1_root)
    (v1_root / "test.csv").write_text("")
    with pytest.raises(DataError, match=r"split 'test' selects no patch"):
        BigEarthNetV1(v1_root, split="test", on_error="skip")


def test_v2_metadata_with_a_missing_column_or_a_null_cell(tmp_path, ben_v2_root):
    import pandas as pd

    root = tmp_path / "v2"
    shutil.copytree(ben_v2_root, root)
    metadata = pd.read_parquet(root / "metadata.parquet")
    metadata.drop(columns=["s1_name"]).to_parquet(root / "metadata.parquet")
    with pytest.raises(BigEarthNetDataError, match=r"metadata.parquet: missing columns \['s1_name'\]"):
        BigEarthNetV2(root)
    broken = metadata.copy()
    broken.loc[0, "labels"] = None
    broken.loc[1, "s1_name"] = None
    broken.to_parquet(root / "metadata.parquet")
    first, second = metadata["patch_id"][0], metadata["patch_id"][1]
    with pytest.raises(BigEarthNetDataError, match=rf"patch {second} in .*metadata.parquet: 's1_name' is empty"):
        BigEarthNetV2(root, split="all")
    with pytest.raises(BigEarthNetDataError, match=rf"patch {first} in .*metadata.parquet: 'labels' is None"):
        BigEarthNetV2(root, split="all", modalities=["s2"])
    with pytest.warns(UserWarning):
        skipping = BigEarthNetV2(root, split="all", on_error="skip")
    assert skipping.skipped == 2 and len(skipping) == 22 and first not in skipping.ids
    assert len(BigEarthNetV2(root, split="all", modalities=["s2"], on_error="skip")) == 23
    with pytest.raises(DataError, match="unknown split 'tain'"):
        BigEarthNetV2(root, split="tain")
