"""`mmfuse experiment`: specs validated like configs, shared runs planned once, a sweep killed with SIGKILL and
started again ends with the results of an uninterrupted one, the report carries the paper's numbers."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mmfuse_fast.cli import main
from mmfuse_fast.config import ConfigError
from mmfuse_fast.experiment import load_spec, make_plan

ROOT = Path(__file__).resolve().parents[2]

MINI = {
    "methods": {"mmfuse": {"config": "{scale}", "label": "ours"}, "satvit": {"config": "satvit_{scale}"}},
    "scales": {"mini": {"configs": "tiny",
                        "pretrain": ["train.steps=2", "train.batch_size=4", "train.log_every=1",
                                     "train.checkpoint_every=1"],
                        "linear": ["train.steps=2", "train.batch_size=4", "train.log_every=1"]}},
    "tables": {
        "t1": {"title": "T1", "methods": ["mmfuse", "satvit"], "modalities": [["s1"], ["s1", "s2"]],
               "label_fractions": [1.0, 0.5], "random_init": True,
               "paper": {"ours": {"s1 100%": 50.0, "s1+s2 100%": 60.0}}},
        "t2": {"methods": ["mmfuse"], "variants": {"full": [], "no con": ["model.contrastive=false"]},
               "paper": {"full": {"map_micro": 90.4}}},
        "t3": {"task": "scene", "methods": ["mmfuse"], "metrics": ["top1", "f1"],
               "downstream_set": ["data.dataset=sen12ms"]},
    },
}


def write_spec(tmp_path, values=MINI, name="mini.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def test_paper_spec_lays_out_the_tables_and_shares_runs():
    spec = load_spec("paper")
    assert {"table2", "table3", "table4", "table5", "table6", "table7", "table8"} == set(spec.tables)
    plan = make_plan(spec, "tiny", "/tmp/unused")
    pretrain = [r for r in plan.runs.values() if r.kind == "pretrain"]
    # Table 2's four methods, Table 6's three ablations, Table 7's five fixed ratios, Table 8's four other weights:
    # the full model (random crop ratio 0.4-0.6, weight 0.5) is one run shared by Tables 2, 6, 7 and 8
    assert len(pretrain) == 4 + 3 + 5 + 4
    full_rows = {("table2", ""), ("table6", "full"), ("table7", "random 0.4-0.6"), ("table8", "0.5")}
    full = {c.pretrain for c in plan.cells if c.method == "mmfuse" and (c.table, c.variant) in full_rows}
    assert len(full) == 1
    no_data = {c.table for c in plan.cells if c.status == "no data"}
    assert no_data == {"table3", "table4", "table5"}  # no SEN12MS / segmentation data configured
    assert all(r.config["train"]["steps"] == 150 for r in pretrain)
    finetune = [r for r in plan.runs.values() if r.kind == "finetune"]
    assert {r.config["label_fraction"] for r in finetune} == {1.0, 0.01}
    assert all(r.config["label_seed"] == spec.label_seed for r in finetune)


def test_seeds_multiply_runs_and_a_table_scoped_root_reaches_its_runs_only():
    spec = load_spec("paper")
    one = make_plan(spec, "tiny", "/x", only=["table6"])
    two = make_plan(spec, "tiny", "/x", only=["table6"], seeds=2)
    assert len(two.runs) == 2 * len(one.runs)
    plan = make_plan(spec, "tiny", "/x", only=["table2", "table3"], overrides=["table3:data.root=/data/sen12ms"])
    roots = {(r.kind, r.config["data"]["dataset"], r.config["data"]["root"]) for r in plan.runs.values()}
    assert ("finetune", "sen12ms", "/data/sen12ms") in roots
    assert ("pretrain", "bigearthnet_v2", "") in roots and not any(
        k == "pretrain" and root for k, _, root in roots)  # Table 3 probes the BigEarthNet-pretrained backbones


@pytest.mark.parametrize("change,match", [
    (lambda s: s["tables"]["t1"].update(methods=["mmfuse", "nope"]), r"tables.t1.methods.*\['nope'\]"),
    (lambda s: s["tables"]["t1"].update(colour="red"), r"unknown config key 'tables.t1.colour'"),
    (lambda s: s["tables"]["t2"]["variants"].update(bad=["model.embed_dimm=8"]), r"model.embed_dimm"),
    (lambda s: s["tables"]["t1"]["paper"].update(nobody={"s1 100%": 1.0}), r"tables.t1.paper.nobody"),
    (lambda s: s["tables"]["t1"].update(label_fractions=[0.0]), r"tables.t1.label_fractions"),
])
def test_bad_spec_is_an_error_naming_the_key(tmp_path, change, match):
    values = json.loads(json.dumps(MINI))
    change(values)
    with pytest.raises(ConfigError, match=match):
        make_plan(load_spec(write_spec(tmp_path, values)), "mini", tmp_path / "out")


def test_bad_command_line_is_one_line(tmp_path, capsys):
    spec = write_spec(tmp_path)
    for args, match in ((["--scale", "huge"], "'huge'"), (["--only", "t9"], "t9"),
                        (["--set", "colour=red"], "colour"), (["--set", "t9:data.root=x"], "t9")):
        code = main(["experiment", "run", "--spec", str(spec), "--out", str(tmp_path / "o"), *args][:6] + args
                    if "--scale" in args else
                    ["experiment", "run", "--spec", str(spec), "--scale", "mini", "--out", str(tmp_path / "o"), *args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and match in err and "\n" not in err, err
    assert main(["experiment", "run", "--spec", "nope", "--scale", "tiny", "--out", str(tmp_path / "p")]) == 2


def test_print_launcher_writes_the_commands_in_dependency_order(tmp_path):
    out = tmp_path / "sweep"
    assert main(["experiment", "run", "--spec", str(write_spec(tmp_path)), "--scale", "mini", "--out", str(out),
                 "--launcher", "print"]) == 0
    lines = (out / "commands.sh").read_text().splitlines()
    plan = json.loads((out / "plan.json").read_text())
    assert len(lines) == len(plan["runs"])
    kinds = [line.split()[1] for line in lines]
    assert kinds == sorted(kinds, key=lambda k: k != "pretrain")
    assert all("--resume" in line and str(out / "configs") in line for line in lines)
    report = (out / "report.md").read_text()
    assert "pending" in report and "(paper 90.4)" in report


def _sweep(out: Path, spec: Path, root: Path, kill_after_runs: int | None = None):
    cmd = [sys.executable, "-m", "mmfuse_fast.cli", "experiment", "run", "--spec", str(spec), "--scale", "mini",
           "--out", str(out), "--set", f"data.root={root}", "--set", "model.ops_backend=reference"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_after_runs is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        return
    status = out / "status.json"
    t0 = time.time()
    while not (status.is_file() and len(json.loads(status.read_text())) >= kill_after_runs):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < 300
        time.sleep(0.05)
    time.sleep(0.5)  # into the next run
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _results(out: Path) -> dict:
    with open(out / "results.csv") as f:
        return {tuple(r[k] for k in ("table", "method", "modalities", "label_fraction", "variant", "seed", "metric")):
                float(r["value"]) for r in csv.DictReader(f)}


def test_sigkill_mid_sweep_then_resume_equals_an_uninterrupted_sweep(tmp_path, ben_v2_root):
    spec = write_spec(tmp_path, {**MINI, "tables": {k: MINI["tables"][k] for k in ("t1", "t2")}})
    _sweep(tmp_path / "straight", spec, ben_v2_root)
    _sweep(tmp_path / "killed", spec, ben_v2_root, kill_after_runs=2)
    status = json.loads((tmp_path / "killed" / "status.json").read_text())
    plan = json.loads((tmp_path / "killed" / "plan.json").read_text())
    assert len(status) < len(plan["runs"])  # killed mid-sweep
    _sweep(tmp_path / "killed", spec, ben_v2_root)
    straight, resumed = _results(tmp_path / "straight"), _results(tmp_path / "killed")
    assert straight.keys() == resumed.keys() and len(straight) == 2 * (4 * 3 + 2)  # t1: 3 rows x 4 cols; t2: 2
    for key, value in straight.items():
        assert resumed[key] == pytest.approx(value, abs=1e-6), key

    # a third start finds everything finished and runs nothing
    code = main(["experiment", "run", "--spec", str(spec), "--scale", "mini", "--out", str(tmp_path / "killed"),
                 "--set", f"data.root={ben_v2_root}", "--set", "model.ops_backend=reference"])
    assert code == 0
    assert _results(tmp_path / "killed") == resumed

    report = (tmp_path / "straight" / "report.md").read_text()
    assert "## T1" in report and "(paper 50)" in report and "(paper 60)" in report and "(paper 90.4)" in report
    assert "random init" in report and "pretraining_loss.png" in report
    assert (tmp_path / "straight" / "t1.png").is_file() and (tmp_path / "straight" / "pretraining_loss.png").is_file()
    # the report command alone rewrites the same tables
    assert main(["experiment", "report", str(tmp_path / "straight")]) == 0
    assert _results(tmp_path / "straight") == straight
