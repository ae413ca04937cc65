"""Hugging Face `config.json` <-> `ModelConfig`, for the Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2
and GPT-2 families.

Every field is either carried over, known not to change the forward pass, or refused: a field this
module does not know stops the load, because a silent default could change the model's maths.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

from sft.errors import ConfigError
from sft.model.config import ModelConfig, runtime_fields

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2")
_GEMMA = ("gemma", "gemma2")

# Fields that do not change logits: ids, bookkeeping, and what only the PyTorch runtime reads.
_INERT = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "max_position_embeddings",
    "pretraining_tp", "output_attentions", "output_hidden_states", "return_dict", "_name_or_path",
    "max_window_layers", "attn_implementation", "_attn_implementation_autoset", "tokenizer_class",
    "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "finetuning_task", "task_specific_params", "add_cross_attention",
    "tie_encoder_decoder", "torchscript", "use_bfloat16", "prefix", "sep_token_id", "decoder_start_token_id",
    "cross_attention_hidden_size", "is_decoder", "layer_types", "cache_implementation",
}
# Fields read below (each family reads a subset; the others must be absent or neutral).
_READ = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "hidden_act", "rope_theta",
    "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias", "attention_dropout", "sliding_window",
    "use_sliding_window", "hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping",
    "final_logit_softcapping", "use_bidirectional_attention",
}

# GPT-2 names its fields apart; the Llama-style ones above are unknown to it (and these to the others).
_GPT2_READ = {
    "vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "layer_norm_epsilon",
    "activation_function", "tie_word_embeddings", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
}
# Dropout (sft trains without it), the float32 upcast order of the scores (numerics only), n_ctx (an old
# copy of n_positions) and the sequence-summary head of GPT2DoubleHeadsModel.
_GPT2_INERT = {
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "reorder_and_upcast_attn", "n_ctx", "summary_type",
    "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
}
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both the tanh approximation


_MISSING = object()


def read_hf_config(path: str | pathlib.Path) -> dict[str, Any]:
  """The dict in a config.json, or a ConfigError naming the file when it is not a JSON object."""
  path = pathlib.Path(path)
  try:
    hf = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
    raise ConfigError(f"{path} is not valid JSON ({err})") from None
  if not isinstance(hf, dict):
    raise ConfigError(f"{path} holds a JSON {type(hf).__name__}, not an object")
  return hf


def _field(hf: dict[str, Any], key: str, where: str, kind: str, default: Any = _MISSING, minimum: float | None = None) -> Any:
  """hf[key] checked to be an "int" (not a bool), a finite "number" or a "bool" (at least `minimum` when
  given); a null or absent key gives `default`. Anything else is a ConfigError naming the file and key."""
  value = hf.get(key)
  if value is None:
    if default is _MISSING:
      raise ConfigError(f"{where} has no {key}")
    return default
  ok = isinstance(value, bool) if kind == "bool" else not isinstance(value, bool) and isinstance(value, int if kind == "int" else (int, float))
  if ok and kind == "number":
    try:
      value = float(value)  # an int too big for a float overflows here
    except OverflowError:
      ok = False
    ok = ok and math.isfinite(value)
  if ok and minimum is not None:
    ok = value >= minimum
  if not ok:
    expected = {"int": "an integer", "number": "a finite number", "bool": "true or false"}[kind]
    raise ConfigError(f"{where} has {key}={value!r}: expected {expected}{f' >= {minimum}' if minimum is not None else ''}")
  return value


def _dict_field(hf: dict[str, Any], key: str, where: str) -> dict[str, Any]:
  value = hf.get(key)
  if value is not None and not isinstance(value, dict):
    raise ConfigError(f"{where} has {key}={value!r}: expected an object")
  return dict(value or {})


def _rope(hf: dict[str, Any], where: str) -> dict[str, Any]:
  """rope fields from either layout: v4 (`rope_theta`, `rope_scaling`) or v5 (`rope_parameters`)."""
  params, scaling = _dict_field(hf, "rope_parameters", where), _dict_field(hf, "rope_scaling", where)
  theta = _field(params, "rope_theta", f"{where} rope_parameters", "number", None, 0.0)
  theta = _field(hf, "rope_theta", where, "number", 10_000.0, 0.0) if theta is None else theta
  params.pop("rope_theta", None)
  key = "rope_parameters" if params else "rope_scaling"  # which one holds the scaling, for errors
  merged = {**scaling, **params}
  rope_type = merged.pop("rope_type", merged.pop("type", "default"))
  out: dict[str, Any] = {"rope_theta": theta, "rope_type": rope_type}
  if rope_type == "llama3":
    inner = f"{where} {key}"
    out.update(
        rope_factor=_field(merged, "factor", inner, "number", minimum=0.0),
        rope_low_freq_factor=_field(merged, "low_freq_factor", inner, "number", minimum=0.0),
        rope_high_freq_factor=_field(merged, "high_freq_factor", inner, "number", minimum=0.0),
        rope_original_max_positions=_field(merged, "original_max_position_embeddings", inner, "int", minimum=1),
    )
  elif rope_type != "default":
    raise ConfigError(f"rope type {rope_type!r} in {where} is not supported (supported: default, llama3)")
  return out


def _require(hf: dict[str, Any], key: str, allowed, why: str, where: str) -> None:
  value = hf.get(key, allowed[0])
  if value not in allowed:
    raise ConfigError(f"{where} has {key}={value!r}: {why}")


def from_hf_config(hf: dict[str, Any], *, dtype: str = "float32", param_dtype: str = "float32", source: str = "config.json") -> ModelConfig:
  """The `ModelConfig` of a Hugging Face config.json dict, or a ConfigError naming what cannot be carried
  (`source`, the file's path, is named in every error): a missing, null or wrong-typed field included."""
  where = source
  if not isinstance(hf, dict):
    raise ConfigError(f"{where} holds a {type(hf).__name__}, not an object")
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise ConfigError(f"{where} has model_type {family!r}, which is not supported; supported: {FAMILIES}")
  known = (_INERT - {"max_position_embeddings"}) | _GPT2_READ | _GPT2_INERT if family == "gpt2" else _INERT | _READ
  unknown = sorted(map(str, set(hf) - known))
  if unknown:
    raise ConfigError(f"{where} has fields sft does not know, which might change the model: {unknown}")
  if family == "gpt2":
    return _from_gpt2(hf, where, dtype, param_dtype)
  gemma = family in _GEMMA
  if gemma:
    activation = hf.get("hidden_activation") or "gelu_pytorch_tanh"
    if activation != "gelu_pytorch_tanh":
      raise ConfigError(f"{where} has hidden_activation={activation!r}: only gelu_pytorch_tanh is implemented for Gemma")
    _require(hf, "use_bidirectional_attention", (None, False), "only causal attention is implemented", where)
  else:
    _require(hf, "hidden_act", ("silu",), "only SwiGLU with SiLU is implemented", where)
  _require(hf, "mlp_bias", (False,), "MLP biases are not implemented", where)
  _require(hf, "attention_dropout", (0.0, 0), "attention dropout is not implemented", where)
  _require(hf, "use_sliding_window", (False,), f"{family} sliding-window layers are not implemented", where)
  if family in ("llama", "qwen3", "gemma", "gemma2"):
    _require(hf, "attention_bias", (False,), "a bias on the output projection is not implemented", where)

  heads, layers = _field(hf, "num_attention_heads", where, "int", minimum=1), _field(hf, "num_hidden_layers", where, "int", minimum=1)
  d_model = _field(hf, "hidden_size", where, "int", minimum=1)
  sliding_window, pattern = 0, 1
  if family == "mistral":
    sliding_window = _field(hf, "sliding_window", where, "int", 0, 0)
  elif family == "gemma2":
    sliding_window, pattern = _field(hf, "sliding_window", where, "int", 0, 0), 2
  layer_types = hf.get("layer_types")
  if layer_types is not None and not (isinstance(layer_types, list) and all(isinstance(t, str) for t in layer_types)):
    raise ConfigError(f"{where} has layer_types={layer_types!r}: expected a list of strings")
  if layer_types is not None and family != "mistral":
    # Lengths first: a config.json claiming 2**70 layers must not build a list of 2**70 names.
    def expected(i: int) -> str:
      return "sliding_attention" if sliding_window and (pattern <= 1 or i % pattern != pattern - 1) else "full_attention"

    if len(layer_types) != layers or any(t != expected(i) for i, t in enumerate(layer_types)):
      shown = [expected(i) for i in range(min(layers, 64))] + (["..."] if layers > 64 else [])
      raise ConfigError(f"{where} has layer_types {layer_types}; sft implements {shown} for {family} with {layers} layers")
  gemma2 = family == "gemma2"
  fields = dict(
      vocab_size=_field(hf, "vocab_size", where, "int", minimum=1),
      d_model=d_model,
      num_layers=layers,
      num_heads=heads,
      num_kv_heads=_field(hf, "num_key_value_heads", where, "int", heads, 1),
      head_dim=_field(hf, "head_dim", where, "int", d_model // heads, 1),
      mlp_dim=_field(hf, "intermediate_size", where, "int", minimum=1),
      norm_eps=_field(hf, "rms_norm_eps", where, "number", 1e-6, 0.0),
      qkv_bias=family == "qwen2",
      qk_norm=family == "qwen3",
      sliding_window=sliding_window,
      sliding_window_pattern=pattern,
      norm_plus_one=gemma,
      embed_scale=gemma,
      mlp_activation="gelu_tanh" if gemma else "silu",
      query_pre_attn_scalar=_field(hf, "query_pre_attn_scalar", where, "number", 0.0, 0.0) if gemma2 else 0.0,
      attn_logit_softcap=_field(hf, "attn_logit_softcapping", where, "number", 0.0, 0.0) if gemma2 else 0.0,
      final_logit_softcap=_field(hf, "final_logit_softcapping", where, "number", 0.0, 0.0) if gemma2 else 0.0,
      sandwich_norms=gemma2,
      tie_embeddings=_field(hf, "tie_word_embeddings", where, "bool", gemma),
      **_rope(hf, where),
  )
  try:
    return ModelConfig(**fields, dtype=dtype, param_dtype=param_dtype)
  except ConfigError as err:  # well-typed fields that make no model: heads not a multiple of kv heads, ...
    raise ConfigError(f"{where}: {err}") from None


def _from_gpt2(hf: dict[str, Any], where: str, dtype: str, param_dtype: str) -> ModelConfig:
  _require(hf, "activation_function", _GPT2_ACTIVATIONS, f"only the tanh GELU {_GPT2_ACTIVATIONS} is implemented", where)
  _require(hf, "scale_attn_weights", (True,), "only attention scaled by 1/sqrt(head_dim) is implemented", where)
  _require(hf, "scale_attn_by_inverse_layer_idx", (False,), "per-layer attention scaling is not implemented", where)
  d_model, heads = _field(hf, "n_embd", where, "int", minimum=1), _field(hf, "n_head", where, "int", minimum=1)
  if d_model % heads:
    raise ConfigError(f"{where} has n_embd={d_model}, which does not divide into n_head={heads} heads")
  fields = dict(
      vocab_size=_field(hf, "vocab_size", where, "int", minimum=1),
      d_model=d_model,
      num_layers=_field(hf, "n_layer", where, "int", minimum=1),
      num_heads=heads,
      num_kv_heads=heads,
      head_dim=d_model // heads,
      mlp_dim=_field(hf, "n_inner", where, "int", 4 * d_model, 1),
      norm_eps=_field(hf, "layer_norm_epsilon", where, "number", 1e-5, 0.0),
      norm_type="layer",
      position_embedding="learned",
      max_positions=_field(hf, "n_positions", where, "int", minimum=1),
      mlp_activation="gelu_tanh",
      mlp_gated=False,
      linear_bias=True,
      tie_embeddings=_field(hf, "tie_word_embeddings", where, "bool", True),
  )
  try:
    return ModelConfig(**fields, dtype=dtype, param_dtype=param_dtype)
  except ConfigError as err:
    raise ConfigError(f"{where}: {err}") from None


def _to_gpt2(cfg: ModelConfig, torch_dtype: str) -> dict[str, Any]:
  return {
      "architectures": ["GPT2LMHeadModel"],
      "model_type": "gpt2",
      "vocab_size": cfg.vocab_size,
      "n_embd": cfg.d_model,
      "n_layer": cfg.num_layers,
      "n_head": cfg.num_heads,
      "n_inner": cfg.mlp_dim,
      "n_positions": cfg.max_positions,
      "layer_norm_epsilon": cfg.norm_eps,
      "activation_function": "gelu_new",
      "tie_word_embeddings": cfg.tie_embeddings,
      "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": False,
      # transformers defaults these to 0.1; the exported model is the one trained, without dropout.
      "resid_pdrop": 0.0,
      "embd_pdrop": 0.0,
      "attn_pdrop": 0.0,
      "torch_dtype": torch_dtype,
  }


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
}


def to_hf_config(
    cfg: ModelConfig, family: str, *, torch_dtype: str = "float32", base: dict[str, Any] | None = None,
    token_ids: dict[str, int | None] | None = None,
) -> dict[str, Any]:
  """A config.json dict that `transformers` loads into the same model; a ConfigError if `cfg` has
  maths that `family` cannot express.

  `base`, the source checkpoint's config.json, is kept whole (token ids, max_position_embeddings and
  every other field), with what the model defines written over it. Without one (a model trained from
  scratch), `token_ids` gives bos_token_id / eos_token_id / pad_token_id, and max_position_embeddings is
  the model's max_positions."""
  if family not in FAMILIES:
    raise ConfigError(f"family must be one of {FAMILIES}, got {family!r}")
  out = _carried(_model_fields(cfg, family, torch_dtype), cfg, family, base, token_ids)
  return _checked(cfg, family, out, _comparable(cfg, family))


_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# What the source's config.json may say in a form the model's fields replace (the v4 rope layout).
_REWRITTEN = ("rope_theta", "rope_scaling")


def _carried(
    out: dict[str, Any], cfg: ModelConfig, family: str, base: dict[str, Any] | None, token_ids: dict[str, int | None] | None
) -> dict[str, Any]:
  """`out` on top of the source's fields (see to_hf_config)."""
  if base is None:
    unknown = sorted(set(token_ids or {}) - set(_TOKEN_IDS))
    if unknown:
      raise ConfigError(f"token_ids: unknown keys {unknown}; expected some of {_TOKEN_IDS}")
    extra = {k: v for k, v in (token_ids or {}).items() if v is not None}
    if family != "gpt2":  # GPT-2 has n_positions among its own fields
      extra["max_position_embeddings"] = cfg.max_positions
    return {**out, **extra}
  if base.get("model_type") != family:
    raise ConfigError(f"the source config.json has model_type {base.get('model_type')!r}; a {family} export cannot keep it")
  merged = {**{k: v for k, v in base.items() if k not in _REWRITTEN or family == "gpt2"}, **out}
  if "dtype" in base:  # the newer name of torch_dtype: both say the dtype written
    merged["dtype"] = out["torch_dtype"]
  return merged


def _model_fields(cfg: ModelConfig, family: str, torch_dtype: str) -> dict[str, Any]:
  """The config.json fields that define the model's maths."""
  rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type}
  if cfg.rope_type == "llama3":
    rope.update(
        factor=cfg.rope_factor,
        low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor,
        original_max_position_embeddings=cfg.rope_original_max_positions,
    )
  gemma = family in _GEMMA
  if family == "gpt2":
    return _to_gpt2(cfg, torch_dtype)
  out: dict[str, Any] = {
      "architectures": [_ARCHITECTURES[family]],
      "model_type": family,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings,
      "rope_parameters": rope,
      "attention_dropout": 0.0,
      "torch_dtype": torch_dtype,
  }
  if gemma:
    out["hidden_activation"] = "gelu_pytorch_tanh"
  else:
    out["hidden_act"] = "silu"
  if family in ("llama", "qwen3", "gemma", "gemma2"):
    out["attention_bias"] = False
  if family == "llama":
    out["mlp_bias"] = False
  if family == "qwen2":
    out["use_sliding_window"] = False
  if family in ("mistral", "gemma2"):
    out["sliding_window"] = cfg.sliding_window or None
  if family == "gemma2":
    if cfg.query_pre_attn_scalar and not float(cfg.query_pre_attn_scalar).is_integer():
      raise ConfigError(f"gemma2 checkpoints store query_pre_attn_scalar as an integer, not {cfg.query_pre_attn_scalar}")
    out.update(
        query_pre_attn_scalar=int(cfg.query_pre_attn_scalar or cfg.head_dim),  # transformers wants an int
        attn_logit_softcapping=cfg.attn_logit_softcap or None,
        final_logit_softcapping=cfg.final_logit_softcap or None,
    )
  return out


def _comparable(cfg: ModelConfig, family: str) -> ModelConfig:
  """`cfg` with the defaults a checkpoint of `family` fills in."""
  if family in _GEMMA and not cfg.query_pre_attn_scalar:
    return dataclasses.replace(cfg, query_pre_attn_scalar=float(cfg.head_dim) if family == "gemma2" else 0.0)
  return cfg


def _checked(cfg: ModelConfig, family: str, out: dict[str, Any], comparable: ModelConfig) -> dict[str, Any]:
  """`out`, once it is known to reload as `comparable` (cfg with the defaults a checkpoint fills in)."""
  if cfg.lora_rank:
    raise ConfigError("merge the LoRA adapters first (sft.model.lora.merge): a checkpoint holds plain weights")
  # Runtime fields (dtypes, remat, LoRA settings) are not part of the checkpoint's maths.
  reloaded = dataclasses.replace(from_hf_config(out), **{k: getattr(cfg, k) for k in runtime_fields()})
  if comparable.position_embedding == "rope":
    comparable = dataclasses.replace(comparable, max_positions=reloaded.max_positions)  # no table to size
  if reloaded != comparable:
    raise ConfigError(f"this model's config has maths a {family} checkpoint cannot express: {cfg}")
  return out
