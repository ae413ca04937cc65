"""The jobs a config describes, as the launcher and notebooks run them: build data, train and evaluate,
answer prompts. The top of the import graph: this is where the data builder is handed a model to
annotate with, so the builder itself never imports serving or training.

    import sft
    sft.train_and_evaluate(config, workdir)   # or sft.build_dataset(build_config, out_dir), sft.respond(...),
                                              # sft.evaluate_model(eval_config, workdir),
                                              # sft.inspect_training_rows(config, workdir)
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import ml_collections

from sft import databuilder, eval_job
from sft.config_check import check_config
from sft.serve import answers
from sft.trainer import inspect as trainer_inspect
from sft.trainer import loop


def open_annotator(build: ml_collections.ConfigDict) -> Any:
  """The annotator a build config's `annotate.model` names (None when it names none): a training workdir
  or a Hugging Face folder, which loads its weights on first use, so a build that finds nothing to
  annotate never loads them; or an OpenAI-compatible server (a URL: `annotate.endpoint`), first asked
  on first use too."""
  ann = build.annotate
  if not ann.model:
    return None
  from sft import annotator  # noqa: PLC0415
  from sft.annotator.endpoint import backend_of  # noqa: PLC0415

  if backend_of(ann.model, ann.backend) == "endpoint":
    end = ann.endpoint
    return annotator.open_endpoint(
        ann.model, model=end.model, api_key_env=end.api_key_env, timeout_s=end.timeout_s, retries=end.retries,
        concurrency=end.concurrency,
    )
  return annotator.open_annotator(ann.model, ann.backend, batch_size=ann.batch_size)


def build_dataset(config: ml_collections.ConfigDict, out_dir: str | pathlib.Path, **kwargs: Any) -> dict[str, Any]:
  """`sft.databuilder.build_dataset`, served by the annotator `annotate.model` names; returns the manifest."""
  check_config(config)  # every key, before a model is loaded or a file read
  kwargs.setdefault("annotator", open_annotator(config))
  return databuilder.build_dataset(config, out_dir, **kwargs)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, **kwargs: Any) -> dict[str, Any]:
  """`sft.trainer.loop.train_and_evaluate`, its data build (data.source="build") served like `build_dataset`."""
  check_config(config)  # every key, before the annotation model loads
  if config.data.source == "build":
    kwargs.setdefault("annotator", open_annotator(config.data.build))
  return loop.train_and_evaluate(config, workdir, **kwargs)


def inspect_training_rows(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, **kwargs: Any):
  """`sft.trainer.inspect.inspect_training_rows`: the first packed training rows as the model receives them,
  the loss-masked tokens marked; its data build (data.source="build") served like `train_and_evaluate`'s."""
  check_config(config)
  if config.data.source == "build":
    kwargs.setdefault("annotator", open_annotator(config.data.build))
  return trainer_inspect.inspect_training_rows(config, workdir, **kwargs)


def evaluate_model(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, **kwargs: Any) -> dict[str, float]:
  """`sft.eval_job.evaluate_model`: a trained or Hugging Face model on held-out records, with a report."""
  return eval_job.evaluate_model(config, workdir, **kwargs)


def respond(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, prompts: Sequence[str], *,
    given_keys: set[str] | frozenset[str] | None = None,
) -> list[str]:
  """One answer per prompt from the workdir's latest checkpoint, the model built as it was trained;
  `given_keys`: the keys set on the command line (see `sft.serve.answers.load_responder`)."""
  check_config(config)
  return answers.respond(config, workdir, prompts, given_keys=given_keys)
