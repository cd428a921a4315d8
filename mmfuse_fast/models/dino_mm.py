"""DINO-MM (Wang, Albrecht, Zhu; IGARSS 2022; zhu-xlab/DINO-MM): DINO self-distillation (Caron et al. 2021;
facebookresearch/dino) of a ViT over the channel stack of S2 + S1, with a random sensor drop per view. Sources
and our choices: docs/baselines.md, "DINO-MM".

Shapes: B batch, C = sum C_m stacked channels, V = 2 + L views (2 global of img_size, L = local_crops_number local
of local_crop_size), D encoder width, K = out_dim prototypes. Views are image-major inside a view kind: row
b * v + i is view i of sample b (so the per-rank slices of a global-batch draw are this rank's samples).

    forward(batch, generator, step)
      stack          {m: (B, C_m, H, W)} -> (B, C, H, W)                               StackViT.stack
      draw_noise     boxes (2B, 4) + (LB, 4), flip (B, V), keep (B, V, M): every random number, first
      views          one crop_resize per view kind (box_index: many boxes per image) -> flip -> sensor drop:
                     global (2B, C, H, W), local (LB, C, h, h)
      teacher        no grad: ViT CLS of the global views -> head: (2B, K)
      student        ViT CLS of the global views (one call) and of the local views (one call) -> one head pass:
                     (2B + LB, K)
      loss           mean over (teacher global view i, student view v != i) of
                     CE(softmax((t_i - center) / tT), log_softmax(s_v / tS)), mean over the batch
      centering      the teacher outputs' sum (all-reduced over ranks) and count are accumulated into buffers
    after_optimizer_step(step_t, skipped)    (inside the step and its CUDA graph; nothing when skipped)
      center <- m_c * center + (1 - m_c) * batch mean;  teacher <- m * teacher + (1 - m) * student

Where each detail comes from:
  DINO      the head (3-layer MLP, GELU, L2-normalize, weight-normalized last layer with g fixed to 1 and no bias,
            trunc-normal .02 init), the loss over all (teacher global, other student view) pairs, centering (EMA
            0.9 of the all-reduced batch mean), teacher temperature with linear warmup, teacher EMA with a cosine
            momentum 0.996 -> 1 per update, freezing the last layer at the start, 2 global crops of scale
            (0.4, 1) + L local crops of scale (0.05, 0.4) with a resampled position embedding, per-crop flip p=0.5,
            the teacher seeing only the global crops and evaluated downstream, the student and teacher with the
            same initialization. Optimizer side (configs): AdamW, weight decay 0.04 -> 0.4 cosine, per-parameter
            gradient clipping at 3.0 (engine/step.py).
  DINO-MM   all S2 + S1 channels stacked into one ViT input; per view, with probability 0.5, the channels of one
            sensor chosen uniformly are zeroed (RandomSensorDrop_S1S2); single-sensor evaluation zeroes the other
            sensor's channels (missing_modality "zero").
  ours      the views are made on the device from the (already normalized) batch: bilinear crop_resize (DINO-MM
            uses bicubic RandomResizedCrop on uint8 images), global views at img_size (DINO-MM crops 112 px from
            128 px images), and a zeroed channel is the normalized band mean (DINO-MM zeroes in its [0, 1] scale,
            i.e. at mean - 2 std). No colour/blur/solarize augmentation (DINO-MM's brightness, contrast, gray,
            blur and solarize work on uint8 images) and no stochastic depth (DINO: 0.1 in the student); the ViT
            is the shared StackViT (fixed sin-cos positions, MAE init; DINO learns its positions). The
            last-layer freeze gates its gradient to zero (straight-through, no host sync) instead of setting it
            to None: AdamW's decoupled weight decay still shrinks weight_v while it is frozen (which leaves the
            output unchanged, as the layer normalizes the rows of weight_v) and AdamW's step count for it
            starts at step 0 (bias correction). Schedules are per update (DINO: per iteration too, the teacher
            temperature per epoch).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmfuse_fast import ops
from mmfuse_fast.config import BaseModelConfig, register_model_config, require
from mmfuse_fast.models.draws import GlobalBatchDraws
from mmfuse_fast.models.layers import set_backend
from mmfuse_fast.models.registry import register_model
from mmfuse_fast.models.vit import StackViT

__all__ = ["DinoMMConfig", "DinoMM", "DINOHead"]


@register_model_config("dino_mm")
@dataclass
class DinoMMConfig(BaseModelConfig):
    """DINO-MM (mmfuse_fast/models/dino_mm.py). Defaults: the CPU-sized `dino_mm_tiny`."""

    name: str = "dino_mm"
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True  # DINO's ViT has a qkv bias
    head_hidden_dim: int = 256  # DINO: 2048
    head_bottleneck_dim: int = 64  # DINO: 256
    out_dim: int = 1024  # K prototypes; DINO: 65536
    local_crops_number: int = 2  # DINO(-MM): 8
    local_crop_size: int = 48  # px, a multiple of patch_size; DINO-MM: 48
    global_crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    sensor_drop: float = 0.5  # per view: probability that one sensor (chosen uniformly) is zeroed
    flip: bool = True  # per view horizontal flip, p = 0.5
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04  # linear warmup_teacher_temp -> teacher_temp over warmup_teacher_temp_steps
    warmup_teacher_temp_steps: int = 0
    momentum_teacher: float = 0.996  # cosine -> 1 over the run
    center_momentum: float = 0.9
    freeze_last_layer_steps: int = 20  # DINO: one epoch

    def __post_init__(self):
        super().__post_init__()
        require(self.embed_dim % 4 == 0, "model.embed_dim",
                f"must be a multiple of 4 (2-D sin-cos positions); got {self.embed_dim}")
        require(self.depth >= 1, "model.depth", f"must be >= 1; got {self.depth}")
        require(self.num_heads >= 1 and self.embed_dim % self.num_heads == 0, "model.num_heads",
                f"must be >= 1 and divide embed_dim={self.embed_dim}; got {self.num_heads}")
        require(self.mlp_ratio > 0, "model.mlp_ratio", f"must be > 0; got {self.mlp_ratio}")
        for key in ("head_hidden_dim", "head_bottleneck_dim", "out_dim"):
            require(getattr(self, key) >= 1, f"model.{key}", f"must be >= 1; got {getattr(self, key)}")
        require(self.local_crops_number >= 0, "model.local_crops_number",
                f"must be >= 0; got {self.local_crops_number}")
        require(self.patch_size <= self.local_crop_size <= self.img_size
                and self.local_crop_size % self.patch_size == 0, "model.local_crop_size",
                f"must be a multiple of patch_size={self.patch_size} in [patch_size, img_size={self.img_size}]; "
                f"got {self.local_crop_size}")
        for key in ("global_crop_scale", "local_crop_scale"):
            s = getattr(self, key)
            require(len(s) == 2 and 0.0 < s[0] <= s[1] <= 1.0, f"model.{key}",
                    f"must be [lo, hi] with 0 < lo <= hi <= 1; got {s}")
        require(0.0 <= self.sensor_drop <= 1.0, "model.sensor_drop", f"must be in [0, 1]; got {self.sensor_drop}")
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            require(getattr(self, key) > 0, f"model.{key}", f"must be > 0; got {getattr(self, key)}")
        require(self.warmup_teacher_temp_steps >= 0, "model.warmup_teacher_temp_steps",
                f"must be >= 0; got {self.warmup_teacher_temp_steps}")
        for key in ("momentum_teacher", "center_momentum"):
            require(0.0 <= getattr(self, key) <= 1.0, f"model.{key}", f"must be in [0, 1]; got {getattr(self, key)}")
        require(self.freeze_last_layer_steps >= 0, "model.freeze_last_layer_steps",
                f"must be >= 0; got {self.freeze_last_layer_steps}")


class DINOHead(nn.Module):
    """DINO's projection head: MLP (3 layers, GELU) -> L2-normalize -> weight-normalized Linear without bias,
    its norm g fixed to 1 (norm_last_layer=True): x -> normalize(x) @ normalize(weight_v, rows)^T."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.Module()
        self.last_layer.weight_v = nn.Parameter(nn.Linear(bottleneck_dim, out_dim, bias=False).weight.detach())
        self.flops_per_row = 2 * (in_dim * hidden_dim + hidden_dim**2 + hidden_dim * bottleneck_dim
                                  + bottleneck_dim * out_dim)

    def forward(self, x: torch.Tensor, last_layer_gate: torch.Tensor | None = None) -> torch.Tensor:
        """(R, D) -> (R, K). `last_layer_gate` (0-d, 0 or 1) scales the last layer's gradient, not its value
        (straight-through: v.detach() + gate * (v - v.detach()) is v), which freezes it without a host sync."""
        x = F.normalize(self.mlp(x), dim=-1)
        v = self.last_layer.weight_v
        if last_layer_gate is not None:
            v = v.detach() + last_layer_gate.to(v.dtype) * (v - v.detach())
        return F.linear(x, F.normalize(v, dim=1))


class DinoNet(nn.Module):
    """Backbone + head over several view kinds (DINO's MultiCropWrapper): one backbone call per resolution, the
    CLS tokens concatenated, one head pass."""

    def __init__(self, backbone: StackViT, head: DINOHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def cls(self, x: torch.Tensor) -> torch.Tensor:
        """(R, C, h, h) -> (R, D): the normalized CLS token (positions resampled for a smaller h)."""
        vit = self.backbone
        return vit.encode_tokens(vit.with_cls(vit.embed(x)))[:, 0]

    def forward(self, views: Sequence[torch.Tensor], last_layer_gate: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(torch.cat([self.cls(x) for x in views]), last_layer_gate)


@register_model("dino_mm")
class DinoMM(GlobalBatchDraws, nn.Module):
    """The pretraining contract over the stages above; the backbone contract through the teacher's encoder (a
    StackViT: missing_modality "zero")."""

    metric_names = ("loss", "teacher_entropy", "teacher_temp")
    missing_modality = "zero"

    def __init__(self, cfg: DinoMMConfig):
        super().__init__()
        self.cfg = cfg
        backbone = StackViT(cfg.modalities, cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads,
                            cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, cls_token=True, backend=cfg.ops_backend)
        head = DINOHead(cfg.embed_dim, cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim)
        self.student = DinoNet(backbone, head)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)  # same init; only the EMA moves it
        self.modalities, self.bands = backbone.modalities, backbone.bands
        self.img_size, self.patch_size, self.embed_dim = cfg.img_size, cfg.patch_size, cfg.embed_dim
        self.n_views = 2 + cfg.local_crops_number
        self.total_steps: int | None = None  # set_total_steps; without it the momentum stays momentum_teacher
        # (M, C): 1 where channel c belongs to modality m (the sensor drop's channel mask)
        sizes = [len(b) for b in self.bands.values()]
        membership = torch.block_diag(*[torch.ones(1, n) for n in sizes])
        self.register_buffer("channel_modality", membership, persistent=False)
        # centering: the center is state (checkpointed); the accumulators are emptied by every optimizer step
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.register_buffer("center_sum", torch.zeros(cfg.out_dim), persistent=False)
        self.register_buffer("center_count", torch.zeros(()), persistent=False)

    # --- engine hooks ---------------------------------------------------------------------------------------------

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return self.modalities

    def set_total_steps(self, n: int) -> None:
        self.total_steps = int(n)

    def set_backend(self, backend: str) -> None:
        """Switches every attention and the crop to `backend`; weights are unchanged."""
        set_backend(self, backend)
        self.cfg.ops_backend = backend

    # --- schedules (device ops on the float64 step counter) -------------------------------------------------------

    def teacher_temperature(self, step: torch.Tensor) -> torch.Tensor:
        """warmup_teacher_temp -> teacher_temp linearly over warmup_teacher_temp_steps (np.linspace's points, as
        DINO), then constant."""
        cfg = self.cfg
        if cfg.warmup_teacher_temp_steps <= 0:
            return torch.full_like(step, cfg.teacher_temp)
        progress = (step / max(1, cfg.warmup_teacher_temp_steps - 1)).clamp(0.0, 1.0)
        return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * progress

    def teacher_momentum(self, step: torch.Tensor) -> torch.Tensor:
        """momentum_teacher -> 1 along a half cosine over the run (DINO's momentum_schedule)."""
        from mmfuse_fast.engine.schedule import cosine_schedule  # (models never import the engine at import time)

        if self.total_steps is None:
            return torch.full_like(step, self.cfg.momentum_teacher)
        return cosine_schedule(step, self.cfg.momentum_teacher, 1.0, self.total_steps)

    # --- views ----------------------------------------------------------------------------------------------------

    @torch.compiler.disable  # dynamo cannot trace a draw from an explicit torch.Generator: one break, up front
    def draw_noise(self, batch: int, device, generator=None) -> dict[str, torch.Tensor]:
        """Every random number of one forward pass, drawn first so the stages after it are pure functions:
        {"global_boxes": (2B, 4), "local_boxes": (LB, 4) (with local crops), "flip": (B, V) bool (with flip),
        "keep": (B, V, M) 1 for the modalities each view keeps (with sensor_drop and >= 2 modalities)}. Views of
        a sample are consecutive; drawn for the global batch and sliced to this rank's rows (models/draws.py)."""
        cfg, n_views, size = self.cfg, self.n_views, self.img_size
        noise = {"global_boxes": self.draw_boxes(2 * batch, size, size, cfg.global_crop_scale, device, generator)}
        if cfg.local_crops_number:
            noise["local_boxes"] = self.draw_boxes(cfg.local_crops_number * batch, size, size, cfg.local_crop_scale,
                                                   device, generator)
        if cfg.flip:
            noise["flip"] = self.draw_uniform(batch, n_views, device=device, generator=generator) < 0.5
        n_mod = len(self.modalities)
        if cfg.sensor_drop > 0 and n_mod >= 2:  # DINO-MM: RandomApply(RandomSensorDrop, p) per crop
            u = self.draw_uniform(batch, n_views, 2, device=device, generator=generator)
            which = (u[..., 1] * n_mod).long().clamp_(max=n_mod - 1)  # the sensor dropped, uniformly
            chosen = which[..., None] == torch.arange(n_mod, device=device)  # one-hot (F.one_hot syncs)
            dropped = chosen & (u[..., :1] < cfg.sensor_drop)
            noise["keep"] = (~dropped).float()
        return noise

    def make_views(self, imgs: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None,
                   keep: torch.Tensor | None) -> torch.Tensor:
        """(B, C, H, W) -> (B * v, C, size, size): v boxes per image (image-major) cropped and resized in one call,
        flipped where `flip` (B, v), the channels of the modalities not kept zeroed (`keep` (B, v, M))."""
        b, c = imgs.shape[:2]
        v = boxes.shape[0] // b
        box_index = torch.arange(b, device=imgs.device).view(b, 1).expand(b, v).reshape(-1)
        x = ops.crop_resize(imgs, boxes, (size, size), box_index, backend=self.cfg.ops_backend)
        if flip is not None:
            x = torch.where(flip.reshape(-1, 1, 1, 1), x.flip(-1), x)
        if keep is not None:
            x = x * (keep @ self.channel_modality).to(x.dtype).reshape(b * v, c, 1, 1)
        return x

    # --- forward --------------------------------------------------------------------------------------------------

    def forward(self, batch, generator: torch.Generator | None = None, step: torch.Tensor | None = None) -> dict:
        """{"objective", "loss", "teacher_entropy", "teacher_temp"}. The loss is a per-sample mean (DDP's gradient
        average is the global batch's); centering uses the global batch through an all-reduce. `step` (float64
        0-d device tensor, default 0) drives the teacher temperature and the last-layer freeze."""
        cfg = self.cfg
        imgs = self.student.backbone.stack(batch)  # (B, C, H, W), all modalities
        b = imgs.shape[0]
        noise = self.draw_noise(b, imgs.device, generator)
        if step is None:
            step = torch.zeros((), dtype=torch.float64, device=imgs.device)
        flip, keep, n_local = noise.get("flip"), noise.get("keep"), cfg.local_crops_number

        def part(t, lo, hi):
            return None if t is None else t[:, lo:hi]

        views = [self.make_views(imgs, noise["global_boxes"], self.img_size, part(flip, 0, 2), part(keep, 0, 2))]
        if n_local:  # (2B, C, H, W), then (LB, C, h, h)
            views.append(self.make_views(imgs, noise["local_boxes"], cfg.local_crop_size, part(flip, 2, None),
                                         part(keep, 2, None)))

        with torch.no_grad():
            teacher_out = self.teacher(views[:1]).float()  # (2B, K)
        gate = step >= cfg.freeze_last_layer_steps
        student_out = self.student(views, gate).float()  # (2B + LB, K)

        # view-major (V, B, K) for the loss
        k = cfg.out_dim
        t = teacher_out.view(b, 2, k).transpose(0, 1)
        s = student_out[:2 * b].view(b, 2, k).transpose(0, 1)
        if n_local:
            s = torch.cat([s, student_out[2 * b:].view(b, n_local, k).transpose(0, 1)])
        temp = self.teacher_temperature(step)
        t_log = F.log_softmax((t - self.center) / temp.float(), dim=-1)  # (2, B, K)
        q = t_log.exp()
        s_log = F.log_softmax(s / cfg.student_temp, dim=-1)  # (V, B, K)
        # sum over v != i of -q_i . s_v = -q_i . (sum_v s_v - s_i)
        ce = -(q * (s_log.sum(0, keepdim=True) - s_log[:2])).sum(-1)  # (2, B)
        loss = ce.sum(0).mean() / (2 * (self.n_views - 1))
        entropy = -(q * t_log).sum(-1).mean()

        if self.training:
            self.accumulate_center(teacher_out)
        return {"objective": loss, "loss": loss, "teacher_entropy": entropy.detach(),
                "teacher_temp": temp.detach().float()}

    # --- centering and the teacher ---------------------------------------------------------------------------------

    @torch.no_grad()
    def accumulate_center(self, teacher_out: torch.Tensor) -> None:
        """Adds the teacher outputs' sum over the global batch (all-reduced) and their count to the accumulators
        that after_optimizer_step turns into the new center (so gradient accumulation sees the whole step)."""
        total = teacher_out.sum(0)  # (K,)
        group = self.data_parallel_group
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(total, group=group)
        self.center_sum.add_(total)
        self.center_count.add_(teacher_out.shape[0] * self.world_size)

    @torch.no_grad()
    def after_optimizer_step(self, step_t: torch.Tensor, skipped: torch.Tensor) -> None:
        """The center and teacher updates of update `step_t` (0-based), both left as they are when `skipped`;
        the center accumulators are emptied either way. Device ops only (CUDA-graph capturable)."""
        cm = self.cfg.center_momentum
        batch_center = self.center_sum / self.center_count.clamp(min=1.0)
        new_center = self.center * cm + batch_center * (1.0 - cm)
        self.center.copy_(torch.where(skipped, self.center, new_center))
        self.center_sum.zero_()
        self.center_count.zero_()

        m = torch.where(skipped, torch.ones_like(step_t), self.teacher_momentum(step_t)).float()
        teacher = list(self.teacher.parameters())
        student = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, torch._foreach_mul(student, 1.0 - m))

    # --- backbone contract (the teacher's encoder: DINO evaluates the teacher) --------------------------------------

    @property
    def feature_levels(self) -> int:
        return self.teacher.backbone.feature_levels

    def downstream_backbone(self) -> StackViT:
        """The teacher's encoder, trainable again (fine-tuning trains it; a linear probe freezes it itself)."""
        return self.teacher.backbone.requires_grad_(True)

    def encode(self, batch, modalities: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        return self.teacher.backbone.encode(batch, modalities)

    def forward_intermediates(self, batch, modalities: Sequence[str] | None = None,
                              indices: Sequence[int] | None = None) -> list[dict[str, torch.Tensor]]:
        return self.teacher.backbone.forward_intermediates(batch, modalities, indices)

    def flops_per_sample(self, training: bool = True) -> float:
        """Analytic matmul FLOPs of one pretraining sample: the student over all views (x3 for forward + backward
        when `training`) and the teacher over the 2 global views (forward only), heads included."""
        vit, head = self.student.backbone, self.student.head

        def view(size: int) -> int:
            n = (size // self.patch_size) ** 2
            return vit.flops(n + 1, image_tokens=n) + head.flops_per_row

        global_views = 2 * view(self.img_size)
        student = global_views + self.cfg.local_crops_number * view(self.cfg.local_crop_size)
        return float(student * (3 if training else 1) + global_views)
