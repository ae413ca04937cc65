"""python launch.py --config=configs/finetune.py:lora --workdir=/tmp/sft-finetune \
  --config.model.checkpoint=/path/to/hf_model --config.data.dir=/path/to/data

Fine-tune a local Hugging Face checkpoint on chat records, fully ("full", the default) or with LoRA ("lora").
Supported families: Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3, Gemma, Gemma 2, GPT-2. The family, the model's shape,
the tokenizer and the chat template all come from the checkpoint folder (config.json and the tokenizer
files), so one config serves them all; the fine-tuned model is exported to <workdir>/hf_export for transformers.
Installed (pip install -e .): sft --config=finetune:lora --workdir=... with the same overrides.
"""

from sft.config import finetune_config


def get_config(mode: str = "full"):
  return finetune_config(mode)
