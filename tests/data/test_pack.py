import json

import pytest
import torch

from mmfuse_fast.cli import main
from mmfuse_fast.data import pack
from mmfuse_fast.data import (SEN12MS, BigEarthNetV1, BigEarthNetV2, PackedDataset, PackError, SegmentationTiles,
                              pack_dataset, verify_pack)
from mmfuse_fast.data.synthetic import write_bigearthnet_v1, write_sen12ms, write_seg_tiles
from mmfuse_fast.errors import DataError

pytest.importorskip("rasterio")  # the synthetic datasets are GeoTIFFs
lmdb = pytest.importorskip("lmdb")


def assert_same(a, b):
    assert len(a) == len(b) and list(a.ids) == list(b.ids)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys() and x["id"] == y["id"]
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (i, k)


def test_bigearthnet_v1_packs_to_the_v2_layout(tmp_path):
    root = write_bigearthnet_v1(tmp_path / "ben", n=6)
    report = pack_dataset("bigearthnet_v1", root, tmp_path / "packed", progress=False)
    assert report["status"] == "packed" and report["samples"] == 6 and report["keys"] == 12
    assert (tmp_path / "packed" / "BigEarthNet-V2-LMDB" / "data.mdb").is_file()
    for split in ("train", "validation", "test"):
        assert_same(BigEarthNetV1(root, split=split), BigEarthNetV2(tmp_path / "packed", split=split))
    assert_same(BigEarthNetV1(root, split=None, modalities=["s2"], normalize=False),
                BigEarthNetV2(tmp_path / "packed", split=None, modalities=["s2"], normalize=False))
    dropped = BigEarthNetV2(tmp_path / "packed", split="train", drop_snow_cloud=True)
    assert_same(BigEarthNetV1(root, split="train", drop_snow_cloud=True), dropped)
    assert pack_dataset("bigearthnet_v1", root, tmp_path / "packed", progress=False)["status"] == "already packed"


def test_sen12ms_and_seg_tiles_pack_read_equality(tmp_path):
    sen = write_sen12ms(tmp_path / "sen", size=16)
    pack_dataset("sen12ms", sen, tmp_path / "sen_packed", progress=False)
    assert_same(SEN12MS(sen), PackedDataset(tmp_path / "sen_packed"))
    assert_same(SEN12MS(sen, modalities=["s2"], bands={"s2": ["B10", "B02"]}),
                PackedDataset(tmp_path / "sen_packed", modalities=["s2"], bands={"s2": ["B10", "B02"]}))
    seg = write_seg_tiles(tmp_path / "seg", n=4, size=16, nodata_tile=2)
    options = {"num_classes": 5, "modalities": {"rgb": "rgb", "radar": "sar"}}
    pack_dataset("seg_tiles", seg, tmp_path / "seg_packed", options=options, progress=False)
    packed = PackedDataset(tmp_path / "seg_packed", split="train")
    assert_same(SegmentationTiles(seg, split="train", **options), packed)
    assert packed.task == "segmentation" and packed.num_classes == 5 and packed.ignore_index == 255


def test_interrupted_pack_resumes_and_is_never_a_dataset(tmp_path):
    seg = write_seg_tiles(tmp_path / "seg", n=6, size=16)
    out = tmp_path / "packed"
    first = pack_dataset("seg_tiles", seg, out, chunk=2, stop_after=3, progress=False)
    assert first["status"] == "interrupted" and not out.exists()
    with pytest.raises(FileNotFoundError, match="not a finished pack"):
        PackedDataset(out)
    # a blob damaged in the partial pack is found on resume and packed again
    partial = tmp_path / "packed.partial" / "data-LMDB"
    env = lmdb.open(str(partial))
    with env.begin(write=True) as txn:
        txn.put(b"tile_000", b"garbage")
    env.close()
    report = pack_dataset("seg_tiles", seg, out, chunk=2, progress=False)
    assert report["status"] == "packed" and report["samples"] == 6
    assert report["resumed_verified"] == 2 and report["new"] == 4  # tile_000 re-packed, tiles 1 and 2 kept
    assert not (tmp_path / "packed.partial").exists()
    assert_same(SegmentationTiles(seg), PackedDataset(out))
    assert verify_pack(out)["keys"] == 6


def test_verify_detects_damage_and_cli(tmp_path, capsys):
    seg = write_seg_tiles(tmp_path / "seg", n=3, size=16)
    out = tmp_path / "packed"
    assert main(["data", "pack", "--format", "seg_tiles", "--root", str(seg), "--out", str(out),
                 "--option", "num_classes=5", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 3
    assert main(["data", "pack", "--format", "seg_tiles", "--root", str(seg), "--out", str(out), "--verify"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["keys"] = 4
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackError, match="3 keys, manifest says 4"):
        verify_pack(out)
    assert main(["data", "pack", "--format", "seg_tiles", "--root", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "o2")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["data", "pack", "--format", "seg_tiles", "--root", str(seg), "--out", str(tmp_path / "o3"),
                 "--option", "colour=red"]) == 2
    assert "colour" in capsys.readouterr().err



def test_ctrl_c_during_pack_is_one_line_and_the_same_command_resumes(tmp_path, monkeypatch, capsys):
    seg = write_seg_tiles(tmp_path / "seg", n=6, size=16)
    out = tmp_path / "packed"
    argv = ["data", "pack", "--format", "seg_tiles", "--root", str(seg), "--out", str(out), "--no-progress",
            "--option", "num_classes=5"]
    read_sample = pack._raster_records
    packed = []

    def ctrl_c_after_four_samples(ds, index, *args):
        if len(packed) == 4:
            raise KeyboardInterrupt
        packed.append(index)
        return read_sample(ds, index, *args)

    monkeypatch.setattr(pack, "_raster_records", ctrl_c_after_four_samples)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("mmfuse data pack: error: pack interrupted; 4 packed samples are kept")
    assert "run the same command again to resume" in err
    assert not out.exists() and (tmp_path / "packed.partial").is_dir()

    monkeypatch.undo()
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["resumed_verified"] == 4 and report["new"] == 2 and report["samples"] == 6
    assert not (tmp_path / "packed.partial").exists() and not (out / "progress.jsonl").exists()
    assert verify_pack(out)["keys"] == 6
    assert_same(SegmentationTiles(seg, num_classes=5), PackedDataset(out))


def test_every_reader_names_an_unknown_split(tmp_path):
    ben = write_bigearthnet_v1(tmp_path / "ben", n=3)
    pack_dataset("bigearthnet_v1", ben, tmp_path / "ben_packed", progress=False)
    seg = write_seg_tiles(tmp_path / "seg", n=3, size=16)
    pack_dataset("seg_tiles", seg, tmp_path / "seg_packed", options={"num_classes": 5}, progress=False)
    sen = write_sen12ms(tmp_path / "sen", size=16)
    readers = [(BigEarthNetV1, ben), (BigEarthNetV2, tmp_path / "ben_packed"), (SEN12MS, sen),
               (SegmentationTiles, seg), (PackedDataset, tmp_path / "seg_packed")]
    for reader, root in readers:
        with pytest.raises(DataError) as error:
            reader(root, split=["train", "foo"])
        message = str(error.value)
        assert "'foo'" in message and str(root) in message and "train, validation (or val), test" in message
    with pytest.raises(DataError, match="'tain' .*in split_files"):
        SegmentationTiles(seg, split_files={"tain": seg / "train.csv"})
    with pytest.raises(DataError, match="empty split list"):
        BigEarthNetV2(tmp_path / "ben_packed", split=[])
