"""build_dataset: a build config and a folder -> the dataset, rejected.jsonl, report.md, manifest.json.

    from sft.databuilder import build_config, build_dataset
    config = build_config()
    config.input_dir = "/data/raw"
    build_dataset(config, "/data/sft")

The manifest stores the config, library versions, the sha256 of every input and output file, and
the accounting: for every source, read = kept + dropped (by stage and reason).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import pathlib
import platform
import shutil
from typing import Any

import ml_collections

from sft.console import ensure_console_handler
from sft.databuilder import annotate, decontaminate, quality, readers, report, stages, write
from sft.errors import ConfigError

log = logging.getLogger("sft")
MANIFEST = "manifest.json"
_LIBRARIES = ("ftfy", "py3langid", "numpy", "array_record", "apache-beam", "grain")


def _versions() -> dict[str, str]:
  versions = {"python": platform.python_version()}
  for name in _LIBRARIES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def params_of(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain data (what worker processes receive), checked for values that cannot work."""
  p = json.loads(config.to_json())
  if p["filter"]["sft"]["refusal_patterns"] == ["default"]:
    p["filter"]["sft"]["refusal_patterns"] = list(quality.REFUSALS)
  d = p["dedup"]
  if d["near"] and d["bands"] * d["rows"] != d["num_perm"]:
    raise ConfigError(f"dedup.bands x dedup.rows ({d['bands']} x {d['rows']}) must equal dedup.num_perm ({d['num_perm']})")
  if not 0.0 <= p["output"]["validation_fraction"] < 1.0:
    raise ConfigError(f"output.validation_fraction must be in [0, 1), got {p['output']['validation_fraction']}")
  if p["output"]["num_shards"] < 1:
    raise ConfigError(f"output.num_shards must be at least 1, got {p['output']['num_shards']}")
  if p["runner"] not in ("local", "beam"):
    raise ConfigError(f"runner must be 'local' or 'beam', got {p['runner']!r}")
  if not p["input_dir"] and not p["stdlib"]:
    raise ConfigError("nothing to read: set input_dir (a folder of raw files) and/or stdlib=True")
  bad_pii = set(p["clean"]["pii"]) - {"email", "ip_address", "phone"}
  if bad_pii:
    raise ConfigError(f"clean.pii: unknown kinds {sorted(bad_pii)}; choose among email, ip_address, phone")
  if (p["filter"]["length"]["min_tokens"] or p["filter"]["length"]["max_tokens"]) and not p["filter"]["length"]["tokenizer"]:
    raise ConfigError("filter.length.min_tokens / max_tokens need filter.length.tokenizer")
  if p["filter"]["length"]["tokenizer"] and not pathlib.Path(p["filter"]["length"]["tokenizer"]).exists():
    raise ConfigError(f"filter.length.tokenizer={p['filter']['length']['tokenizer']!r} does not exist")
  ann = p["annotate"]
  if (ann["self_instruct"]["num_instructions"] > 0 or ann["score"]["enabled"]) and not ann["model_workdir"]:
    raise ConfigError("annotate.self_instruct and annotate.score need annotate.model_workdir (a trained workdir)")
  return p


def config_hash(params: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def list_inputs(params: dict[str, Any]) -> list[tuple[str, str, str]]:
  """("file", path, source name) for every input file, plus ("stdlib", "", "stdlib") if asked."""
  inputs = [("stdlib", "", "stdlib")] if params["stdlib"] else []
  if params["input_dir"]:
    folder = pathlib.Path(params["input_dir"])
    if not folder.is_dir():
      raise ConfigError(f"input_dir={str(folder)!r} is not a folder")
    inputs += [("file", str(p), p.relative_to(folder).as_posix()) for p in readers.list_files(folder)]
  return inputs


def make_runner(params: dict[str, Any], out_dir: pathlib.Path, progress: bool):
  if params["runner"] == "beam":
    from sft.databuilder.runner_beam import BeamRunner  # noqa: PLC0415 (Beam is optional)

    return BeamRunner(list(params["beam_options"]), out_dir / ".beam")
  from sft.databuilder.runner_local import LocalRunner  # noqa: PLC0415

  return LocalRunner(params["num_workers"], progress=progress)


def build_dataset(config: ml_collections.ConfigDict, out_dir: str | pathlib.Path, *, generator: annotate.Generator | None = None, progress: bool = True) -> dict[str, Any]:
  """Runs every stage and writes the dataset into `out_dir` (replacing what a previous build wrote);
  returns the manifest."""
  ensure_console_handler()
  params = params_of(config)
  out_dir = pathlib.Path(out_dir)
  inputs = list_inputs(params)
  if generator is None and params["annotate"]["model_workdir"]:
    raise ConfigError(
        "annotate.model_workdir names a model but none was given to serve it: build through sft.build_dataset "
        "(or launch.py), or pass generator="
    )
  dc = params["decontaminate"]
  try:
    index, eval_items = decontaminate.index_from_files(dc["eval_files"], dc["ngram"], dc["min_words"])
  except FileNotFoundError as err:
    raise ConfigError(f"decontaminate.eval_files: {err}") from None
  for path, n in eval_items.items():
    if n["raw"]:
      log.warning("decontaminate: %d of %d items of %s are in no known schema; matched by their raw text", n["raw"], n["items"], path)
  if out_dir.exists():
    for old in [*out_dir.glob("*-of-*.*"), out_dir / "report.md", out_dir / MANIFEST]:
      old.unlink(missing_ok=True)
    shutil.rmtree(out_dir / "plots", ignore_errors=True)
  out_dir.mkdir(parents=True, exist_ok=True)
  log.info("data builder: %d input files%s -> %s (%s runner)", sum(k == "file" for k, _, _ in inputs), " + stdlib" if params["stdlib"] else "", out_dir, params["runner"])

  runner = make_runner(params, out_dir, progress)
  items = stages.run(runner, inputs, params, index, generator)
  num_shards = params["output"]["num_shards"]
  written = runner.group_by(items, functools.partial(write.shard_key, num_shards=num_shards), functools.partial(write.write_shard, str(out_dir), num_shards), "write")
  facts = runner.flat_map(items, functools.partial(report.fact, tokenizer=params["filter"]["length"]["tokenizer"]), "measure")
  written, facts = runner.results(written, facts)
  written = sorted(written + write.write_empty_splits(out_dir, written, num_shards), key=lambda e: e["file"])

  manifest = {
      "config": params,
      "config_hash": config_hash(params),
      "versions": _versions(),
      "inputs": [
          {"source": source, "path": path, "sha256": write.sha256(pathlib.Path(path))} if kind == "file" else {"source": source, "python": platform.python_version()}
          for kind, path, source in inputs
      ],
      "eval_sets": eval_items,
      "outputs": written,
      "accounting": report.accounting(facts),
  }
  report.write_json(out_dir / MANIFEST, manifest)
  report.write_report(out_dir, facts, manifest, params["output"]["examples_per_reason"])
  total = manifest["accounting"]["total"]
  log.info("data builder: read %d, kept %d, dropped %d; report %s", total["read"], total["kept"], total["dropped"], out_dir / "report.md")
  return manifest


def load_manifest(out_dir: str | pathlib.Path) -> dict[str, Any] | None:
  """The manifest of the build in `out_dir` (None when there is none)."""
  path = pathlib.Path(out_dir) / MANIFEST
  return json.loads(path.read_text()) if path.exists() else None


def ensure_built(config: ml_collections.ConfigDict, out_dir: str | pathlib.Path, **kwargs: Any) -> dict[str, Any]:
  """The manifest of the build of `config` in `out_dir`, building it first when there is none. A build
  made there with another config is an error, never silently reused or replaced."""
  manifest = load_manifest(out_dir)
  if manifest is None:
    return build_dataset(config, out_dir, **kwargs)
  if manifest["config_hash"] != config_hash(params_of(config)):
    raise ConfigError(
        f"{out_dir} holds data built with another data.build config (manifest.json has it); "
        "use a new workdir or delete that folder"
    )
  return manifest
