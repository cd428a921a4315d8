"""The GPU session script (benchmarks/gpu_session.sh) runs every stage of both calls on the CPU at tiny sizes, so
that it cannot rot between the rare sessions that have a GPU."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FILES = 8  # what one call may leave in $OUT


@pytest.mark.slow
def _curated_files():
    return {(p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in (ROOT / "benchmarks" / "results").iterdir()}


def test_dry_run_runs_every_stage_and_writes_rows(tmp_path):
    curated = _curated_files()
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)  # the script sets what its dry run needs
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]

    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= MAX_FILES, files
    with (tmp_path / "stages.csv").open() as fh:
        stages = list(csv.DictReader(fh))
    assert {s["stage"] for s in stages} >= {"device_facts", "build_extension", "test_selections", "crop_resize",
                                            "train_step_baselines", "attention", "infonce", "train_step"}
    assert all(s["exit"] == "0" for s in stages), stages
    assert json.loads((tmp_path / "facts.json").read_text())["ceilings"]["copy_tbps"] > 0
    for bench in ("modality_attention", "infonce", "crop_resize", "train_step"):
        with (tmp_path / f"{bench}.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert any(r["status"] == "ok" for r in rows), (bench, rows)
    assert _curated_files() == curated, "a benchmark wrote into benchmarks/results/"
