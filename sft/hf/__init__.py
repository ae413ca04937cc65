"""Hugging Face interop: load and export Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2 and GPT-2 checkpoints
(safetensors only)."""

from sft.hf.config import FAMILIES, from_hf_config, read_hf_config, to_hf_config
from sft.hf.export import export_model, iter_hf_tensors, to_hf_tensors
from sft.hf.weights import hf_names, load_model, load_params
