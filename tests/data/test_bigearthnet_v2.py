import pickle
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from mmfuse_fast.config import S1_BANDS, S2_BANDS, DataConfig
from mmfuse_fast.data import (
    BAND_STATS,
    BIGEARTHNET_CLASSES,
    BigEarthNetDataError,
    BigEarthNetV2,
    build_dataset,
    compute_band_stats,
)
from mmfuse_fast.data.bigearthnet import class_index, label_key
from mmfuse_fast.data.blob_store import shared_lmdb_env
from mmfuse_fast.data.loader import SharedBatchLoader

lmdb = pytest.importorskip("lmdb")

LMDB_DIR = "BigEarthNet-V2-LMDB"


def read_raw(root, key):
    # the process-wide handle: py-lmdb refuses a second open of an environment in one process
    with shared_lmdb_env(root / LMDB_DIR).begin() as txn:
        return load_safetensors(txn.get(key.encode()))


def all_metadata(root):
    return pd.concat(
        [pd.read_parquet(root / "metadata.parquet"),
         pd.read_parquet(root / "metadata_for_patches_with_snow_cloud_or_shadow.parquet")],
        ignore_index=True,
    )  # fmt: skip


def copy_root(src, dst, edit=None):
    """Copy the sample into `dst`, rewriting LMDB values with `edit(key, value) -> value | None (drop)`."""
    dst.mkdir()
    for name in ("metadata.parquet", "metadata_for_patches_with_snow_cloud_or_shadow.parquet"):
        shutil.copy(src / name, dst / name)
    source = shared_lmdb_env(src / LMDB_DIR)
    target = lmdb.open(str(dst / LMDB_DIR), map_size=64 << 20)
    with source.begin() as read, target.begin(write=True) as write:
        for key, value in read.cursor():
            value = edit(key.decode(), value) if edit else value
            if value is not None:
                write.put(key, value)
    target.close()
    return dst


def test_class_list_covers_metadata_labels(ben_v2_root):
    assert len(BIGEARTHNET_CLASSES) == 19 and len(set(BIGEARTHNET_CLASSES)) == 19
    for labels in all_metadata(ben_v2_root)["labels"]:
        for label in labels:
            assert BIGEARTHNET_CLASSES[class_index(label)] == label  # v2 spelling is the canonical spelling


def test_label_spelling_variants():
    assert label_key("Transitional woodland/shrub") == label_key("Transitional woodland, shrub")
    assert class_index("transitional woodland / shrub") == 13
    assert class_index("Broad leaved forest") == 8
    with pytest.raises(BigEarthNetDataError, match="P1.*'Snowfields'"):
        class_index("Snowfields", "P1")


def test_reader_matches_raw_lmdb_and_parquet(ben_v2_root):
    ds = BigEarthNetV2(ben_v2_root, split=None, normalize=False)
    metadata = all_metadata(ben_v2_root).set_index("patch_id")
    assert len(ds) == 24 and sorted(ds.ids) == sorted(metadata.index)
    assert ds.bands == {"s1": ("VV", "VH"), "s2": tuple(S2_BANDS)}
    for index in range(len(ds)):
        sample = ds[index]
        row = metadata.loc[sample["id"]]
        expected_label = np.zeros(19, np.float32)
        expected_label[[BIGEARTHNET_CLASSES.index(label) for label in row["labels"]]] = 1
        assert torch.equal(sample["label"], torch.from_numpy(expected_label))
        assert np.array_equal(ds.labels[index], expected_label)
        assert ds.split_of[sample["id"]] == row["split"]
        assert sample["s1"].dtype == torch.float32 and sample["s1"].shape == (2, 120, 120)
        assert sample["s2"].dtype == torch.float32 and sample["s2"].shape == (12, 120, 120)
        raw_s1 = read_raw(ben_v2_root, row["s1_name"])
        for channel, band in enumerate(S1_BANDS):
            assert torch.equal(sample["s1"][channel], torch.from_numpy(raw_s1[band]))
        raw_s2 = read_raw(ben_v2_root, sample["id"])
        for channel, band in enumerate(S2_BANDS):
            raw = torch.from_numpy(raw_s2[band].astype(np.float32))
            if raw.shape[-1] == 120:  # 10 m band: untouched
                expected = raw
            else:
                expected = F.interpolate(raw[None, None], size=(120, 120), mode="bilinear", align_corners=False)[0, 0]
            assert torch.equal(sample["s2"][channel], expected), band


def test_split_sizes(ben_v2_root):
    for split in ("train", "validation", "val", "test"):
        assert len(BigEarthNetV2(ben_v2_root, split=split)) == 8
        assert len(BigEarthNetV2(ben_v2_root, split=split, drop_snow_cloud=True)) == 6
    both = BigEarthNetV2(ben_v2_root, split=["train", "validation"])
    assert len(both) == 16 and set(both.split_of.values()) == {"train", "validation"}
    assert len(BigEarthNetV2(ben_v2_root, split=None)) == 24
    dropped = BigEarthNetV2(ben_v2_root, split=None, drop_snow_cloud=True)
    assert len(dropped) == 18
    assert not dropped.metadata[["contains_seasonal_snow", "contains_cloud_or_shadow"]].to_numpy().any()


def test_normalize_and_band_selection(ben_v2_root):
    physical = BigEarthNetV2(ben_v2_root, split="test", normalize=False)[3]
    normalized = BigEarthNetV2(ben_v2_root, split="test")[3]
    for modality, bands in (("s1", S1_BANDS), ("s2", S2_BANDS)):
        mean = torch.tensor([BAND_STATS[modality][b][0] for b in bands]).view(-1, 1, 1)
        std = torch.tensor([BAND_STATS[modality][b][1] for b in bands]).view(-1, 1, 1)
        torch.testing.assert_close(normalized[modality], (physical[modality] - mean) / std)
    picked = BigEarthNetV2(ben_v2_root, split="test", normalize=False, modalities=("s2",),
                           bands={"s2": ["B04", "B03", "B02", "B8A"]})[3]  # fmt: skip
    assert set(picked) == {"s2", "label", "id"}
    order = [S2_BANDS.index(b) for b in ("B04", "B03", "B02", "B8A")]
    assert torch.equal(picked["s2"], physical["s2"][order])
    s1_only = BigEarthNetV2(ben_v2_root, split="test", modalities=["s1"], bands={"s1": ["VH"]})
    assert s1_only.bands == {"s1": ("VH",)} and s1_only[0]["s1"].shape == (1, 120, 120)


def test_compute_band_stats(ben_v2_root):
    ds = BigEarthNetV2(ben_v2_root, split="train", normalize=False, modalities=["s1"])
    stats = compute_band_stats(ds, "s1")
    stacked = torch.stack([ds[i]["s1"] for i in range(len(ds))]).double()
    for channel, band in enumerate(S1_BANDS):
        assert stats[band][0] == pytest.approx(stacked[:, channel].mean().item(), rel=1e-9)
        assert stats[band][1] == pytest.approx(stacked[:, channel].std(unbiased=False).item(), rel=1e-6)
    with pytest.raises(ValueError, match="normalize=False"):
        compute_band_stats(BigEarthNetV2(ben_v2_root, split="train"), "s1")
    restandardized = BigEarthNetV2(ben_v2_root, split="train", modalities=["s1"], stats={"s1": stats})
    values = torch.stack([restandardized[i]["s1"] for i in range(len(ds))]).double()
    assert values.mean().abs() < 1e-4 and (values.std() - 1).abs() < 1e-3


def test_argument_errors(ben_v2_root, tmp_path):
    with pytest.raises(ValueError, match="unknown split 'training'"):
        BigEarthNetV2(ben_v2_root, split="training")
    with pytest.raises(ValueError, match="unknown modality 's3'"):
        BigEarthNetV2(ben_v2_root, modalities=("s1", "s3"))
    with pytest.raises(ValueError, match="unknown band 'B10'"):
        BigEarthNetV2(ben_v2_root, bands={"s2": ["B02", "B10"]})
    with pytest.raises(ValueError, match="on_error"):
        BigEarthNetV2(ben_v2_root, on_error="ignore")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        BigEarthNetV2(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="data.mdb"):
        BigEarthNetV2(tmp_path)
    (tmp_path / LMDB_DIR).mkdir()
    (tmp_path / LMDB_DIR / "data.mdb").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="metadata.parquet"):
        BigEarthNetV2(tmp_path)


TRAIN_PATCH = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_37_89"  # train index 1


def _rewrite_band(band, fn):
    def edit(key, value):
        if key != TRAIN_PATCH:
            return value
        arrays = load_safetensors(value)
        fn(arrays, band)
        return save_safetensors(arrays)

    return edit


CORRUPTIONS = {
    "missing key": (lambda key, value: None if key == TRAIN_PATCH else value, "key missing"),
    "missing band": (_rewrite_band("B05", lambda a, b: a.pop(b)), "band B05 is missing"),
    "wrong shape": (_rewrite_band("B05", lambda a, b: a.__setitem__(b, a[b][:50])), r"band B05 has shape \(50, 60\)"),
    "nan": (_rewrite_band("B02", lambda a, b: a.__setitem__(b, np.full((120, 120), np.nan, np.float32))), "NaN"),
    "garbage": (lambda key, value: b"\x00garbage" * 7 if key == TRAIN_PATCH else value, "corrupt LMDB value"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_bad_samples_raise_or_skip(ben_v2_root, tmp_path, kind):
    edit, message = CORRUPTIONS[kind]
    root = copy_root(ben_v2_root, tmp_path / "root", edit)
    ds = BigEarthNetV2(root, split="train")
    assert ds.ids[1] == TRAIN_PATCH
    ds[0]
    with pytest.raises(BigEarthNetDataError, match=message) as error:
        ds[1]
    assert TRAIN_PATCH in str(error.value)

    skipping = BigEarthNetV2(root, split="train", on_error="skip")
    with pytest.warns(UserWarning, match=TRAIN_PATCH):
        sample = skipping[1]
    assert sample["id"] == skipping.ids[2] and skipping.skipped == 1
    assert skipping[1]["id"] == skipping.ids[2] and skipping.skipped == 1  # counted once
    assert len([skipping[i] for i in range(len(skipping))]) == 8


def test_unknown_label_in_metadata(ben_v2_root, tmp_path):
    root = copy_root(ben_v2_root, tmp_path / "root")
    metadata = pd.read_parquet(root / "metadata.parquet")
    bad_patch = metadata["patch_id"].iloc[2]
    metadata.at[metadata.index[2], "labels"] = ["Pastures", "Snowfields"]
    metadata.to_parquet(root / "metadata.parquet")
    with pytest.raises(BigEarthNetDataError, match=f"{bad_patch}.*'Snowfields'"):
        BigEarthNetV2(root, split="train")
    with pytest.warns(UserWarning, match=bad_patch):
        ds = BigEarthNetV2(root, split="train", on_error="skip")
    assert len(ds) == 7 and bad_patch not in ds.ids and ds.skipped == 1 and ds.labels.shape == (7, 19)


def test_lazy_lmdb_and_dataloader_workers(ben_v2_root):
    ds = BigEarthNetV2(ben_v2_root, split="validation")
    assert not ds.store.opened  # nothing opened before the first read
    first = ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert not clone.store.opened and torch.equal(clone[0]["s2"], first["s2"])
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    batches = list(loader)
    assert sum(len(b["id"]) for b in batches) == 8
    assert batches[0]["s2"].shape == (3, 12, 120, 120)
    assert torch.equal(batches[0]["s1"][0], first["s1"])
    assert list(batches[0]["id"]) == ds.ids[:3]
    other = BigEarthNetV2(ben_v2_root, split="test")  # a second reader of the same LMDB in this process
    assert other[0]["id"] == other.ids[0] and ds[1]["id"] == ds.ids[1]


def test_shared_batch_loader_on_the_real_sample(ben_v2_root):
    ds = BigEarthNetV2(ben_v2_root, split="validation")
    stock = list(torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2))
    shared = list(SharedBatchLoader(ds, 3, num_workers=2))
    assert len(shared) == len(stock) == 3
    for got, expected in zip(shared, stock):
        assert got["id"] == expected["id"]
        assert all(torch.equal(got[k], expected[k]) for k in ("s1", "s2", "label"))


def test_build_dataset(ben_v2_root):
    cfg = DataConfig(root=str(ben_v2_root), splits=["train"])
    ds = build_dataset(cfg, ["train", "validation"], {"s2": ["B02", "B03"]})
    assert isinstance(ds, BigEarthNetV2) and len(ds) == 16 and ds.bands == {"s2": ("B02", "B03")}
    with pytest.raises(ValueError, match="data.dataset"):
        build_dataset(DataConfig(dataset="globe230k", root=str(ben_v2_root)), ["train"], {"s1": list(S1_BANDS)})
