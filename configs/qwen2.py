"""python launch.py --config=configs/qwen2.py:lora --workdir=/tmp/sft-qwen2 \
  --config.model.checkpoint=/path/to/hf_model --config.data.dir=/path/to/data

Fine-tune a local Qwen2 / Qwen2.5 checkpoint (a Hugging Face folder) on chat records, fully or with LoRA.
The argument is "full" (default) or "lora". The model's shape, tokenizer and chat template come from
the checkpoint folder; the fine-tuned model is exported to <workdir>/hf_export for transformers.
"""

from sft.config import finetune_config


def get_config(mode: str = "full"):
  return finetune_config(mode)
