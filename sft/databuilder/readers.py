"""Read: files of any common format and SFT schema -> records, malformed ones rejected with a reason.

Formats (by extension): .jsonl/.ndjson, .json (a list, or an object holding one list), .csv/.tsv,
.parquet, .txt/.md (one document per file). Schemas, detected per record after `field_map` renames:

    messages            {"messages": [{"role", "content"}, ...]}          (OpenAI style)
    sharegpt            {"conversations": [{"from", "value"}, ...]}
    alpaca              {"instruction", "input"?, "output"}
    prompt_completion   {"prompt", "completion"}
    a template task     e.g. {"context", "question", "answer"} (see templates.py)
    text                {"text"}: a raw document (pretraining text)

A prompt without a response (empty "output" / "completion") becomes a chat ending in a user turn,
marked "needs_response" for the annotation stage; a classification record with its label set but no
label ({"text", "labels"}) one marked "needs_label". Nothing here raises on bad data: every malformed
line, row or file becomes a rejected record with the reason.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import pathlib
from typing import Any, BinaryIO, Iterator, TextIO

from sft.databuilder import records, templates

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".txt": "text", ".md": "text"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant", "system": "system"}
_STAGE = "read"


class Malformed(ValueError):
  """A record that cannot become a chat or a document: a short reason (how drops are counted) and
  the detail."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(reason)
    self.reason, self.detail = reason, detail


def _turns(messages: Any, role_key: str, content_key: str, role_names: dict[str, str]) -> list[dict[str, str]]:
  if not isinstance(messages, list) or not messages:
    raise Malformed("wrong type", "conversation is not a non-empty list")
  turns = []
  for turn in messages:
    if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
      raise Malformed("malformed turn", f"a turn needs '{role_key}' and '{content_key}'")
    role, content = turn[role_key], turn[content_key]
    if not isinstance(role, str) or role.lower() not in role_names:
      raise Malformed("unknown role", repr(role))
    if not isinstance(content, str):
      raise Malformed("wrong type", f"turn content is {type(content).__name__}")
    if not content.strip():
      raise Malformed("empty turn")
    turns.append({"role": role_names[role.lower()], "content": content})
  return turns


def _check_order(turns: list[dict[str, str]]) -> list[dict[str, str]]:
  """System first if at all, then user and assistant alternating, starting with user."""
  body = turns[1:] if turns[0]["role"] == "system" else turns
  if not body:
    raise Malformed("no user turn")
  for i, turn in enumerate(body):
    if turn["role"] != ("user" if i % 2 == 0 else "assistant"):
      raise Malformed("turns out of order", f"turn {i + 1} is '{turn['role']}'")
  return turns


def _text_field(raw: dict[str, Any], key: str, required: bool = True) -> str:
  value = raw.get(key)
  if value is None and not required:
    return ""
  if value is None:
    raise Malformed("missing field", key)
  if not isinstance(value, str):
    raise Malformed("wrong type", f"field '{key}' is {type(value).__name__}")
  return value


def _prompt_chat(record_id: str, source: str, prompt: str, response: str, system: str = "") -> records.Record:
  if not prompt.strip():
    raise Malformed("empty prompt")
  messages = [{"role": "system", "content": system}] if system.strip() else []
  messages.append({"role": "user", "content": prompt})
  if response.strip():
    return records.chat(record_id, source, [*messages, {"role": "assistant", "content": response}])
  return records.chat(record_id, source, messages, needs_response=True)


def to_record(raw: Any, record_id: str, source: str, field_map: dict[str, str] | None = None, gold_field: str = "") -> records.Record:
  """One parsed JSON value / row -> a record (raises Malformed with the reason). `gold_field` (after the
  renames): a field holding the right answer, kept as the record's "gold" and not part of its schema."""
  if not isinstance(raw, dict):
    raise Malformed("wrong type", f"record is a {type(raw).__name__}, not an object")
  if field_map:
    raw = {field_map.get(k, k): v for k, v in raw.items()}
  if gold_field and gold_field in raw:
    raw = dict(raw)
    gold = raw.pop(gold_field)
    record = _schema_record(raw, record_id, source)
    return record if gold is None else {**record, "gold": gold}
  return _schema_record(raw, record_id, source)


def _schema_record(raw: dict[str, Any], record_id: str, source: str) -> records.Record:
  keys = set(raw)  # with None values (a column absent from this row): the schema still shows
  if "messages" in keys:
    turns = _turns(raw["messages"], "role", "content", {r: r for r in records.ROLES})
  elif "conversations" in keys:
    turns = _turns(raw["conversations"], "from", "value", _SHAREGPT_ROLES)
  elif "instruction" in keys:
    instruction, extra = _text_field(raw, "instruction"), _text_field(raw, "input", False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return _prompt_chat(record_id, source, prompt, _text_field(raw, "output", False), _text_field(raw, "system", False))
  elif "prompt" in keys:
    return _prompt_chat(record_id, source, _text_field(raw, "prompt"), _text_field(raw, "completion", False))
  elif templates.is_unlabelled(raw):
    try:
      return templates.unlabelled_chat(raw, record_id, source)
    except templates.Invalid as err:
      raise Malformed(err.reason, str(err)) from None
  elif (task := templates.task_of(keys)) is not None:
    absent = [k for k in templates.TASKS[task][0] if raw[k] is None]
    if absent:
      raise Malformed("missing field", absent[0])
    try:
      return templates.to_chat(raw, task, record_id, source)
    except templates.Invalid as err:
      raise Malformed(err.reason, str(err)) from None
  elif "text" in keys and keys <= {"text", "id", "title", "url"}:
    body = _text_field(raw, "text")
    if not body.strip():
      raise Malformed("empty text")
    return records.text(record_id, source, body)
  else:
    raise Malformed("unknown schema", f"fields {sorted(keys)}; map them with field_map")
  turns = _check_order(turns)
  task = _task_field(raw)
  if turns[-1]["role"] == "user":
    return records.chat(record_id, source, turns, needs_response=True, **task)
  return records.chat(record_id, source, turns, **task)


def _task_field(raw: dict[str, Any]) -> dict[str, str]:
  """A chat's own "task" (how evaluation scores it): one of templates.TASK_NAMES, or absent."""
  task = raw.get("task")
  if task is None:
    return {}
  if task not in templates.TASK_NAMES:
    raise Malformed("unknown task", f"task {str(task)[:40]!r} is not one of {', '.join(templates.TASK_NAMES)}")
  return {"task": task}


# What one bad record can raise while it is parsed or checked: deep nesting (RecursionError), a
# 5000-digit number (ValueError from the int-string conversion limit), a float out of range, lone
# surrogates from a "\\ud800" escape (UnicodeError). Each becomes that record's rejection.
_RECORD_ERRORS = (RecursionError, ValueError, OverflowError, UnicodeError, TypeError)
DEFAULT_MAX_RECORD_BYTES = 16 * 2**20  # config: read_max_record_bytes
_RAW_CHARS = 2000  # of a rejected record's raw text, kept for the report


class _TooLarge(Exception):
  """A record over the size limit, seen without being parsed."""

  def __init__(self, size: int, prefix: str = ""):
    super().__init__(size)
    self.size, self.prefix = size, prefix


def _error_detail(err: BaseException) -> str:
  return f"{type(err).__name__}: {str(err)[:200]}"


def _parse(values: Iterator[tuple[str, Any, str]], source: str, field_map, gold_field: str = "") -> Iterator[records.Record]:
  """(id, parsed value or an Exception, raw text) -> records or rejections."""
  for record_id, value, raw_text in values:
    try:
      if isinstance(value, Malformed):
        raise value
      record = to_record(value, record_id, source, field_map, gold_field)
      json.dumps(record, ensure_ascii=False).encode("utf-8")  # lone surrogates would fail every later stage
      yield record
    except Malformed as err:
      yield records.rejected(record_id, source, _STAGE, err.reason, err.detail, raw_text)
    except UnicodeError as err:
      yield records.rejected(record_id, source, _STAGE, "invalid unicode", _error_detail(err), raw_text)
    except _RECORD_ERRORS as err:
      yield records.rejected(record_id, source, _STAGE, "unparsable value", _error_detail(err), raw_text)


def _loads(text: str) -> Any:
  """A JSON value, or a Malformed saying why not (never raises on bad data)."""
  try:
    return json.loads(text)
  except json.JSONDecodeError as err:
    return Malformed("bad json", err.msg)
  except RecursionError:
    return Malformed("bad json", "nested too deeply")
  except ValueError as err:  # e.g. an integer over sys.get_int_max_str_digits() digits
    return Malformed("bad json", str(err)[:200])


def _lines(f: BinaryIO, limit: int) -> Iterator[bytes | _TooLarge]:
  """Each line of a binary file (without its newline), or _TooLarge for one over `limit` bytes: at
  most `limit` + 1 bytes of a line are ever held, so one huge line cannot exhaust memory."""
  chunk = limit + 1 if limit else -1
  while True:
    line = f.readline(chunk)
    if not line:
      return
    if line.endswith(b"\n") or len(line) < chunk or not limit:  # a whole line, within the limit
      yield line[:-1] if line.endswith(b"\n") else line
      continue
    size, prefix = len(line), line[:_RAW_CHARS].decode("utf-8", "replace")
    while line and not line.endswith(b"\n"):  # skip the rest of the line, counting it
      line = f.readline(1 << 20)
      size += len(line)
    yield _TooLarge(size - line.endswith(b"\n"), prefix)


def _jsonl_values(f: BinaryIO, source: str, limit: int) -> Iterator[tuple[str, Any, str]]:
  for line_number, line in enumerate(_lines(f, limit), 1):
    record_id = f"{source}:{line_number}"
    if isinstance(line, _TooLarge):
      yield record_id, line, line.prefix
      continue
    if line_number == 1 and line.startswith(codecs.BOM_UTF8):  # utf-8-sig: the BOM is not part of record 1
      line = line[len(codecs.BOM_UTF8):]
    if not line.strip():
      continue
    try:
      text = line.decode("utf-8")
    except UnicodeDecodeError:
      yield record_id, Malformed("invalid utf-8"), line[:_RAW_CHARS].decode("utf-8", "replace")
      continue
    yield record_id, _loads(text), text


def _json_values(f: BinaryIO, source: str, limit: int) -> Iterator[tuple[str, Any, str]]:
  # One JSON document: parsed whole (the limit then applies to each item it holds).
  data = f.read()
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError:
    yield source, Malformed("invalid utf-8"), ""
    return
  if not text.strip():  # an empty file: no records, not bad JSON
    return
  value = _loads(text)
  if isinstance(value, Malformed):
    yield source, value, text[:_RAW_CHARS]
    return
  if isinstance(value, dict):
    lists = [v for v in value.values() if isinstance(v, list)]
    value = lists[0] if len(lists) == 1 else [value]
  if not isinstance(value, list):
    value = [value]
  for i, item in enumerate(value):
    record_id = f"{source}:{i}"
    try:
      raw = json.dumps(item, ensure_ascii=False)
    except _RECORD_ERRORS as err:
      yield record_id, Malformed("unparsable value", _error_detail(err)), ""
      continue
    size = len(raw.encode("utf-8", "surrogatepass"))
    yield (record_id, _TooLarge(size), raw[:_RAW_CHARS]) if limit and size > limit else (record_id, item, raw[:_RAW_CHARS])


class _CsvLines:
  """The lines csv.reader consumes, counted; raises _TooLarge once the record being read passes
  `limit` bytes. An iterator object, not a generator: it goes on after raising, and csv.reader starts
  afresh on the next line."""

  def __init__(self, f: TextIO, limit: int):
    self.f, self.limit, self.lines, self.record_bytes = f, limit, 0, 0

  def __iter__(self):
    return self

  def __next__(self) -> str:
    line = self.f.readline(self.limit + 1 if self.limit else -1)  # characters: at most 4x that in bytes
    if not line:
      raise StopIteration
    self.lines += 1
    self.record_bytes += len(line.encode("utf-8", "surrogateescape"))
    if not self.limit or self.record_bytes <= self.limit:
      return line
    prefix = line[:_RAW_CHARS]
    while line and not line.endswith(("\n", "\r")):  # skip the rest of the line, counting it
      line = self.f.readline(1 << 20)
      self.record_bytes += len(line.encode("utf-8", "surrogateescape"))
    raise _TooLarge(self.record_bytes, prefix)


def _csv_values(f: BinaryIO, source: str, delimiter: str, limit: int) -> Iterator[tuple[str, Any, str]]:
  # A bad byte spoils its row, not the file; a record is named by its first line, so no two share an id.
  lines = _CsvLines(io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline=""), limit)
  reader = csv.reader(lines, delimiter=delimiter)
  # csv.field_size_limit (128 KiB by default) is left alone: it is process-wide. A longer field is a
  # "csv parse error" rejection of its row.
  fields = None
  while True:
    record_id, lines.record_bytes = f"{source}:{lines.lines + 1}", 0
    try:
      row = next(reader)
    except StopIteration:
      return
    except (_TooLarge, csv.Error) as err:
      yield record_id, err if isinstance(err, _TooLarge) else Malformed("csv parse error", str(err)), getattr(err, "prefix", "")
      if fields is None:  # no header: the rows cannot be read
        return
      continue
    if not row:  # a blank line
      continue
    raw_text = delimiter.join(row)[:_RAW_CHARS]
    if fields is None:
      fields = row
      if any(_has_surrogates(v) for v in row):
        yield record_id, Malformed("invalid utf-8", "in the header"), raw_text
        return
    elif len(row) != len(fields):
      yield record_id, Malformed("wrong number of fields", f"header has {len(fields)}"), raw_text
    elif any(_has_surrogates(v) for v in row):
      yield record_id, Malformed("invalid utf-8"), raw_text
    else:
      yield record_id, {k: v for k, v in zip(fields, row) if v != ""}, raw_text


def _has_surrogates(value: str) -> bool:
  try:
    value.encode("utf-8")
    return False
  except UnicodeEncodeError:
    return True


def _parquet_values(path: pathlib.Path, source: str, limit: int) -> Iterator[tuple[str, Any, str]]:
  import pyarrow.parquet  # noqa: PLC0415 (only Parquet inputs need it)

  i = 0
  try:
    parquet = pyarrow.parquet.ParquetFile(path)
    for group in range(parquet.num_row_groups):
      rows = _parquet_batch_rows(parquet.metadata.row_group(group), limit)
      for batch in parquet.iter_batches(batch_size=rows, row_groups=[group]):  # a batch at a time in memory
        for row, size in _parquet_rows(batch, limit):
          record_id = f"{source}:{i}"
          i += 1
          if size is not None:
            yield record_id, _TooLarge(size), ""
            continue
          raw = json.dumps(row, ensure_ascii=False, default=str)
          size = len(raw.encode("utf-8", "surrogatepass"))
          yield (record_id, _TooLarge(size), raw[:_RAW_CHARS]) if limit and size > limit else (record_id, row, raw[:_RAW_CHARS])
  except Exception as err:  # noqa: BLE001 (pyarrow raises several types for a corrupt file)
    # Rows read before the damage stay; the rest of the file is one rejection, named apart from them.
    yield f"{source}:{i}" if i else source, Malformed("unreadable parquet", _error_detail(err)), ""


_PARQUET_BATCH_ROWS = 256


def _parquet_batch_rows(group: Any, limit: int) -> int:
  """Rows per batch for one row group: as many as fit in `limit` at the group's mean row size (from the
  file's metadata, before any row is read), at most 256 and down to one, so that rows much larger than
  the limit are read one at a time."""
  if not limit or not group.num_rows:
    return _PARQUET_BATCH_ROWS
  per_row = -(-group.total_byte_size // group.num_rows)
  return max(1, min(_PARQUET_BATCH_ROWS, limit // max(1, per_row)))


def _parquet_rows(batch: Any, limit: int) -> Iterator[tuple[Any, int | None]]:
  """(row as Python values, None), or (None, its size in Arrow) for a row over `limit`: a row is sized in
  Arrow before it becomes Python objects, so an outsized one is never copied out of the batch."""
  if not limit or batch.nbytes <= limit:
    yield from ((row, None) for row in batch.to_pylist())
    return
  for j in range(batch.num_rows):
    row = batch.slice(j, 1)
    yield (None, row.nbytes) if row.nbytes > limit else (row.to_pylist()[0], None)


def _text_values(f: BinaryIO, path: pathlib.Path, source: str, limit: int) -> Iterator[tuple[str, Any, str]]:
  size = path.stat().st_size
  if limit and size > limit:
    yield source, _TooLarge(size), f.read(_RAW_CHARS).decode("utf-8", "replace")
    return
  data = f.read()
  try:
    body = data.decode("utf-8-sig")
  except UnicodeDecodeError:
    yield source, Malformed("invalid utf-8"), data[:_RAW_CHARS].decode("utf-8", "replace")
    return
  yield source, {"text": body} if body.strip() else Malformed("empty text"), body[:_RAW_CHARS]


def _values(path: pathlib.Path, kind: str, source: str, limit: int) -> Iterator[tuple[str, Any, str]]:
  if kind == "parquet":
    yield from _parquet_values(path, source, limit)
    return
  with path.open("rb") as f:
    if kind == "jsonl":
      yield from _jsonl_values(f, source, limit)
    elif kind == "json":
      yield from _json_values(f, source, limit)
    elif kind == "text":
      yield from _text_values(f, path, source, limit)
    else:
      yield from _csv_values(f, source, "\t" if kind == "tsv" else ",", limit)


def read_file(
    path: pathlib.Path, source: str, field_map: dict[str, str] | None = None, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    gold_field: str = "",
) -> Iterator[records.Record]:
  """Every record of one file (rejections included), ids `<source>:<line, row or index>`, unique within
  the file. Never raises on bad data: a bad record is a rejection, an unreadable file one more, and a
  file with no records at all one "no records" rejection, so every input has a row in the accounting.
  `max_record_bytes` (0: no limit) rejects a longer record, with its size, before parsing it."""
  if (broken := _broken_link(path)) is not None:
    yield records.rejected(source, source, _STAGE, "broken link", broken)
    return
  kind = FORMATS.get(path.suffix.lower())
  if kind is None:
    yield records.rejected(source, source, _STAGE, "unsupported file type", f"{path.suffix or 'no extension'}; expected one of {sorted(FORMATS)}")
    return
  ids = set()
  values = _sized(_values(path, kind, source, max_record_bytes), max_record_bytes)
  try:
    # A document has no fields to map.
    for record in _parse(values, source, None if kind == "text" else field_map, "" if kind == "text" else gold_field):
      ids.add(record["id"])
      yield record
  except (OSError, csv.Error, *_RECORD_ERRORS) as err:  # a file that vanished, a directory, a read error mid-file
    record_id = source if source not in ids else f"{source}:unreadable"
    ids.add(record_id)
    yield records.rejected(record_id, source, _STAGE, "unreadable file", _error_detail(err))
  if not ids:
    yield records.rejected(source, source, _STAGE, "no records", "the file holds no record")


def _broken_link(path: pathlib.Path) -> str | None:
  """"-> target: why" for a link that leads to no file (dangling, or a loop of links), else None."""
  try:
    path.stat()
    return None
  except OSError as err:
    if not path.is_symlink():
      return None  # not a link: read_file reports the file's own error
    return f"-> {os.readlink(path)}: {err.strerror}"


def _sized(values: Iterator[tuple[str, Any, str]], limit: int) -> Iterator[tuple[str, Any, str]]:
  """Oversized values become Malformed here, so _parse turns them into rejections with their size."""
  for record_id, value, raw in values:
    if isinstance(value, _TooLarge):
      value = Malformed("record too large", f"{value.size} bytes; read_max_record_bytes is {limit}")
    yield record_id, value, raw
