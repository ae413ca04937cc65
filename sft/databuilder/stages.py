"""The build as stages over a collection of records, written once against a small runner interface
so the same code runs in local worker processes (runner_local.py) and on Apache Beam (runner_beam.py).

    read -> annotate (fill missing responses, label unlabelled records) -> clean -> filter -> decontaminate
         -> [self-instruct: new records from kept seeds, through clean -> filter -> decontaminate]
         -> exact dedup -> near dedup -> judge -> format + split -> write

A dropped record stays in the collection, marked, and every later stage passes it through; the
writer puts it in rejected.jsonl and the manifest counts it, so read = kept + dropped per source.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Protocol, Sequence

from sft.annotator.base import Decoding
from sft.databuilder import annotate, clean, decontaminate, dedup, language_id, quality, readers, records


class Runner(Protocol):
  """What the stages need from an execution engine. A collection is whatever the runner uses."""

  def create(self, items: list[Any], name: str) -> Any: ...
  def flat_map(self, coll: Any, fn: Callable[[Any], list[Any]], name: str) -> Any: ...
  # fn maps a list of items, of the runner's choosing, to a list (a stage that works better on many at once).
  def map_chunks(self, coll: Any, fn: Callable[[list], list], name: str) -> Any: ...
  def map_batches(self, coll: Any, fn: Callable[[list], list], batch_size: int, name: str) -> Any: ...
  def group_by(self, coll: Any, key_fn: Callable[[Any], Any], fn: Callable[[Any, list], list], name: str) -> Any: ...
  def global_apply(self, coll: Any, select: Callable[[Any], bool], fn: Callable[[list], list], name: str) -> Any: ...
  def near_duplicates(self, coll: Any, params: dict[str, Any], name: str) -> Any: ...
  def concat(self, colls: list[Any], name: str) -> Any: ...
  # Local workers started now, `warm` run in each (a no-op where workers are the engine's); close: stops them.
  def start_workers(self, warm: Callable[[], Any] | None = None) -> None: ...
  def close(self) -> None: ...


def read_input(item: tuple[str, str, str], field_map: dict[str, str], max_record_bytes: int, gold_field: str = "") -> list[records.Record]:
  """("file", path, source) -> its records; ("stdlib", "", "stdlib") -> the embedded default."""
  kind, path, source = item
  if kind == "stdlib":
    from sft.databuilder import stdlib_tasks  # noqa: PLC0415

    return stdlib_tasks.read_records()
  import pathlib  # noqa: PLC0415

  return list(readers.read_file(pathlib.Path(path), source, field_map, max_record_bytes, gold_field))


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_path: str) -> Any:
  """The tokenizer, loaded once per process for token counts and its control strings."""
  from sft.tokenizer import load_tokenizer  # noqa: PLC0415 (only a configured tokenizer needs it)

  return load_tokenizer(tokenizer_path)


@functools.lru_cache(maxsize=4)
def token_counter(tokenizer_path: str) -> Callable[[str], int] | None:
  """text -> number of tokens, with the tokenizer loaded once per process (None without a path). A text
  the tokenizer library fails on raises TokenizerFailure (a ValueError): the length filter drops that record."""
  if not tokenizer_path:
    return None
  tokenizer = _tokenizer(tokenizer_path)
  return lambda text: len(tokenizer.encode(text))


@functools.lru_cache(maxsize=4)
def tokenizer_control_strings(tokenizer_path: str) -> tuple[str, ...]:
  """The target tokenizer's own control strings, escaped or dropped by clean on top of the known ones."""
  return tuple(getattr(_tokenizer(tokenizer_path), "control_strings", ()) or ()) if tokenizer_path else ()


def warm(params: dict[str, Any]) -> None:
  """Loads what the record-wise stages load on first use (the language model, the tokenizer): worker
  processes started ahead of them run this while the inputs are read."""
  if params["filter"]["language"]["enabled"]:
    language_id.model()
  token_counter(params["filter"]["length"]["tokenizer"])
  tokenizer_control_strings(params["filter"]["length"]["tokenizer"])


def process_record(record: records.Record, params: dict[str, Any], index: dict[str, Any]) -> list[records.Record]:
  """clean -> filter -> decontaminate, for one record."""
  return process_records([record], params, index)


def process_records(batch: list[records.Record], params: dict[str, Any], index: dict[str, Any]) -> list[records.Record]:
  """clean -> filter -> decontaminate for each live record of the batch, in order; language identification
  runs once for the whole batch, and each record's result is what it would be alone. The records kept get
  what the dedup stages need attached (dedup.prepared), here where the work is spread over workers."""
  length = params["filter"]["length"]
  out = list(batch)
  live = []
  for i, record in enumerate(batch):
    if records.is_dropped(record):
      continue
    # The character cap before cleaning: cleaning work grows with the text, and a huge record would be
    # dropped by the filter anyway.
    size = len(records.contents(record))
    if length["max_characters"] and size > length["max_characters"]:
      out[i] = records.drop(record, "clean", "too long", f"{size} characters before cleaning > {length['max_characters']}")
      continue
    out[i] = clean.clean_record(record, params["clean"], tokenizer_control_strings(length["tokenizer"]))
    if not records.is_dropped(out[i]):
      live.append(i)
  per_message = [records.message_words(out[i]) for i in live]  # once, for the SFT rules and decontamination
  filtered = quality.filter_records([out[i] for i in live], params["filter"], token_counter(length["tokenizer"]), per_message)
  for i, record, seqs in zip(live, filtered, per_message, strict=True):
    out[i] = record if records.is_dropped(record) else decontaminate.decontaminate_record(record, index, seqs)
  return dedup.prepared(out, params["dedup"])


def format_record(record: records.Record, system_prompt: str, validation_fraction: float, salt: str) -> list[records.Record]:
  """Final chat schema (optional system turn, `task`: "chat" when no template set one), and the split:
  pretrain for text, else by hash. What the dedup stages needed comes off here."""
  record = dedup.unprepared(record)
  if records.is_dropped(record):
    return [record]
  if record["kind"] == "text":
    return [{**record, "split": "pretrain"}]
  if system_prompt and record["messages"][0]["role"] != "system":
    record = {**record, "messages": [{"role": "system", "content": system_prompt}, *record["messages"]]}
  key = record.get("group") or record["id"]
  split = "validation" if records.unit_interval(key, salt) < validation_fraction else "train"
  return [{**record, "task": record.get("task") or "chat", "split": split}]


def decoding(params: dict[str, Any]) -> Decoding:
  """The annotation's decoding settings, from the build config (recorded in the manifest)."""
  ann = params["annotate"]
  return Decoding(max_new_tokens=ann["max_new_tokens"], temperature=ann["temperature"], top_p=ann["top_p"], seed=ann["seed"])


def annotate_read(batch: list[records.Record], annotator: Any, params: dict[str, Any]) -> list[records.Record]:
  """fill, then label: records read without their answer get one from the annotator (or a counted drop)."""
  label = params["annotate"]["label"]
  batch = annotate.fill_responses(batch, _for(annotator, "fill"), decoding(params))
  return annotate.label_records(batch, _for(annotator, "label"), decoding(params), label["method"], label["min_confidence"])


def _for(annotator: Any, task: str) -> Any:
  """The annotator as a task sees it: one with a `for_task` (a cache keyed by task) gives its own view."""
  return annotator.for_task(task) if annotator is not None and hasattr(annotator, "for_task") else annotator


def run(runner: Runner, inputs: Sequence[tuple[str, str, str]], params: dict[str, Any], index: dict[str, Any], annotator: Any) -> Any:
  """All stages; returns the collection of formatted records, kept and dropped."""
  items = runner.create(list(inputs), "inputs")
  read = functools.partial(read_input, field_map=params["field_map"], max_record_bytes=params["read_max_record_bytes"], gold_field=params["gold_field"])
  items = runner.flat_map(items, read, "read")
  ann = params["annotate"]
  items = runner.map_batches(items, functools.partial(annotate_read, annotator=annotator, params=params), ann["batch_size"], "annotate: fill, label")
  process = functools.partial(process_records, params=params, index=index)
  items = runner.map_chunks(items, process, "clean, filter, decontaminate")

  si = ann["self_instruct"]
  if si["num_instructions"] > 0:
    new = runner.global_apply(
        items, lambda r: not records.is_dropped(r) and r["kind"] == "chat",
        functools.partial(annotate.self_instruct, annotator=_for(annotator, "self-instruct"), decoding=decoding(params), params=si),
        "annotate: self-instruct",
    )
    items = runner.concat([items, runner.map_chunks(new, process, "self-instruct: clean, filter, decontaminate")], "with self-instruct")

  if params["dedup"]["exact"]:
    items = runner.group_by(items, dedup.exact_key, dedup.keep_first, "dedup: exact")
  if params["dedup"]["near"]:
    items = runner.near_duplicates(items, params["dedup"], "dedup: near")
  judge = ann["judge"]
  if judge["enabled"]:
    if annotator is None:
      raise ValueError("annotate.judge.enabled needs annotate.model")
    fn = functools.partial(annotate.judge_batch, annotator=_for(annotator, "judge"), decoding=decoding(params), rubric=judge["rubric"], min_score=judge["min_score"])
    items = runner.map_batches(items, fn, ann["batch_size"], "annotate: judge")
  out = params["output"]
  fmt = functools.partial(format_record, system_prompt=params["format"]["system_prompt"], validation_fraction=out["validation_fraction"], salt=out["salt"])
  return runner.flat_map(items, fmt, "format")
