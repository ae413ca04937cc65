"""The model: a pure-functional decoder-only Transformer."""

from sft.model import attention, axes, lora
from sft.model.attention import attention_mask, decode_mask
from sft.model.config import ModelConfig
from sft.model.layers import apply_rope, rope_inv_freq
from sft.model.transformer import Transformer, count_params, init_cache

__all__ = [
    "attention",
    "axes",
    "lora",
    "ModelConfig",
    "Transformer",
    "apply_rope",
    "attention_mask",
    "count_params",
    "decode_mask",
    "init_cache",
    "rope_inv_freq",
]
