import json
import subprocess
import sys

import pytest

from mmfuse_fast import cli
from mmfuse_fast.cli import format_metrics_table, main
from mmfuse_fast.errors import CheckpointError, DataError, FetchError, Interrupted, NonFiniteLossError, PackError

TINY_120 = ["model.embed_dim=16", "model.num_heads=2", "model.decoder_dim=16", "model.decoder_heads=2",
            "model.decoder_depth=1", "model.encoder_depth=1", "model.proj_dim=8", "model.mlp_ratio=2.0",
            "model.patch_size=20"]


def _sets(items):
    return [a for s in items for a in ("--set", s)]


@pytest.mark.parametrize("argv,key", [
    (["pretrain", "--config", "tiny", "--set", "model.embed_dimm=32"], "model.embed_dimm"),
    (["pretrain", "--config", "tiny", "--set", "train.steps=many"], "train.steps"),
    (["pretrain", "--set", "data.splits=[train, test]"], "data.splits"),
    (["finetune", "--set", "label_fraction=0"], "label_fraction"),
    (["finetune", "--set", "optim.lrr=1"], "optim.lrr"),
    (["pretrain", "--config", "no_such_config"], "no_such_config"),
])
def test_config_errors_exit_2_naming_the_key(argv, key, tmp_path, capsys):
    code = main([*argv, "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert key in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_console_module_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mmfuse_fast.cli", "pretrain", "--run-dir", str(tmp_path),
                           "--set", "model.nope=1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "model.nope" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_end_to_end_on_real_sample(ben_v2_root, tmp_path, capsys):
    pt, ft = tmp_path / "pt", tmp_path / "ft"
    common = [f"data.root={ben_v2_root}", "train.batch_size=4", "train.log_every=1"]
    assert main(["pretrain", "--config", "tiny", "--run-dir", str(pt), "--no-progress",
                 *_sets(TINY_120 + common + ["train.steps=2"])]) == 0
    assert {"config.yaml", "metrics.jsonl", "checkpoints"} <= {p.name for p in pt.iterdir()}
    # a second run into the same directory is refused; --resume continues it
    assert main(["pretrain", "--config", "tiny", "--run-dir", str(pt), "--no-progress",
                 *_sets(TINY_120 + common + ["train.steps=2"])]) == 1
    assert "--resume" in capsys.readouterr().err
    assert main(["pretrain", "--run-dir", str(pt), "--resume", "--no-progress", "--set", "train.steps=3"]) == 0
    assert json.loads((pt / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3

    assert main(["finetune", "--pretrained", str(pt), "--run-dir", str(ft), "--no-progress",
                 *_sets([f"data.root={ben_v2_root}", "train.steps=2", "label_fraction=0.5", "eval_split="])]) == 0
    assert json.loads((ft / "label_subset.json").read_text())["n_selected"] == 4
    capsys.readouterr()
    assert main(["evaluate", "--run-dir", str(ft), "--split", "test", "--no-progress", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((ft / "metrics_test.json").read_text())
    assert {"map_micro", "map_macro", "f1_samples", "n_samples"} <= saved.keys()
    assert saved["n_samples"] == printed["n_samples"] == 8
    assert 0 <= saved["map_micro"] <= 1 and 0 <= saved["f1_samples"] <= 1
    assert main(["evaluate", "--run-dir", str(ft), "--split", "test", "--no-progress"]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in table.splitlines()[2:-1]}
    assert rows["map_micro"] == f"{saved['map_micro']:.4f}" and rows["n_samples"] == "8"
    assert table.splitlines()[-1].startswith("ap_per_class: 19 classes")
    assert_one_line_error(main(["evaluate", "--run-dir", str(ft), "--split", "foo", "--no-progress"]), 2, capsys,
                          "'foo'", "train, validation (or val), test", str(ben_v2_root))


def assert_one_line_error(code, expected_code, capsys, *fragments):
    captured = capsys.readouterr()
    assert code == expected_code, captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    for fragment in fragments:
        assert fragment in captured.err, (fragment, captured.err)
    return captured.err


def test_evaluate_unknown_split_and_table_on_synthetic_tiles(tmp_path, capsys):
    pytest.importorskip("rasterio")
    from mmfuse_fast.data.synthetic import write_seg_tiles

    root = write_seg_tiles(tmp_path / "tiles", n=4, size=16, modalities={"rgb": (3, 1)}, num_classes=4)
    run = tmp_path / "ft"
    assert main(["finetune", "--run-dir", str(run), "--no-progress", *_sets([
        "task=segmentation", "mode=full", "data.dataset=seg_tiles", f"data.root={root}", "data.num_classes=4",
        "model.modalities={rgb: [rgb_0, rgb_1, rgb_2]}", "model.img_size=16", "model.patch_size=4",
        "model.embed_dim=16", "model.num_heads=2", "model.decoder_dim=16", "model.decoder_heads=2",
        "model.decoder_depth=1", "model.encoder_depth=1", "model.mlp_ratio=2.0", "train.device=cpu",
        "train.steps=1", "train.batch_size=2", "eval_split=", "seg_channels=8"])]) == 0
    capsys.readouterr()
    err = assert_one_line_error(main(["evaluate", "--run-dir", str(run), "--split", "foo", "--no-progress"]), 2,
                                capsys, "'foo'", "train, validation (or val), test", str(root))
    assert err.startswith("mmfuse evaluate: error: unknown split")
    assert main(["evaluate", "--run-dir", str(run), "--split", "train", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["metric", "value"] and set(lines[1]) == {"-"}
    rows = dict(line.split(None, 1) for line in lines[2:] if ":" not in line.split()[0])
    assert rows["split"] == "train" and rows["task"] == "segmentation" and 0 <= float(rows["miou"]) <= 1
    assert "iou_per_class: 4 classes" in "\n".join(lines)


@pytest.mark.parametrize("error,code", [
    (DataError("unknown split 'foo' (dataset at /d); valid splits: train"), 2),
    (CheckpointError("no checkpoint in /r"), 1),
    (PackError("/p: key k missing or corrupt"), 1),
    (FetchError("`pip download` failed (exit 1):\nno network\nat all"), 1),
    (NonFiniteLossError("loss is NaN for 5 steps"), 1),
    (Interrupted("pack interrupted; run the same command again to resume"), 130),
    (FileNotFoundError("/cfg.yaml does not exist"), 2),
    (KeyboardInterrupt(), 130),
])
def test_every_user_error_is_one_line_with_its_exit_code(error, code, monkeypatch, capsys):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_run", fail)
    err = assert_one_line_error(main(["data", "pack", "--format", "seg_tiles", "--root", "r", "--out", "o"]), code,
                                capsys)
    assert err.startswith("mmfuse data pack: error: ")
    assert err.split("error: ", 1)[1].strip() == (" ".join(str(error).split()) or "interrupted")


def test_a_bug_keeps_its_traceback(monkeypatch):
    def fail(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_run", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["evaluate", "--run-dir", "r"])


def test_metrics_table():
    result = {"split": "test", "data_root": "/data/ben", "map_micro": 0.51234, "map_macro": float("nan"),
              "n_samples": 8, "ap_per_class": {"a": 0.5, "b": 0.25}, "task": "multilabel", "wall_s": 1.5}
    lines = format_metrics_table(result).splitlines()
    assert lines[0].split() == ["metric", "value"] and set(lines[1]) == {"-"}
    assert [line.split() for line in lines[2:8]] == [["split", "test"], ["data_root", "/data/ben"],
                                                     ["map_micro", "0.5123"], ["map_macro", "n/a"],
                                                     ["n_samples", "8"], ["task", "multilabel"]]
    assert lines[-1].startswith("ap_per_class: 2 classes") and "metrics_test.json" in lines[-1]
    assert len({line.index(line.split()[1]) for line in lines[2:9]}) == 1  # values in one column
