"""Model FLOPs of a train step, the devices' peak, and what a run achieves of it (MFU).

Model FLOPs per token, for a training step (forward 2, backward 4 FLOPs per multiply-add):

    6 * N  +  12 * L * T * (num_heads * head_dim)

N is the matmul weights: q, k, v, o, gate, up, down of every layer, plus the unembedding V * D, which is
a matmul whether or not it is tied to the embedding; the embedding lookup is a gather, not a matmul, and
is not counted (nor are norms, biases, softmaxes, the optimizer). The second term is attention's QK^T
and AV: 2 * 2 * T * num_heads * head_dim per token per layer forward, times 3 with the backward, counted
over all T keys as in PaLM (Chowdhery et al. 2022, appendix B); this is what MFU uses, and what the
XLA attention here computes (the whole T x T score matrix, masked). Causal attention only needs half of
it (6 * L * T * num_heads * head_dim): `per_token_causal`, the lower, stricter count. Remat's recomputed
forward is not counted: MFU counts the model's FLOPs, not the hardware's. Every token of a step counts,
padding too (the step computes it), as MaxText counts.

MFU = (model FLOPs per token * tokens/s) / (peak bf16 dense FLOP/s per device * devices), the peak looked
up from the device's `device_kind` (PEAK_BF16); a device the table lacks (a CPU) has no MFU, only TFLOP/s.

A training-step figure (the 6 is forward plus backward), so it lives with the trainer, not the model.
"""

from __future__ import annotations

import dataclasses

import jax

from sft.model import ModelConfig

# bf16 dense (no sparsity) peak FLOP/s per JAX device, by device_kind. Strings checked against public code
# (JAX's own TPU chip table, llm.c, nvidia-smi fixtures) unless marked "unverified"; NVIDIA peaks are the
# datasheets' dense Tensor Core figures (half of the "with sparsity" ones).
PEAK_BF16 = {
    "NVIDIA H100 80GB HBM3": 989.4e12,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.5e12,
    "NVIDIA H100 NVL": 835.5e12,  # unverified string
    "NVIDIA H200": 989.4e12,  # H200 SXM; an H200 NVL (835 TFLOP/s) reports the same name
    "NVIDIA GH200 480GB": 989.4e12,  # unverified string
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L4": 121e12,
    "NVIDIA B200": 2250e12,  # unverified string and peak (HGX B200 datasheet, dense)
    "TPU v2": 22.5e12,  # a v2 / v3 JAX device is one TensorCore, half a chip
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,  # from v4 on, a JAX device is a chip
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}
MATMUL_WEIGHTS = ("q", "k", "v", "o", "gate", "up", "down", "unembed")


def peak_flops(device_kind: str) -> float | None:
  """bf16 dense peak FLOP/s of one device of this kind, or None when the table does not know it."""
  return PEAK_BF16.get(device_kind)


@dataclasses.dataclass(frozen=True)
class ModelFlops:
  """Training FLOPs per token of a model at sequence length T (see the module docstring)."""

  matmul_params: int  # N: the layers' projections plus the unembedding V * D
  seq_len: int
  attention_full: int  # 12 * L * T * num_heads * head_dim
  attention_causal: int  # half of it

  @property
  def dense(self) -> int:
    return 6 * self.matmul_params

  @property
  def per_token(self) -> int:
    """The count MFU uses: 6 N + attention over all T keys (PaLM)."""
    return self.dense + self.attention_full

  @property
  def per_token_causal(self) -> int:
    return self.dense + self.attention_causal


def matmul_params(cfg: ModelConfig) -> int:
  """The weights each token multiplies once: every layer's projections, and the unembedding."""
  d, h = cfg.d_model, cfg.head_dim
  attention = d * cfg.num_heads * h * 2 + d * cfg.num_kv_heads * h * 2  # q and o; k and v
  mlp = (3 if cfg.mlp_gated else 2) * d * cfg.mlp_dim
  return cfg.num_layers * (attention + mlp) + cfg.vocab_size * d


def counted(cfg: ModelConfig) -> bool:
  """Whether the formula holds: a full fine-tune (LoRA skips the frozen weights' gradients) without sliding
  windows (which attend to fewer than T keys)."""
  return not cfg.lora_rank and not cfg.sliding_window


def model_flops(cfg: ModelConfig, seq_len: int) -> ModelFlops:
  if not counted(cfg):
    raise ValueError("the formula here is for a full fine-tune without sliding windows")
  attention = 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
  return ModelFlops(matmul_params(cfg), seq_len, attention, attention // 2)


def matmul_params_of_tree(params, cfg: ModelConfig) -> int:
  """N counted from the (abstract) parameters instead: a check that `matmul_params` misses no weight."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  n = sum(leaf.size for path, leaf in leaves if getattr(path[-1], "key", None) in MATMUL_WEIGHTS)
  return n + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)


def achieved(step_flops: float, steps: int, seconds: float, devices: int, peak: float | None) -> dict[str, float]:
  """Model TFLOP/s per device over `steps` steps of `step_flops` model FLOPs (the global batch's) that took
  `seconds`, and, when the device's `peak` FLOP/s is known, MFU (a fraction of it)."""
  per_device = step_flops * steps / max(seconds, 1e-9) / devices
  out = {"tflops_per_device": per_device / 1e12}
  if peak:
    out["mfu"] = per_device / peak
  return out


def step_flops(cfg: ModelConfig, seq_len: int, batch_size: int) -> int | None:
  """Model FLOPs of one train step of `batch_size` rows of `seq_len` tokens (the global batch), or None where
  the formula does not hold (`counted`)."""
  return model_flops(cfg, seq_len).per_token * batch_size * seq_len if counted(cfg) else None
