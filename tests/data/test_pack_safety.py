"""`mmfuse data pack` cannot destroy data: the source, a good pack, or another packer's work."""

import json
import os
import subprocess
import sys

import pytest

from mmfuse_fast.cli import main
from mmfuse_fast.data import PackedDataset, SegmentationTiles, pack_dataset, verify_pack
from mmfuse_fast.data.pack import MANIFEST, pack_lock, work_paths
from mmfuse_fast.data.synthetic import write_seg_tiles
from mmfuse_fast.errors import PackError, UsageError

pytest.importorskip("rasterio")  # the synthetic datasets are GeoTIFFs
pytest.importorskip("lmdb")


def tree(path):
    """{relative path: bytes} of every file under `path`."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def seg(tmp_path):
    return write_seg_tiles(tmp_path / "seg", n=4, size=16)


def pack_argv(root, out, *extra):
    return ["data", "pack", "--format", "seg_tiles", "--root", str(root), "--out", str(out), "--no-progress",
            "--option", "num_classes=5", *extra]


@pytest.mark.parametrize("where", ["same", "inside", "above", "symlink_to_source", "partial_is_source"])
def test_an_output_that_is_the_source_inside_or_above_it_is_refused_and_nothing_is_touched(tmp_path, seg, where,
                                                                                           capsys):
    before = tree(seg)
    if where == "same":
        out = seg
    elif where == "inside":
        out = seg / "packed"
    elif where == "above":
        out = tmp_path
    elif where == "symlink_to_source":
        out = tmp_path / "link"
        out.symlink_to(seg, target_is_directory=True)
    else:  # the work folder beside OUT would be the source
        out = seg.with_name("seg_out")
        seg.rename(tmp_path / "seg_out.partial")
        seg = tmp_path / "seg_out.partial"
    with pytest.raises(UsageError, match="--out"):
        pack_dataset("seg_tiles", seg, out, options={"num_classes": 5}, progress=False)
    assert main(pack_argv(seg, out, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "--root" in err
    assert tree(seg) == before


def test_a_mistyped_root_with_overwrite_keeps_the_old_pack(tmp_path, seg, capsys):
    out = tmp_path / "packed"
    assert main(pack_argv(seg, out)) == 0
    before = tree(out)
    assert main(pack_argv(tmp_path / "sge", out, "--overwrite")) == 2
    assert "sge" in capsys.readouterr().err
    assert tree(out) == before and verify_pack(out)["samples"] == 4
    assert not work_paths(out)["partial"].exists() and not work_paths(out)["replaced"].exists()


def test_overwrite_builds_beside_the_old_pack_and_swaps_after_verification(tmp_path, seg, monkeypatch):
    out = tmp_path / "packed"
    pack_dataset("seg_tiles", seg, out, options={"num_classes": 5}, progress=False)
    before = tree(out)
    other = write_seg_tiles(tmp_path / "other", n=3, size=16, seed=1)

    def failing_verification(*args):
        assert tree(out) == before  # the old pack is untouched while the new one is written and checked
        raise PackError("verification failed (injected)")

    from mmfuse_fast.data import pack

    monkeypatch.setattr(pack, "_verify_written", failing_verification)
    with pytest.raises(PackError, match="injected"):
        pack_dataset("seg_tiles", other, out, options={"num_classes": 5}, overwrite=True, progress=False)
    assert tree(out) == before
    monkeypatch.undo()
    report = pack_dataset("seg_tiles", other, out, options={"num_classes": 5}, overwrite=True, progress=False)
    assert report["status"] == "packed" and report["samples"] == 3
    assert len(PackedDataset(out, split="all")) == 3
    assert {p.name for p in tmp_path.iterdir()} == {"seg", "other", "packed", "packed.lock"}


def test_a_swap_cut_short_is_undone(tmp_path, seg):
    out = tmp_path / "packed"
    pack_dataset("seg_tiles", seg, out, options={"num_classes": 5}, progress=False)
    before = tree(out)
    os.replace(out, work_paths(out)["replaced"])  # killed between moving the old pack aside and the new one in
    report = pack_dataset("seg_tiles", seg, out, options={"num_classes": 5}, progress=False)
    assert report["status"] == "already packed" and tree(out) == before
    assert not work_paths(out)["replaced"].exists()


def test_a_folder_that_is_not_a_pack_is_never_replaced(tmp_path, seg):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PackError, match="not a finished pack"):
        pack_dataset("seg_tiles", seg, out, options={"num_classes": 5}, overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine"


def test_resuming_with_other_options_or_another_root_is_refused(tmp_path, seg, capsys):
    out = tmp_path / "packed"
    first = pack_dataset("seg_tiles", seg, out, options={"num_classes": 5}, chunk=1, stop_after=2, progress=False)
    assert first["status"] == "interrupted"
    partial = work_paths(out)["partial"]
    kept = tree(partial)
    with pytest.raises(UsageError, match="field 'options'.*num_classes.*--overwrite"):
        pack_dataset("seg_tiles", seg, out, options={"num_classes": 6}, progress=False)
    copy = write_seg_tiles(tmp_path / "copy", n=4, size=16)
    with pytest.raises(UsageError, match=f"field 'root'.*{copy}"):
        pack_dataset("seg_tiles", copy, out, options={"num_classes": 5}, progress=False)
    assert main(pack_argv(seg, out, "--dtype", "bfloat16")) == 2
    err = capsys.readouterr().err
    assert "field 'dtype'" in err and err.count("\n") == 1
    assert tree(partial) == kept
    # the source's samples changed since the pack started
    for path in seg.rglob("tile_003.tif"):
        path.unlink()
    for name in ("train.txt", "val.txt", "test.txt"):
        path = seg / name
        if path.is_file():
            path.write_text("".join(line + "\n" for line in path.read_text().split() if line != "tile_003"))
    with pytest.raises(UsageError, match="field 'samples'"):
        pack_dataset("seg_tiles", seg, out, options={"num_classes": 5}, progress=False)
    # --overwrite discards the unfinished pack of other data and packs anew
    report = pack_dataset("seg_tiles", seg, out, options={"num_classes": 5}, overwrite=True, progress=False)
    assert report["status"] == "packed" and report["samples"] == 3 and report["resumed_verified"] == 0


def test_already_packed_answers_only_for_the_same_source(tmp_path, seg):
    out = tmp_path / "packed"
    pack_dataset("seg_tiles", seg, out, options={"num_classes": 5}, progress=False)
    assert pack_dataset("seg_tiles", seg, out, options={"num_classes": 5}, progress=False)["status"] == \
        "already packed"
    other = write_seg_tiles(tmp_path / "other", n=3, size=16)
    with pytest.raises(UsageError, match=f"already a pack of other data \\(field 'root'.*{other}"):
        pack_dataset("seg_tiles", other, out, options={"num_classes": 5}, progress=False)
    with pytest.raises(UsageError, match="field 'options'"):
        pack_dataset("seg_tiles", seg, out, options={"num_classes": 5, "reduce_zero_label": True}, progress=False)
    with pytest.raises(UsageError, match="field 'format'"):
        pack_dataset("sen12ms", seg, out, progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["packed"]["root"] == str(seg.resolve()) and manifest["packed"]["options"] == {"num_classes": 5}
    assert manifest["packed"]["format"] == "seg_tiles" and manifest["packed"]["split_lists"] == "source"


def test_a_second_packer_of_the_same_output_is_refused(tmp_path, seg, capsys):
    out = tmp_path / "packed"
    lock = work_paths(out)["lock"]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); f.write('pid 4242'); "
         "f.flush(); fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(pack_argv(seg, out)) == 1
        err = capsys.readouterr().err
        assert "another `mmfuse data pack` is writing this output" in err and "pid 4242" in err
        assert err.count("\n") == 1 and not out.exists() and not work_paths(out)["partial"].exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(pack_argv(seg, out)) == 0  # the lock dies with its holder


def test_the_lock_is_held_for_the_whole_pack(tmp_path, seg, monkeypatch):
    out = tmp_path / "packed"
    from mmfuse_fast.data import pack

    real_verify = pack._verify_written

    def verify_while_another_packer_tries(*args):
        with pytest.raises(PackError, match="another `mmfuse data pack`"):
            with pack_lock(work_paths(out.resolve())["lock"]):
                pass
        return real_verify(*args)

    monkeypatch.setattr(pack, "_verify_written", verify_while_another_packer_tries)
    assert pack_dataset("seg_tiles", seg, out, options={"num_classes": 5}, progress=False)["status"] == "packed"
    assert len(PackedDataset(out, split="all")) == len(SegmentationTiles(seg, num_classes=5))
