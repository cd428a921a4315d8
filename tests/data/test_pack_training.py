"""Training from a pack as the README says (`data.dataset=packed`), split "all", and the default split of a pack
whose source has no split lists."""

import json

import pandas as pd
import pytest
import torch

from mmfuse_fast.cli import main
from mmfuse_fast.data import BigEarthNetV1, BigEarthNetV2, PackedDataset, SegmentationTiles, pack_dataset
from mmfuse_fast.data.pack import MANIFEST, default_splits
from mmfuse_fast.data.synthetic import write_bigearthnet_v1, write_seg_tiles
from mmfuse_fast.errors import DataError
from test_pack import assert_same  # tests/data is on the path: pytest puts a test file's folder there

pytest.importorskip("rasterio")  # the synthetic datasets are GeoTIFFs
pytest.importorskip("lmdb")


def sets(*items):
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def ben_without_split_lists(tmp_path_factory):
    return write_bigearthnet_v1(tmp_path_factory.mktemp("ben") / "v1", n=8, splits=False)


def test_pretrain_finetune_evaluate_on_a_pack_made_without_split_lists(ben_without_split_lists, tmp_path, capsys):
    out, grid = tmp_path / "packed", tmp_path / "grid"
    for extra, target in (([], out), (["--grid"], grid)):
        assert main(["data", "pack", "--format", "bigearthnet_v1", "--root", str(ben_without_split_lists), "--out",
                     str(target), "--no-progress", *extra]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["samples"] == 8 and report["split_lists"].startswith("default")
    common = ["--no-progress", *sets("data.dataset=packed", "train.steps=2", "train.batch_size=4",
                                     "train.log_every=1")]
    # the grid layout, every sample
    assert main(["pretrain", "--config", "tiny", "--run-dir", str(tmp_path / "pt"), *common,
                 *sets(f"data.root={grid}", "data.splits=[all]")]) == 0
    # the BigEarthNet v2 layout, the default split
    assert main(["finetune", "--pretrained", str(tmp_path / "pt"), "--run-dir", str(tmp_path / "ft"), *common,
                 *sets(f"data.root={out}")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run-dir", str(tmp_path / "ft"), "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["n_samples"] == 1


def test_a_grid_pack_of_bigearthnet_reads_as_the_geotiff_reader(ben_without_split_lists, tmp_path):
    pack_dataset("bigearthnet_v1", ben_without_split_lists, tmp_path / "grid", grid=True, progress=False)
    assert_same(BigEarthNetV1(ben_without_split_lists, split="all"), PackedDataset(tmp_path / "grid", split="all"))
    picked = {"modalities": ["s2"], "bands": {"s2": ["B12", "B02"]}}
    assert_same(BigEarthNetV1(ben_without_split_lists, split="all", **picked),
                PackedDataset(tmp_path / "grid", split="all", **picked))
    packed = PackedDataset(tmp_path / "grid", split="all")
    assert packed.task == "multilabel" and packed.num_classes == 19
    assert torch.equal(torch.from_numpy(packed.labels), torch.stack([packed[i]["label"] for i in range(len(packed))]))


def test_packed_reads_a_bigearthnet_v2_layout_pack_as_bigearthnet_v2(ben_without_split_lists, tmp_path):
    out = tmp_path / "packed"
    pack_dataset("bigearthnet_v1", ben_without_split_lists, out, progress=False)
    for split in ("all", "train", ["validation", "test"]):
        packed = PackedDataset(out, split=split)
        assert isinstance(packed, BigEarthNetV2)
        assert_same(BigEarthNetV2(out, split=split), packed)
    assert_same(BigEarthNetV1(ben_without_split_lists, split="all"), PackedDataset(out, split=None))


def test_split_all_selects_every_sample_of_a_pack(tmp_path):
    seg = write_seg_tiles(tmp_path / "seg", n=8, size=16)
    pack_dataset("seg_tiles", seg, tmp_path / "packed", options={"num_classes": 5}, progress=False)
    every = SegmentationTiles(seg, num_classes=5)
    for split in ("all", ["all"], None, ["train", "all"]):
        assert_same(every, PackedDataset(tmp_path / "packed", split=split))
    train = PackedDataset(tmp_path / "packed", split="train")
    assert 0 < len(train) < len(every)


def test_a_pack_without_split_lists_gets_a_default_split(tmp_path):
    seg = write_seg_tiles(tmp_path / "seg", n=20, size=16, splits=False)
    report = pack_dataset("seg_tiles", seg, tmp_path / "packed", options={"num_classes": 5}, progress=False)
    assert report["split_lists"] == "default: 80% train, 10% validation, 10% test by id hash"
    sizes = {name: len(PackedDataset(tmp_path / "packed", split=name)) for name in ("train", "validation", "test")}
    assert sizes == {"train": 16, "validation": 2, "test": 2}
    ids = [i for name in sizes for i in PackedDataset(tmp_path / "packed", split=name).ids]
    assert sorted(ids) == sorted(SegmentationTiles(seg, num_classes=5).ids)
    manifest = json.loads((tmp_path / "packed" / MANIFEST).read_text())
    assert manifest["packed"]["split_lists"].startswith("default") and manifest["split_counts"]["train"] == 16
    # the same ids get the same splits, in any order
    assert default_splits(list(reversed(ids))) == default_splits(ids)
    assert set(default_splits(["a", "b", "c"]).values()) == {"train", "validation", "test"}


def test_a_split_that_selects_nothing_names_the_pack_and_says_what_to_use(tmp_path):
    seg = write_seg_tiles(tmp_path / "seg", n=4, size=16)
    out = tmp_path / "packed"
    pack_dataset("seg_tiles", seg, out, options={"num_classes": 5}, progress=False)
    table = pd.read_parquet(out / "metadata.parquet")
    table.loc[table["split"] == "test", "split"] = "train"
    table.to_parquet(out / "metadata.parquet", index=False)
    with pytest.raises(DataError, match=f"split 'test' selects no sample of the pack {out} \\(its splits: train"):
        PackedDataset(out, split="test")
    table["split"] = None  # a pack made before packs got a default split
    table.to_parquet(out / "metadata.parquet", index=False)
    with pytest.raises(DataError, match="no split lists.*split 'all' \\(data.splits=\\[all\\]\\)"):
        PackedDataset(out, split=["train"])
    assert len(PackedDataset(out, split="all")) == 4


def test_pretraining_from_a_grid_pack_normalizes_on_the_device(ben_without_split_lists, tmp_path, monkeypatch):
    """The loader ships the stored values and the step normalizes them: the same losses as the host-normalized
    reader, bit for bit (a Subset hides `raw_values`, so that run normalizes on the host)."""
    from torch.utils.data import Subset

    from mmfuse_fast.config import PretrainConfig, load_config
    from mmfuse_fast.engine.data import DeviceNormalize, normalize_on_device
    from mmfuse_fast.engine.pretrain import pretrain
    from mmfuse_fast.engine.logging import read_metrics

    pack_dataset("bigearthnet_v1", ben_without_split_lists, tmp_path / "grid", grid=True, dtype="bfloat16",
                 progress=False)
    packed = PackedDataset(tmp_path / "grid", split="all")
    raw, normalize = normalize_on_device(packed, "cpu")
    assert normalize is not None and raw[0]["s2"].dtype == torch.bfloat16
    cfg = load_config(PretrainConfig, "tiny", ["train.steps=3", "train.batch_size=4", "train.log_every=1",
                                               "train.device=cpu", "model.ops_backend=reference"])
    calls = []
    normalize_batch = DeviceNormalize.__call__
    monkeypatch.setattr(DeviceNormalize, "__call__", lambda self, batch: calls.append(1) or normalize_batch(self, batch))
    losses = {}
    for name, dataset in (("device", packed), ("host", Subset(packed, range(len(packed))))):
        pretrain(cfg, tmp_path / name, dataset=dataset, progress=False)
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r]
    assert len(losses["device"]) == 3 and losses["device"] == losses["host"]
    assert len(calls) == 3  # one per step of the device run, none in the host run
