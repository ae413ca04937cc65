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
marked "needs_response" for the annotation stage. Nothing here raises on bad data: every malformed
line, row or file becomes a rejected record with the reason.
"""

from __future__ import annotations

import csv
import io
import json
import pathlib
from typing import Any, Iterator

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


def to_record(raw: Any, record_id: str, source: str, field_map: dict[str, str] | None = None) -> records.Record:
  """One parsed JSON value / row -> a record (raises Malformed with the reason)."""
  if not isinstance(raw, dict):
    raise Malformed("wrong type", f"record is a {type(raw).__name__}, not an object")
  if field_map:
    raw = {field_map.get(k, k): v for k, v in raw.items()}
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
  elif (task := templates.task_of(keys)) is not None:
    absent = [k for k in templates.TASKS[task][0] if raw[k] is None]
    if absent:
      raise Malformed("missing field", absent[0])
    try:
      return templates.to_chat(raw, task, record_id, source)
    except ValueError as err:
      raise Malformed("wrong type", str(err)) from None
  elif "text" in keys and keys <= {"text", "id", "title", "url"}:
    body = _text_field(raw, "text")
    if not body.strip():
      raise Malformed("empty text")
    return records.text(record_id, source, body)
  else:
    raise Malformed("unknown schema", f"fields {sorted(keys)}; map them with field_map")
  turns = _check_order(turns)
  if turns[-1]["role"] == "user":
    return records.chat(record_id, source, turns, needs_response=True)
  return records.chat(record_id, source, turns)


def _parse(values: Iterator[tuple[str, Any, str]], source: str, field_map) -> Iterator[records.Record]:
  """(id, parsed value or an Exception, raw text) -> records or rejections."""
  for record_id, value, raw_text in values:
    try:
      if isinstance(value, Malformed):
        raise value
      yield to_record(value, record_id, source, field_map)
    except Malformed as err:
      yield records.rejected(record_id, source, _STAGE, err.reason, err.detail, raw_text)


def _jsonl_values(data: bytes, source: str) -> Iterator[tuple[str, Any, str]]:
  for line_number, line in enumerate(data.split(b"\n"), 1):
    if not line.strip():
      continue
    record_id = f"{source}:{line_number}"
    try:
      text = line.decode("utf-8")
    except UnicodeDecodeError:
      yield record_id, Malformed("invalid utf-8"), line.decode("utf-8", "replace")
      continue
    try:
      yield record_id, json.loads(text), text
    except json.JSONDecodeError as err:
      yield record_id, Malformed("bad json", err.msg), text


def _json_values(data: bytes, source: str) -> Iterator[tuple[str, Any, str]]:
  try:
    value = json.loads(data.decode("utf-8"))
  except UnicodeDecodeError:
    yield source, Malformed("invalid utf-8"), ""
    return
  except json.JSONDecodeError as err:
    yield source, Malformed("bad json", err.msg), data[:2000].decode("utf-8", "replace")
    return
  if isinstance(value, dict):
    lists = [v for v in value.values() if isinstance(v, list)]
    value = lists[0] if len(lists) == 1 else [value]
  if not isinstance(value, list):
    value = [value]
  for i, item in enumerate(value):
    yield f"{source}:{i}", item, json.dumps(item, ensure_ascii=False)[:2000]


def _csv_values(data: bytes, source: str, delimiter: str) -> Iterator[tuple[str, Any, str]]:
  text = data.decode("utf-8", "surrogateescape")  # a bad byte spoils its row, not the file
  lines = text.splitlines(keepends=True)
  reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
  fields = reader.fieldnames or []
  while True:
    try:
      row = next(reader)
    except StopIteration:
      return
    except csv.Error as err:
      yield f"{source}:{reader.line_num}", Malformed("csv parse error", str(err)), ""
      continue
    record_id = f"{source}:{reader.line_num}"
    raw_text = lines[reader.line_num - 1] if reader.line_num - 1 < len(lines) else ""
    if None in row or any(v is None for v in row.values()):
      yield record_id, Malformed("wrong number of fields", f"header has {len(fields)}"), raw_text
    elif any(_has_surrogates(v) for v in row.values()):
      yield record_id, Malformed("invalid utf-8"), raw_text.encode("utf-8", "replace").decode()
    else:
      yield record_id, {k: v for k, v in row.items() if v != ""}, raw_text


def _has_surrogates(value: str) -> bool:
  try:
    value.encode("utf-8")
    return False
  except UnicodeEncodeError:
    return True


def _parquet_values(path: pathlib.Path, source: str) -> Iterator[tuple[str, Any, str]]:
  import pyarrow.parquet  # noqa: PLC0415 (only Parquet inputs need it)

  try:
    rows = pyarrow.parquet.read_table(path).to_pylist()
  except Exception as err:  # noqa: BLE001 (pyarrow raises several types for a corrupt file)
    yield source, Malformed("unreadable parquet", f"{type(err).__name__}: {err}"), ""
    return
  for i, row in enumerate(rows):
    yield f"{source}:{i}", row, json.dumps(row, ensure_ascii=False, default=str)[:2000]


def read_file(path: pathlib.Path, source: str, field_map: dict[str, str] | None = None) -> Iterator[records.Record]:
  """Every record of one file (rejections included), ids `<source>:<line, row or index>`."""
  kind = FORMATS.get(path.suffix.lower())
  if kind is None:
    yield records.rejected(source, source, _STAGE, "unsupported file type", f"{path.suffix or 'no extension'}; expected one of {sorted(FORMATS)}")
    return
  if kind == "parquet":
    yield from _parse(_parquet_values(path, source), source, field_map)
    return
  data = path.read_bytes()
  if kind == "text":
    try:
      body = data.decode("utf-8")
    except UnicodeDecodeError:
      yield records.rejected(source, source, _STAGE, "invalid utf-8", raw=data[:2000].decode("utf-8", "replace"))
      return
    if body.strip():
      yield records.text(source, source, body)
    else:
      yield records.rejected(source, source, _STAGE, "empty text")
    return
  values = {"jsonl": _jsonl_values, "json": _json_values}.get(kind)
  values = values(data, source) if values else _csv_values(data, source, "\t" if kind == "tsv" else ",")
  yield from _parse(values, source, field_map)


def list_files(folder: pathlib.Path) -> list[pathlib.Path]:
  """Every file under `folder` in a fixed order (hidden files skipped)."""
  if not folder.is_dir():
    raise FileNotFoundError(f"input folder {folder} does not exist")
  return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
