"""Fused ops of the method. Each public function validates its input and picks a backend in one place."""

from mmfuse_fast.ops.crop_resize import crop_resize, random_boxes
from mmfuse_fast.ops.infonce import multiscale_infonce
from mmfuse_fast.ops.modality_attention import modality_attention

__all__ = ["modality_attention", "multiscale_infonce", "crop_resize", "random_boxes"]
