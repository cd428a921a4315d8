"""AdamW with MAE-style parameter groups (schedules: engine/schedule.py), and layer-wise learning-rate decay for
full fine-tuning (BEiT/MAE `param_groups_lrd`).

    param_groups(model, weight_decay)                  decayed weights | norms, biases, embeddings, tokens
    param_groups(model, weight_decay, layer_decay=0.75)
                                                       the same split per layer id, each group with `lr_scale`
    layer_ids(model)                                   ({parameter name: layer id}, depth)

Layer ids are backbone-agnostic: they come from the backbone's encoder blocks by depth (`models.layers
.encoder_layers`: the paper's model stem -> CAF -> encoder blocks, per-modality stem blocks of one depth sharing an
id; a StackViT's blocks). Embeddings, tokens and positions are layer 0, block depth d is layer d, and everything
after the blocks (the backbone's final norm, the task head) is layer depth + 1. A group's learning rate is the
scheduled one times `lr_scale = layer_decay ** (depth + 1 - layer id)`: 1 for the head, layer_decay ** (depth + 1)
for the embeddings. The TrainStep applies the scale on the device (engine/step.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mmfuse_fast.config import OptimConfig
from mmfuse_fast.models.layers import encoder_layers

__all__ = ["NO_DECAY_NAMES", "EMBEDDING_NAMES", "param_groups", "layer_ids", "build_optimizer"]

# Learned embeddings and tokens are not decayed (MAE, CROMA); neither are norms and biases (any tensor with < 2 dims).
NO_DECAY_NAMES = ("mask_token", "cls_token", "pos_embed", "modality_embed")
# The backbone's own attributes on its input side (tokenizers, patch projection, CLS token, ...): layer 0 for the
# layer-wise learning-rate decay.
EMBEDDING_NAMES = ("tokenizers", "patch_embed", "cls_token", "pos_embed", "modality_embed", "mask_token")


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2 or any(s in name for s in NO_DECAY_NAMES)


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """({name: layer id} for every parameter of `model`, encoder depth). `model` is a backbone, or a task model
    holding one as `.backbone` (its other parameters, the head, are layer depth + 1)."""
    backbone = getattr(model, "backbone", model)
    layers = encoder_layers(backbone)
    depth = len(layers)
    of_param: dict[torch.Tensor, int] = {}
    for layer_id, layer in enumerate(layers, 1):
        for _, block in layer:
            for p in block.parameters():
                of_param[p] = layer_id
    for name, p in backbone.named_parameters():
        if p not in of_param:
            of_param[p] = 0 if name.split(".")[0] in EMBEDDING_NAMES else depth + 1
    return {name: of_param.get(p, depth + 1) for name, p in model.named_parameters()}, depth


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """The trainable parameters in decayed weights and non-decayed norms/biases/embeddings/tokens; with
    `layer_decay` < 1 that split per layer id (`layer_ids`), each group carrying `layer_id` and `lr_scale`."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"config key 'layer_decay' must be in (0, 1]; got {layer_decay}")
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if layer_decay == 1.0:
        decay, no_decay = [], []
        for name, p in trainable:
            (no_decay if _no_decay(name, p) else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
                  {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
        return [g for g in groups if g["params"]]
    ids, depth = layer_ids(model)
    if depth == 0:
        raise ValueError(f"config key 'layer_decay' is {layer_decay} but {type(model).__name__} has no encoder "
                         f"blocks to decay over (models/layers.py, ENCODER_BLOCK_CONTAINERS)")
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in trainable:
        layer, skip = ids[name], _no_decay(name, p)
        group = groups.get((layer, skip))
        if group is None:
            group = groups[(layer, skip)] = {
                "params": [], "weight_decay": 0.0 if skip else weight_decay, "name": "no_decay" if skip else "decay",
                "layer_id": layer, "lr_scale": float(layer_decay ** (depth + 1 - layer))}
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device | None = None,
                    layer_decay: float = 1.0) -> torch.optim.AdamW:
    """The engine's AdamW over `param_groups`: fused on every device (it skips non-finite steps through its
    `found_inf` input) and capturable on CUDA (its step counts live on the device: CUDA graphs).

    With a weight-decay schedule (`optim.weight_decay_end`) the optimizer's own decay is 0 and the TrainStep
    applies the scheduled decay itself: fused AdamW would bake a Python `weight_decay` into a captured graph.
    With `layer_decay` < 1 every group's learning rate is scaled by its `lr_scale` (applied by the TrainStep)."""
    scheduled = cfg.weight_decay_end is not None
    groups = param_groups(model, 0.0 if scheduled else cfg.weight_decay, layer_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if len(cfg.betas) != 2:
        raise ValueError(f"config key 'optim.betas' must hold two numbers, got {cfg.betas}")
    cuda = device is not None and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True, capturable=cuda)
