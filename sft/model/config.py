"""ModelConfig: every number that changes the model's maths, with its default and meaning, checked when
it is built. The run config's `model` section is made from these fields (sft/config.py)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from sft.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ROPE_TYPES = ("default", "llama3")
ACTIVATIONS = ("silu", "gelu_tanh")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
NORM_TYPES = ("rms", "layer")
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash")
REMAT_POLICIES = ("full", "save_dots")
POSITION_EMBEDDINGS = ("rope", "learned")


def runtime(default, *, at_resume: bool = False, as_served: bool = False):
  """A field that says how the maths is computed, stored or trained, not what it is: no checkpoint holds
  it. `at_resume`: a resumed run may change it (the same maths, computed another way); `as_served`: a
  served model takes it from the config it is served with, not from the one it was trained with."""
  return dataclasses.field(default=default, metadata={"runtime": True, "at_resume": at_resume, "as_served": as_served})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of the model. Built from the `model` section of a run config, or from a
  Hugging Face config.json by `sft.hf`."""

  vocab_size: int = 2048  # a run trains its own tokenizer of this size (run config: tokenizer.vocab_size)
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2  # grouped-query attention: num_heads / num_kv_heads query heads share a kv head
  head_dim: int = 64
  mlp_dim: int = 768
  rope_theta: float = 10_000.0
  # "llama3": Llama 3.1 frequency scaling with the four numbers below (unused for "default").
  rope_type: str = "default"
  rope_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  norm_eps: float = 1e-6
  norm_type: str = "rms"  # "rms": RMSNorm; "layer": LayerNorm with a bias (GPT-2)
  # "rope": rotary embeddings on q and k; "learned": a (max_positions, d_model) table added to the
  # token embeddings (GPT-2), so positions must stay below max_positions.
  position_embedding: str = "rope"
  max_positions: int = 2048  # rows of the learned position table (unused with rope)
  qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2)
  qk_norm: bool = False  # RMSNorm over each head's q and k before rotary embeddings (Qwen3)
  sliding_window: int = 0  # a token sees at most this many tokens back, itself included; 0: no limit
  # 0 or 1: every layer uses the sliding window; p > 1: every p-th layer attends fully (Gemma 2: 2).
  sliding_window_pattern: int = 1
  norm_plus_one: bool = False  # RMSNorm scales by (1 + w), w initialised at 0 (Gemma)
  embed_scale: bool = False  # embeddings multiplied by sqrt(d_model) (Gemma)
  mlp_activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)
  mlp_gated: bool = True  # act(gate) * up; False: act(up) with no gate projection (GPT-2)
  linear_bias: bool = False  # biases on every projection: q, k, v, o, up, down (GPT-2)
  query_pre_attn_scalar: float = 0.0  # attention scores scaled by its -1/2 power; 0: head_dim
  attn_logit_softcap: float = 0.0  # scores -> cap * tanh(scores / cap); 0: off (Gemma 2)
  final_logit_softcap: float = 0.0  # the same on the output logits (Gemma 2)
  sandwich_norms: bool = False  # extra RMSNorms on the attention and MLP outputs (Gemma 2)
  tie_embeddings: bool = True
  # LoRA: rank-r adapters beside the `lora_targets` projections, scaled by alpha / r (0: none).
  lora_rank: int = runtime(0)
  lora_alpha: float = runtime(16.0)
  lora_dropout: float = runtime(0.0, as_served=True)  # on the adapter's input, in training only
  lora_targets: tuple[str, ...] = runtime(("q", "k", "v", "o"))
  dtype: str = runtime("float32", as_served=True)  # activations and matmuls; "bfloat16" on TPUs and GPUs
  param_dtype: str = runtime("float32")  # stored parameters (and optimizer moments)
  remat: bool = runtime(False, at_resume=True, as_served=True)  # recompute each layer's activations in the backward pass
  remat_policy: str = runtime("full", at_resume=True, as_served=True)  # with remat: "full" keeps each layer's input only; "save_dots" keeps its matmul outputs
  # Training's layers as one scanned step (compile time flat in depth) or, False, traced one by one
  # (faster steps on CPU: no stacked activations carried through the loop; compile time grows with depth).
  scan_layers: bool = runtime(True, at_resume=True, as_served=True)
  # "xla" (any backend), "cudnn" (flash attention on NVIDIA GPUs) or "splash" (Pallas on TPUs): see
  # sft.model.attention. Decoding with a KV cache always uses "xla".
  attention: str = runtime("xla", at_resume=True, as_served=True)

  def __post_init__(self):
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # a ConfigDict may hand over a list
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "max_positions"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
    for name in ("rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "norm_eps"):
      if not getattr(self, name) > 0:
        raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)!r}")
    if self.rope_original_max_positions < 1:
      raise ConfigError(f"model.rope_original_max_positions must be >= 1, got {self.rope_original_max_positions!r}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.num_kv_heads})"
      )
    if self.position_embedding == "rope" and self.head_dim % 2:
      raise ConfigError(f"model.head_dim must be even for rotary embeddings, got {self.head_dim}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ConfigError(f"model.{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")
    if self.rope_type not in ROPE_TYPES:
      raise ConfigError(f"model.rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
    if self.norm_type not in NORM_TYPES:
      raise ConfigError(f"model.norm_type must be one of {NORM_TYPES}, got {self.norm_type!r}")
    if self.position_embedding not in POSITION_EMBEDDINGS:
      raise ConfigError(f"model.position_embedding must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ConfigError(f"model.attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ConfigError(f"model.remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
    if self.attention == "cudnn" and self.attn_logit_softcap:
      raise ConfigError("model.attention='cudnn' has no attention logit soft-capping (model.attn_logit_softcap): use 'xla'")
    if self.mlp_activation not in ACTIVATIONS:
      raise ConfigError(f"model.mlp_activation must be one of {ACTIVATIONS}, got {self.mlp_activation!r}")
    for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
      if getattr(self, name) < 0:
        raise ConfigError(f"model.{name} must be >= 0 (0: off), got {getattr(self, name)}")
    if self.sliding_window_pattern < 0:
      raise ConfigError(f"model.sliding_window_pattern must be >= 0, got {self.sliding_window_pattern}")
    if self.lora_rank < 0 or not 0.0 <= self.lora_dropout < 1.0:
      raise ConfigError(f"model.lora_rank must be >= 0 and lora_dropout in [0, 1); got {self.lora_rank}, {self.lora_dropout}")
    if not all(isinstance(t, str) for t in self.lora_targets):
      raise ConfigError(f"model.lora_targets must hold projection names (strings), got {list(self.lora_targets)!r}")
    unknown = set(self.lora_targets) - set(LORA_TARGETS)
    if unknown:
      raise ConfigError(f"model.lora_targets has {sorted(unknown)}; the projections are {LORA_TARGETS}")
    if not self.mlp_gated and "gate" in self.lora_targets:
      raise ConfigError("model.lora_targets has 'gate', but with model.mlp_gated=False the MLP has no gate projection")
    if self.sliding_window < 0:
      raise ConfigError(f"model.sliding_window must be >= 0 (0: none), got {self.sliding_window}")
    if self.rope_type == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:  # scaling divides by their difference
      raise ConfigError("model.rope_high_freq_factor must be greater than model.rope_low_freq_factor with rope_type 'llama3'")

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  def layer_uses_sliding_window(self, layer: int) -> bool:
    if not self.sliding_window:
      return False
    pattern = self.sliding_window_pattern
    return pattern <= 1 or layer % pattern != pattern - 1


def _runtime_fields(flag: str = "runtime") -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get(flag))


def runtime_fields() -> tuple[str, ...]:
  """Fields no checkpoint holds (dtypes, remat, attention kernel, LoRA): the rest is the checkpoint's maths."""
  return _runtime_fields()


def model_at_resume() -> tuple[str, ...]:
  """Fields a resumed run may change: how the same maths is computed."""
  return _runtime_fields("at_resume")


def served_as_given() -> tuple[str, ...]:
  """Fields a served model takes from the config it is served with."""
  return _runtime_fields("as_served")
