"""The numbers the engine computes for fixed seeds, recorded to `golden_numbers.json` and checked by
test_engine_golden.py: per-step losses of 20 steps of `tiny` pretraining and of a 20-step linear probe and 6 steps of full
fine-tuning on its weights, on deterministic synthetic BigEarthNet-shaped data (120 px, all 14 bands), on the CPU.

    python tests/engine/_golden.py --write      # records (only when the engine's numbers are meant to change)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset

GOLDEN = Path(__file__).with_name("golden_numbers.json")
PRETRAIN_KEYS = ("loss", "loss_rec", "loss_con", "grad_norm", "lr")
PROBE_KEYS = ("loss", "grad_norm", "lr")


class GoldenBEN(Dataset):
    """BigEarthNet-shaped samples at 120 px, a pure function of the index."""

    def __init__(self, n: int = 24, offset: int = 0):
        self.n, self.offset = n, offset
        self.ids = [f"golden_{offset + i:03d}" for i in range(n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(7000 + self.offset + i)
        s1 = torch.randn(2, 120, 120, generator=g)
        s2 = torch.randn(12, 120, 120, generator=g) * 0.5 + s1[:1]
        label = (torch.rand(19, generator=g) < 0.3).float()
        return {"s1": s1, "s2": s2, "label": label, "id": self.ids[i]}


def _rows(run_dir: Path, keys) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"step": r["step"], **{k: r[k] for k in keys if k in r}} for r in rows]


def run(tmp: Path) -> dict:
    from mmfuse_fast.config import FinetuneConfig, PretrainConfig, load_config
    from mmfuse_fast.engine import finetune, pretrain

    torch.set_num_threads(1)  # one thread: reductions in one fixed order
    cfg = load_config(PretrainConfig, "tiny", ["train.steps=20", "train.log_every=1", "train.checkpoint_every=20",
                                                "model.ops_backend=reference", "train.device=cpu"])
    pretrain(cfg, tmp / "pt", dataset=GoldenBEN(24), progress=False)
    ft = load_config(FinetuneConfig, None, [f"pretrained={tmp / 'pt'}", "train.steps=20", "train.log_every=1",
                                            "train.checkpoint_every=20", "train.device=cpu", "eval_split=test"])
    out = finetune(ft, tmp / "probe", dataset=GoldenBEN(24), eval_dataset=GoldenBEN(8, offset=100),
                   progress=False)
    ev = out["eval"]
    full = load_config(FinetuneConfig, None, [f"pretrained={tmp / 'pt'}", "mode=full", "train.steps=6",
                                              "train.log_every=1", "train.device=cpu", "eval_split=",
                                              "model.ops_backend=reference"])
    finetune(full, tmp / "full", dataset=GoldenBEN(24), progress=False)
    return {"pretrain": _rows(tmp / "pt", PRETRAIN_KEYS), "probe": _rows(tmp / "probe", PROBE_KEYS),
            "probe_eval": {k: ev[k] for k in ("map_micro", "map_macro", "f1_samples")},
            "full": _rows(tmp / "full", PROBE_KEYS)}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        numbers = run(Path(d))
    if "--write" in sys.argv:
        GOLDEN.write_text(json.dumps(numbers, indent=1) + "\n")
    print(json.dumps(numbers)[:2000])
