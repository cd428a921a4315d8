"""Training engine: pretraining and fine-tuning loops, evaluation, checkpoints, metrics, logging, plots.

    from mmfuse_fast.engine import pretrain, finetune, evaluate
    pretrain(load_config(PretrainConfig, "tiny"), "runs/pt")            # -> runs/pt/{config.yaml, metrics.jsonl, checkpoints/}
    finetune(load_config(FinetuneConfig, None, ["pretrained=runs/pt"]), "runs/ft")
    evaluate("runs/ft", split="test")                                   # -> runs/ft/metrics_test.json
"""

from mmfuse_fast.engine.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, load_weights,
                                           save_checkpoint, save_weights)
from mmfuse_fast.engine.evaluate import evaluate, load_classifier
from mmfuse_fast.engine.finetune import finetune
from mmfuse_fast.engine.logging import NonFiniteLossError, read_metrics
from mmfuse_fast.engine.metrics import MultiLabelMetrics, multilabel_metrics
from mmfuse_fast.engine.pretrain import pretrain, train_step
from mmfuse_fast.engine.runtime import RunDirError

__all__ = [
    "pretrain", "finetune", "evaluate", "train_step", "load_classifier",
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "save_weights", "load_weights",
    "MultiLabelMetrics", "multilabel_metrics", "read_metrics",
    "CheckpointError", "RunDirError", "NonFiniteLossError",
]
