"""Training engine: the step and loop shared by pretraining and fine-tuning, the entry points over them (pretrain,
finetune, evaluate, predict: side by side, none imports another but finetune calling evaluate), checkpoints, the run
directory, metrics, logging, plots.

    from mmfuse_fast.engine import pretrain, finetune, evaluate
    pretrain(load_config(PretrainConfig, "tiny"), "runs/pt")            # -> runs/pt/{config.yaml, metrics.jsonl, checkpoints/}
    finetune(load_config(FinetuneConfig, None, ["pretrained=runs/pt"]), "runs/ft")
    evaluate("runs/ft", split="test")                                   # -> runs/ft/metrics_test.json
"""

from mmfuse_fast.engine.checkpoint import (latest_checkpoint, load_checkpoint, load_weights, save_checkpoint,
                                           save_weights)
from mmfuse_fast.engine.evaluate import evaluate
from mmfuse_fast.engine.finetune import finetune
from mmfuse_fast.engine.logging import read_metrics
from mmfuse_fast.engine.metrics import MultiLabelMetrics, multilabel_metrics
from mmfuse_fast.engine.pretrain import pretrain
from mmfuse_fast.engine.tasks import TASKS, load_classifier
from mmfuse_fast.errors import CheckpointError, NonFiniteLossError, RunDirError

__all__ = [
    "pretrain", "finetune", "evaluate", "load_classifier", "TASKS",
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "save_weights", "load_weights",
    "MultiLabelMetrics", "multilabel_metrics", "read_metrics",
    "CheckpointError", "RunDirError", "NonFiniteLossError",
]
