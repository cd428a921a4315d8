import json
import subprocess
import sys

import pytest

from mmfuse_fast.cli import main

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
    assert main(["evaluate", "--run-dir", str(ft), "--split", "test", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((ft / "metrics_test.json").read_text())
    assert {"map_micro", "map_macro", "f1_samples", "n_samples"} <= saved.keys()
    assert saved["n_samples"] == printed["n_samples"] == 8
    assert 0 <= saved["map_micro"] <= 1 and 0 <= saved["f1_samples"] <= 1
