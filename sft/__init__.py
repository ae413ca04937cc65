"""sft: raw text to a fine-tuned language model, in JAX.

    import sft
    from configs import quickstart
    sft.train_and_evaluate(quickstart.get_config(), "/tmp/sft-quickstart")

Packages: `sft.databuilder` (raw records -> chat records), `sft.pipeline` (tokenizer and grain input
pipeline), `sft.model` (the Transformer), `sft.trainer` (sharded training), `sft.evaluator`.
"""

from sft.config import ConfigError, base_config
from sft.serve import respond
from sft.trainer.loop import train_and_evaluate

__all__ = ["ConfigError", "base_config", "respond", "train_and_evaluate"]
