"""The model: a pure-functional decoder-only Transformer."""

from sft.model import axes
from sft.model.transformer import ModelConfig, Transformer, apply_rope, attention_mask, count_params, init_cache

__all__ = ["axes", "ModelConfig", "Transformer", "attention_mask", "apply_rope", "count_params", "init_cache"]
