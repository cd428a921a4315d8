"""mmfuse_fast: self-supervised multimodal remote-sensing pretraining (masked reconstruction with cross-attention
fusion and cross-scale contrastive learning), made fast."""

__version__ = "0.1.0"
