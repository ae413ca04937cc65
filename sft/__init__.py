"""sft: raw text to a fine-tuned language model, in JAX.

    import sft
    from configs import quickstart
    sft.train_and_evaluate(quickstart.get_config(), "/tmp/sft-quickstart")

Packages: `sft.databuilder` (raw records -> an audited chat dataset), `sft.pipeline` (tokenizer and
grain input pipeline), `sft.model` (the Transformer), `sft.trainer` (sharded training),
`sft.evaluator` (metrics and generation), `sft.hf` (Hugging Face checkpoints).
"""

from sft.config import ConfigError, base_config

__all__ = ["ConfigError", "base_config", "build_dataset", "respond", "train_and_evaluate"]


def __getattr__(name):
  # Imported on first use, so the data builder's worker processes never load JAX.
  if name == "train_and_evaluate":
    from sft.trainer.loop import train_and_evaluate  # noqa: PLC0415

    return train_and_evaluate
  if name == "respond":
    from sft.serve import respond  # noqa: PLC0415

    return respond
  if name == "build_dataset":
    from sft.databuilder.pipeline import build_dataset  # noqa: PLC0415

    return build_dataset
  raise AttributeError(f"module 'sft' has no attribute {name!r}")
