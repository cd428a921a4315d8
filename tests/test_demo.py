"""`make demo` end to end on the real sample, shortened to a few steps so the entry point cannot rot unseen."""

import json

from mmfuse_fast import demo


def test_demo_runs_twice_and_writes_its_outputs(ben_v2_root, tmp_path, capsys):
    args = ["--run-dir", str(tmp_path), "--data-root", str(ben_v2_root), "--steps", "3", "--finetune-steps", "2",
            "--no-progress"]
    for _ in range(2):  # a re-run cleans its own outputs and starts over
        assert demo.main(args) == 0
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["pretrain"]["steps"] == 3 and summary["finetune"]["steps"] == 2
    assert summary["test"]["n_samples"] == 8  # the test split, never trained on
    for key in ("map_micro", "map_macro", "f1_samples"):
        assert 0.0 <= summary["test"][key] <= 1.0
    for png in ("loss_curve.png", "reconstructions.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "mAP (micro)" in printed and "mAP (macro)" in printed
