"""Registry of named models: `model.name` in a config picks the class, which is built from the ModelConfig."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

MODELS: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: `@register_model("mmfuse")` makes `build_model(cfg)` with cfg.name == "mmfuse" build it."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MODELS and MODELS[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered to {MODELS[name].__qualname__}")
        MODELS[name] = cls
        return cls

    return wrap


def build_model(cfg) -> nn.Module:
    """Builds the registered model `cfg.name` from its ModelConfig."""
    try:
        cls = MODELS[cfg.name]
    except KeyError:
        raise ValueError(f"unknown model.name {cfg.name!r}; known models: {', '.join(sorted(MODELS))}") from None
    return cls(cfg)
