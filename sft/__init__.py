"""sft: raw text to a fine-tuned language model, in JAX.

    import sft
    from configs import quickstart
    sft.train_and_evaluate(quickstart.get_config(), "/tmp/sft-quickstart")

Packages, bottom to top of the import graph: `sft.tokenizer` (SentencePiece and Hugging Face
tokenizers, the chat protocol), `sft.pipeline` (the grain input pipeline) and `sft.databuilder` (raw
records -> an audited chat dataset); `sft.model` (the
Transformer); `sft.hf` (Hugging Face checkpoints); `sft.trainer` (run setup, sharded training),
`sft.evaluator` (metrics per task, generation, reports), `sft.serve` (answering prompts in-process, and over HTTP with OpenAI's API: `sft.serve(config, workdir)`),
`sft.eval_job` (evaluating a saved model); `sft.audit` (how good a data build is, from reviewed
samples: `sft.audit(config, workdir)`); `sft.jobs` and `sft.cli` (what the launcher runs).
"""

from sft.errors import ConfigError

__all__ = [
    "ConfigError", "audit", "base_config", "build_dataset", "evaluate_model", "inspect_training_rows", "respond", "serve",
    "train_and_evaluate",
]


def __getattr__(name):
  # Imported on first use, so the data builder's worker processes (which import sft) never load JAX.
  if name == "base_config":
    from sft.config import base_config  # noqa: PLC0415

    return base_config
  if name in ("build_dataset", "evaluate_model", "inspect_training_rows", "respond", "train_and_evaluate"):
    from sft import jobs  # noqa: PLC0415

    return getattr(jobs, name)
  if name == "audit":  # the package, which runs the audit when called: sft.audit(config, workdir)
    import sft.audit  # noqa: PLC0415

    return sft.audit
  if name == "serve":  # the package, which serves when called: sft.serve(config, workdir)
    import sft.serve  # noqa: PLC0415

    return sft.serve
  raise AttributeError(f"module 'sft' has no attribute {name!r}")
