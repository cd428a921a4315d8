"""Fused ops of the method. Each public function validates its input and picks its backend through
`_backend.resolve`; `check_backend_available` checks a `model.ops_backend` value before a run starts."""

from mmfuse_fast.ops._backend import check_backend_available
from mmfuse_fast.ops.crop_resize import crop_resize, random_boxes
from mmfuse_fast.ops.infonce import multiscale_infonce
from mmfuse_fast.ops.modality_attention import modality_attention

__all__ = ["modality_attention", "multiscale_infonce", "crop_resize", "random_boxes", "check_backend_available"]
