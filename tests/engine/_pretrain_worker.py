"""Runs `pretrain` on the synthetic dataset in its own process (distributed and kill/resume tests).

    python tests/engine/_pretrain_worker.py RUN_DIR '<json: {"overrides": [...], "n": 12, "resume": false}>'

An optional "model" (a name in mmfuse_fast.models.MODELS) starts from that model's tiny overrides
(conftest.TINY_MODELS) instead of TINY, the paper's model's. An optional "gate" (a file path) holds every data
read until that file exists, so a test can let the run start (imports, model) and release it later.

torchrun-style environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) make it one rank of
a gloo group. Prints the summary as JSON on its last line (rank 0)."""

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)

from conftest import TINY, SyntheticBEN, tiny_model_overrides  # noqa: E402

from mmfuse_fast.config import PretrainConfig, load_config  # noqa: E402
from mmfuse_fast.engine.pretrain import pretrain  # noqa: E402


class _Slow(torch.utils.data.Dataset):
    def __init__(self, data, sleep, gate=None):
        self.data, self.sleep, self.gate = data, sleep, gate

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        while self.gate is not None and not os.path.exists(self.gate):
            time.sleep(0.01)
        time.sleep(self.sleep)
        return self.data[i]


def main() -> int:
    run_dir, spec = sys.argv[1], json.loads(sys.argv[2])
    tiny = tiny_model_overrides(spec["model"]) if spec.get("model") else TINY
    cfg = load_config(PretrainConfig, None, tiny + ["train.device=cpu", *spec.get("overrides", [])])
    data = SyntheticBEN(n=spec.get("n", 12), nan_at=spec.get("nan_at"))
    if spec.get("sleep") or spec.get("gate"):  # slow data: lets a test signal the run in mid-flight
        data = _Slow(data, spec.get("sleep", 0.0), spec.get("gate"))
    out = pretrain(cfg, run_dir, resume=spec.get("resume", False), dataset=data, progress=False)
    # shutdown_distributed frees the process group, joining its gloo threads (one still releasing a collective's
    # tensors at interpreter exit aborts the process). FSDP2: torch's DTensor caches keep the group until exit.
    if cfg.train.distributed != "fsdp2":
        tasks = "/proc/self/task"
        threads = [open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)] if os.path.isdir(tasks) else []
        assert not [t for t in threads if "gloo" in t], f"gloo threads outlive the process group: {threads}"
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(out, default=str), flush=True)
    return out.get("exit_code", 0)


if __name__ == "__main__":
    sys.exit(main())
