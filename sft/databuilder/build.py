"""build_dataset: a build config and a folder -> the dataset, rejected.jsonl, report.md, manifest.json.

    from sft.databuilder import build_config, build_dataset
    config = build_config()
    config.input_dir = "/data/raw"
    build_dataset(config, "/data/sft")

The manifest stores the config, library versions, the sha256 of every input and output file, the
annotator and its decoding, and the accounting: for every source, read + generated = kept + dropped (by
stage and reason).

With an annotator, every generation and score is kept in <out_dir>/annotations.sqlite (the annotation
cache, `sft.annotator.cache`): it outlives a failed or killed build, so a build run again asks the model
only for what it does not have yet.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
import platform
import shutil
from typing import Any

import ml_collections

from sft.console import ensure_console_handler
from sft.databuilder import annotate, decontaminate, quality, report, stages, write
from sft.databuilder.config import check_build_config
from sft.databuilder.inputs import list_files
from sft.errors import ConfigError

log = logging.getLogger("sft")
MANIFEST = "manifest.json"
REPORT = "report.md"
PLOTS = "plots"
CACHE = "annotations.sqlite"  # beside the build's files, not one of them: a rebuild keeps and reuses it
_CACHE_FILES = {CACHE, f"{CACHE}-wal", f"{CACHE}-shm", f"{CACHE}-journal"}
# Input files of this many bytes (a few thousand records) start the worker processes before reading.
EARLY_WORKERS_MIN_BYTES = 1 << 20
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
  """The config as plain data (what worker processes receive); its values were checked by `check_config`
  (`sft.config_check`), so that only the tokenizer it names is opened here."""
  p = json.loads(config.to_json())
  if p["filter"]["sft"]["refusal_patterns"] == ["default"]:
    p["filter"]["sft"]["refusal_patterns"] = list(quality.REFUSALS)
  if p["filter"]["length"]["tokenizer"]:
    stages.tokenizer_control_strings(p["filter"]["length"]["tokenizer"])  # a folder it cannot open: its ConfigError now
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
    inputs += [("file", str(p), p.relative_to(folder).as_posix()) for p in list_files(folder)]
  return inputs


def make_runner(params: dict[str, Any], out_dir: pathlib.Path, progress: bool):
  if params["runner"] == "beam":
    from sft.databuilder.runner_beam import BeamRunner  # noqa: PLC0415 (Beam is optional)

    return BeamRunner(list(params["beam_options"]), out_dir / ".beam")
  from sft.databuilder.runner_local import LocalRunner  # noqa: PLC0415

  return LocalRunner(params["num_workers"], progress=progress)


def _owned(out_dir: pathlib.Path) -> set[str]:
  """The names in `out_dir` its previous build wrote (what a rebuild may replace); refuses a folder
  that holds files but no manifest: they may be anyone's."""
  if not out_dir.exists():
    return set()
  if not out_dir.is_dir():
    raise ConfigError(f"output folder {str(out_dir)!r} is a file")
  manifest = load_manifest(out_dir)
  if manifest is None:
    if any(p.name not in _CACHE_FILES for p in out_dir.iterdir()):  # a first build cut off leaves its cache
      raise ConfigError(
          f"output folder {str(out_dir)!r} is not empty and has no {MANIFEST}: it is no data build's output "
          "(or a build was cut off while it replaced one), and its files may be someone else's; use an empty folder"
      )
    return set()
  names = {e["file"] for e in manifest["outputs"]}
  bad = sorted(n for n in names if pathlib.PurePath(n).name != n or n in (".", ".."))
  if bad:
    raise ConfigError(f"{out_dir / MANIFEST} lists outputs outside its folder: {bad[:3]}")
  return names | {MANIFEST, REPORT, PLOTS}


def _check_out_dir(params: dict[str, Any], out_dir: pathlib.Path) -> set[str]:
  """What a build into `out_dir` may replace there (see _owned), after refusing folders that would
  read or delete the build's own files."""
  out = out_dir.resolve()
  if params["input_dir"]:
    inp = pathlib.Path(params["input_dir"]).resolve()
    if out == inp or out.is_relative_to(inp) or inp.is_relative_to(out):
      raise ConfigError(
          f"output folder {str(out_dir)!r} and input_dir={params['input_dir']!r} overlap: a build would read its own "
          "outputs as inputs (or replace its inputs); put them side by side"
      )
  owned = _owned(out_dir)
  if out_dir.exists():
    clash = sorted(write.output_names(params["output"]["num_shards"]) & {p.name for p in out_dir.iterdir()} - owned)
    if clash:
      raise ConfigError(f"{out_dir} holds {clash[:3]}, which the previous build did not write; a build would overwrite them")
  return owned


def _beside(out_dir: pathlib.Path, what: str) -> pathlib.Path:
  """A hidden working folder next to `out_dir`: same filesystem, so moving files between them is a rename."""
  out_dir = out_dir.resolve()  # "." has no name; a link's target is where its files live
  return out_dir.parent / f".{out_dir.name}.{what}-{os.getpid()}"


def _remove(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path)
  else:
    path.unlink(missing_ok=True)


def _swap(staging: pathlib.Path, out_dir: pathlib.Path, new: set[str], owned: set[str]) -> None:
  """Moves the files `new` of the finished build from `staging` into `out_dir`, replacing only what the
  previous build wrote (`owned`). The old manifest leaves first and the new one arrives last, so a crash
  half-way leaves a folder with no manifest (which training and later builds refuse) rather than a
  manifest naming the wrong files; an error half-way puts the previous build back."""
  out_dir.mkdir(parents=True, exist_ok=True)
  clash = sorted(set(new) & {p.name for p in out_dir.iterdir()} - owned)
  if clash:
    raise ConfigError(f"{out_dir} holds {clash[:3]}, which the previous build did not write; a build would overwrite them")
  trash = _beside(out_dir, "old")
  _remove(trash)
  trash.mkdir()
  # A name is noted before its move, so a move cut off half-way (a copy, across filesystems) is undone too.
  moved_old: list[str] = []
  moved_new: list[str] = []
  try:
    for name in sorted(owned, key=lambda n: (n != MANIFEST, n)):
      if os.path.lexists(out_dir / name):
        moved_old.append(name)
        shutil.move(out_dir / name, trash / name)
    for name in sorted(new, key=lambda n: (n == MANIFEST, n)):
      moved_new.append(name)
      shutil.move(staging / name, out_dir / name)
  except BaseException:
    try:
      for name in reversed(moved_new):
        _remove(out_dir / name)
      for name in reversed(moved_old):
        if os.path.lexists(trash / name) and not os.path.lexists(out_dir / name):  # else it never left
          shutil.move(trash / name, out_dir / name)
    except BaseException:
      log.error("data builder: could not put the previous build back into %s; its files are in %s", out_dir, trash)
      raise
    shutil.rmtree(trash, ignore_errors=True)
    raise
  shutil.rmtree(trash, ignore_errors=True)


class _CachedTasks:
  """The annotator with one cached view per annotation task (`sft.annotator.cache`), and the counts of
  answers the cache gave and the model computed."""

  def __init__(self, annotator: Any, path: pathlib.Path):
    from sft.annotator.cache import AnnotationCache  # noqa: PLC0415

    self.inner, self.path, self.cache, self.views = annotator, path, AnnotationCache(path), {}

  @property
  def fingerprint(self) -> str:
    return self.inner.fingerprint

  def for_task(self, task: str) -> Any:
    from sft.annotator.cache import CachedAnnotator  # noqa: PLC0415

    if task not in self.views:
      self.views[task] = CachedAnnotator(self.inner, self.cache, task)
    return self.views[task]

  def counts(self) -> dict[str, Any]:
    views = self.views.values()
    return {"path": str(self.path), "hits": sum(v.hits for v in views), "misses": sum(v.misses for v in views)}


def _annotation(params: dict[str, Any], annotator: Any) -> dict[str, Any] | None:
  """What the manifest records of the annotator: which model, its fingerprint, the decoding settings."""
  if annotator is None:
    return None
  ann = params["annotate"]
  return {
      "annotator": {"model": ann["model"], "backend": ann["backend"], "fingerprint": annotator.fingerprint},
      "decoding": stages.decoding(params).as_dict(),
  }


def build_dataset(config: ml_collections.ConfigDict, out_dir: str | pathlib.Path, *, annotator: Any = None, progress: bool = True) -> dict[str, Any]:
  """Runs every stage and writes the dataset into `out_dir`; returns the manifest. `annotator` (an
  `sft.annotator` backend) serves annotation; `sft.build_dataset` opens the one `annotate.model` names.

  The build is written into a hidden folder beside `out_dir` and moved in only once it has fully
  succeeded, replacing what the previous build wrote (the files its manifest lists, report.md, plots/
  and manifest.json) and nothing else. A failed build leaves the previous one as it was."""
  ensure_console_handler()
  check_build_config(config)  # every key, before a file is read
  params = params_of(config)
  out_dir = pathlib.Path(out_dir)
  owned = _check_out_dir(params, out_dir)
  inputs = list_inputs(params)
  if annotator is None and params["annotate"]["model"]:
    raise ConfigError(
        "annotate.model names a model but none was given to serve it: build through sft.build_dataset "
        "(or launch.py), or pass annotator="
    )
  dc = params["decontaminate"]
  try:
    index, eval_items = decontaminate.index_from_files(dc["eval_files"], dc["ngram"], dc["min_words"], dc["exact_min_words"])
  except FileNotFoundError as err:
    raise ConfigError(f"decontaminate.eval_files: {err}") from None
  for path, n in eval_items.items():
    if n["raw"]:
      log.warning("decontaminate: %d of %d items of %s are in no known schema; matched by their raw text", n["raw"], n["items"], path)
  log.info("data builder: %d input files%s -> %s (%s runner)", sum(k == "file" for k, _, _ in inputs), " + stdlib" if params["stdlib"] else "", out_dir, params["runner"])

  staging = _beside(out_dir, "building")
  _remove(staging)
  staging.mkdir(parents=True)
  try:
    if annotator is not None and params["annotate"]["cache"]:
      if params["runner"] == "beam":
        log.warning("annotate.cache: not used with the beam runner (its workers cannot share one file); every answer is computed")
      else:
        out_dir.mkdir(parents=True, exist_ok=True)
        annotator = _CachedTasks(annotator, out_dir / CACHE)
    manifest = _build_into(staging, params, inputs, index, eval_items, annotator, progress)
    # Only what the build wrote moves in: runner leftovers (.beam) stay behind and go with `staging`.
    _swap(staging, out_dir, {e["file"] for e in manifest["outputs"]} | {MANIFEST, REPORT, PLOTS}, owned)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  total = manifest["accounting"]["total"]
  generated = f", generated {total['generated']}" if total.get("generated") else ""
  log.info("data builder: read %d%s, kept %d, dropped %d; report %s", total["read"], generated, total["kept"], total["dropped"], out_dir / REPORT)
  return manifest


def _input_bytes(inputs: list[tuple[str, str, str]]) -> int:
  return sum(os.path.getsize(path) for kind, path, _ in inputs if kind == "file" and os.path.isfile(path))


def _build_into(folder: pathlib.Path, params: dict[str, Any], inputs: list[tuple[str, str, str]], index: Any, eval_items: dict[str, Any], annotator: Any, progress: bool) -> dict[str, Any]:
  runner = make_runner(params, folder, progress)
  try:
    if _input_bytes(inputs) >= EARLY_WORKERS_MIN_BYTES:  # the workers get ready while this process reads
      runner.start_workers(functools.partial(stages.warm, params))
    return _run_and_write(runner, folder, params, inputs, index, eval_items, annotator)
  finally:
    runner.close()


def _run_and_write(runner: Any, folder: pathlib.Path, params: dict[str, Any], inputs: list[tuple[str, str, str]], index: Any, eval_items: dict[str, Any], annotator: Any) -> dict[str, Any]:
  items = stages.run(runner, inputs, params, index, annotator)
  num_shards = params["output"]["num_shards"]
  facts = runner.flat_map(items, functools.partial(report.fact, tokenizer=params["filter"]["length"]["tokenizer"]), "measure")
  # Facts already here (a local build with workers): a large build's plots are drawn beside the shards' writing.
  background = isinstance(facts, list) and getattr(runner, "num_workers", 1) > 1 and len(facts) >= report.BACKGROUND_PLOTS_MIN_RECORDS
  plots = report.BackgroundPlots(folder, facts) if background else None
  try:
    written = runner.group_by(items, functools.partial(write.shard_key, num_shards=num_shards), functools.partial(write.write_shard, str(folder), num_shards), "write")
    written, facts = runner.results(written, facts)
    if annotator is not None:
      problem = annotate.guard_problem(facts, params["annotate"]["max_drop_fraction"])
      if problem:
        raise ConfigError(problem)
    manifest = _manifest(folder, params, inputs, eval_items, annotator, written, facts, num_shards)
    report.write_report(folder, facts, manifest, params["output"]["examples_per_reason"], plots)
  except BaseException:
    if plots is not None:
      plots.cancel()
    raise
  report.write_json(folder / MANIFEST, manifest)  # last: its presence says the build is whole
  return manifest


def _manifest(folder: pathlib.Path, params: dict[str, Any], inputs: list[tuple[str, str, str]], eval_items: dict[str, Any], annotator: Any, written: list, facts: list, num_shards: int) -> dict[str, Any]:
  written = sorted(written + write.write_empty_splits(folder, written, num_shards), key=lambda e: e["file"])

  manifest = {
      "config": params,
      "config_hash": config_hash(params),
      "versions": _versions(),
      "inputs": [
          # A dangling link is a counted "broken link" row of the report, with no bytes to hash.
          {"source": source, "path": path, "sha256": write.sha256(pathlib.Path(path)) if pathlib.Path(path).is_file() else None}
          if kind == "file" else {"source": source, "python": platform.python_version()}
          for kind, path, source in inputs
      ],
      "eval_sets": eval_items,
      "annotation": _annotation(params, annotator),
      "outputs": written,
      "accounting": report.accounting(facts),
  }
  if isinstance(annotator, _CachedTasks):
    manifest["annotation"]["cache"] = annotator.counts()
    log.info("annotation cache %s: %d answers reused, %d computed", annotator.path, annotator.counts()["hits"], annotator.counts()["misses"])
  return manifest


def load_manifest(out_dir: str | pathlib.Path) -> dict[str, Any] | None:
  """The manifest of the build in `out_dir` (None when there is none)."""
  path = pathlib.Path(out_dir) / MANIFEST
  if not path.exists():
    return None
  try:
    manifest = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
    raise ConfigError(f"{path} is not valid JSON ({err}): not a finished data build") from None
  reason = _malformed(manifest)
  if reason:
    raise ConfigError(f"{path} is not a data build's manifest: {reason}")
  return manifest


def _malformed(manifest: Any) -> str | None:
  """Why `manifest` lacks what readers of a build rely on (None when it has it all)."""
  if not isinstance(manifest, dict):
    return "not a JSON object"
  if not isinstance(manifest.get("config_hash"), str):
    return "no config_hash"
  outputs = manifest.get("outputs")
  if not isinstance(outputs, list) or not all(isinstance(e, dict) and isinstance(e.get("file"), str) for e in outputs):
    return "outputs is not a list of {file: ...} entries"
  if any(not isinstance(e.get("bytes", 0), int) for e in outputs):
    return "an output's bytes is not an integer"
  if not isinstance(manifest.get("accounting"), dict) or not isinstance(manifest["accounting"].get("total"), dict):
    return "no accounting.total"
  return None


def check_outputs(out_dir: str | pathlib.Path) -> dict[str, Any]:
  """The manifest of the finished build in `out_dir`, after checking that every output it lists is
  there with the size it recorded (sizes, not sha256: hashing large shards on every start is slow)."""
  folder = pathlib.Path(out_dir)
  manifest = load_manifest(folder)
  if manifest is None:
    raise ConfigError(f"{folder} has no {MANIFEST}: not a finished data build")
  for entry in manifest["outputs"]:
    if pathlib.PurePath(entry["file"]).name != entry["file"] or entry["file"] in (".", ".."):
      raise ConfigError(f"{folder / MANIFEST} lists an output outside its folder: {entry['file']!r}")
    path = folder / entry["file"]
    if not path.is_file():
      raise ConfigError(f"{folder}: {entry['file']} is listed in {MANIFEST} but missing: an incomplete data build")
    if "bytes" in entry and path.stat().st_size != entry["bytes"]:
      raise ConfigError(f"{folder}: {entry['file']} has {path.stat().st_size} bytes, {MANIFEST} says {entry['bytes']}: changed since the build")
  return manifest


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
