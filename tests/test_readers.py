"""Readers never fail a build: property tests over random bytes, nesting, schemas and Unicode in every
format, and worked examples of each failure that once aborted a build or broke the accounting."""

import codecs
import csv
import io
import json
import pathlib
import re
import tempfile
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft.databuilder import inputs, readers, records
from sft.errors import ConfigError

EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".md", ".parquet")
FIELDS = (
    "messages", "conversations", "role", "content", "from", "value", "instruction", "input", "output", "system",
    "prompt", "completion", "text", "id", "title", "question", "answer", "context", "label", "labels", "summary",
    "document", "user", "assistant", "human", "gpt",
)
# Each example writes files and reads them back through the builder (5-15 ms).
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Any Unicode a file can hold (no lone surrogates: those cannot be written as UTF-8), some of it schema words.
texts = st.one_of(st.text(max_size=30), st.sampled_from(FIELDS))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=5),
    max_leaves=20,
)
# Records that look like the schemas (right keys, random values and roles) so deep paths are reached.
turns = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot", ""]), "content": texts | json_values}), max_size=4)
schema_records = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), texts | json_values, max_size=5),
    st.fixed_dictionaries({"messages": turns}),
    st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "x"]), "value": texts}), max_size=4)}),
    st.fixed_dictionaries({"prompt": texts}, optional={"completion": texts | json_values}),
    st.fixed_dictionaries({"instruction": texts, "output": texts}, optional={"input": texts, "system": texts | json_values}),
    st.fixed_dictionaries({"question": texts, "answer": texts}, optional={"context": texts}),
    json_values,
)
flat_rows = st.lists(st.dictionaries(st.sampled_from(FIELDS), texts, min_size=1, max_size=4), min_size=1, max_size=6)


def read(folder: pathlib.Path, name: str, data: bytes, **kwargs) -> list[records.Record]:
  path = folder / name
  path.write_bytes(data)
  out = list(readers.read_file(path, name, **kwargs))
  check(out, name)
  return out


def check(out: list[records.Record], source: str) -> None:
  """Every record is a valid chat or document, or a counted read rejection; ids unique; one at least."""
  assert out, "every file must have a row in the accounting"
  ids = [r["id"] for r in out]
  assert len(set(ids)) == len(ids), f"repeated ids: {ids}"
  for r in out:
    assert r["source"] == source and r["id"].startswith(source)
    json.dumps(r, ensure_ascii=False).encode("utf-8")  # writable as rejected.jsonl / the splits
    if records.is_dropped(r):
      assert r["kind"] == "raw" and r["dropped"]["stage"] == "read" and r["dropped"]["reason"]
    elif r["kind"] == "chat":
      assert r["messages"] and all(m["role"] in records.ROLES and isinstance(m["content"], str) for m in r["messages"])
      assert r["messages"][-1]["role"] == "assistant" or r.get("needs_response")
    else:
      assert r["kind"] == "text" and isinstance(r["text"], str) and r["text"].strip()


def nonempty_lines(data: bytes) -> int:
  lines = data.split(b"\n")
  lines[0] = lines[0].removeprefix(codecs.BOM_UTF8)
  return sum(bool(line.strip()) for line in lines)


def csv_bytes(rows: list[dict], delimiter: str) -> bytes:
  header = sorted({k for row in rows for k in row})
  buf = io.StringIO()
  writer = csv.DictWriter(buf, header, delimiter=delimiter)
  writer.writeheader()
  writer.writerows(rows)
  return buf.getvalue().encode("utf-8")


@PROPERTY
@given(data=st.binary(max_size=400), ext=st.sampled_from(EXTENSIONS))
def test_random_bytes_in_any_format(data, ext):
  with tempfile.TemporaryDirectory() as tmp:
    out = read(pathlib.Path(tmp), "f" + ext, data)
  if ext == ".jsonl":
    assert len(out) == max(1, nonempty_lines(data))


@PROPERTY
@given(lines=st.lists(st.binary(max_size=60) | schema_records.map(lambda v: json.dumps(v, ensure_ascii=False).encode()), max_size=8),
       bom=st.booleans(), crlf=st.booleans())
def test_jsonl_reads_one_record_per_nonempty_line(lines, bom, crlf):
  lines = [line.replace(b"\n", b" ") for line in lines]
  data = (codecs.BOM_UTF8 if bom else b"") + (b"\r\n" if crlf else b"\n").join(lines)
  with tempfile.TemporaryDirectory() as tmp:
    out = read(pathlib.Path(tmp), "r.jsonl", data)
  assert len(out) == max(1, nonempty_lines(data))
  if lines and lines[0].startswith(b"{") and out[0]["id"] == "r.jsonl:1":
    assert out[0].get("dropped", {}).get("reason") != "bad json" or not _parses(lines[0]), "a BOM spoiled record 1"


def _parses(line: bytes) -> bool:
  try:
    json.loads(line)
    return True
  except ValueError:
    return False


@PROPERTY
@given(depth=st.integers(0, 3000), digits=st.integers(1, 6000), wrap=st.sampled_from(["[%s]", '{"prompt": %s}', '{"messages": [%s]}']))
def test_deep_nesting_and_huge_numbers_are_one_rejection_each(depth, digits, wrap):
  nested = "[" * depth + "1" + "]" * depth
  number = "9" * digits
  lines = [wrap % nested, wrap % number, '{"prompt": "p", "completion": "c"}']
  with tempfile.TemporaryDirectory() as tmp:
    folder = pathlib.Path(tmp)
    out = read(folder, "d.jsonl", "\n".join(lines).encode())
    assert len(out) == 3 and not records.is_dropped(out[2])
    read(folder, "d.json", f"[{lines[0]}, {lines[1]}, {lines[2]}]".encode())


@PROPERTY
@given(rows=st.lists(schema_records, max_size=6), field_map=st.dictionaries(st.sampled_from(FIELDS), st.sampled_from(FIELDS), max_size=2))
def test_random_schemas_as_jsonl_and_json(rows, field_map):
  with tempfile.TemporaryDirectory() as tmp:
    folder = pathlib.Path(tmp)
    out = read(folder, "s.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode(), field_map=field_map)
    assert len(out) == max(1, len(rows))
    read(folder, "s.json", json.dumps(rows, ensure_ascii=False).encode(), field_map=field_map)
    read(folder, "o.json", json.dumps({"data": rows}).encode(), field_map=field_map)


@PROPERTY
@given(rows=flat_rows, ext=st.sampled_from([".csv", ".tsv"]), bom=st.booleans())
def test_random_rows_as_csv_and_tsv(rows, ext, bom):
  data = csv_bytes(rows, "\t" if ext == ".tsv" else ",")
  with tempfile.TemporaryDirectory() as tmp:
    out = read(pathlib.Path(tmp), "t" + ext, (codecs.BOM_UTF8 if bom else b"") + data)
  assert len(out) == len(rows)  # one record per row; a BOM does not rename the first column
  assert not any(r["dropped"]["reason"] in ("wrong number of fields", "csv parse error") for r in out if records.is_dropped(r))


@PROPERTY
@given(rows=flat_rows)
def test_random_rows_as_parquet(rows):
  import pyarrow
  import pyarrow.parquet

  columns = sorted({k for row in rows for k in row})
  table = pyarrow.table({c: [row.get(c) for row in rows] for c in columns})
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "p.parquet"
    pyarrow.parquet.write_table(table, path)
    out = list(readers.read_file(path, "p.parquet"))
  check(out, "p.parquet")
  assert len(out) == len(rows)


@PROPERTY
@given(body=st.text(max_size=200), ext=st.sampled_from([".txt", ".md"]), bom=st.booleans())
def test_random_unicode_documents(body, ext, bom):
  with tempfile.TemporaryDirectory() as tmp:
    (record,) = read(pathlib.Path(tmp), "n" + ext, (codecs.BOM_UTF8 if bom else b"") + body.encode("utf-8"))
  assert record["text"] == body if body.strip() else record["dropped"]["reason"] == "empty text"


def test_bom_does_not_eat_the_first_record(tmp_path):
  line = json.dumps({"prompt": "p", "completion": "c"}).encode()
  out = read(tmp_path, "b.jsonl", codecs.BOM_UTF8 + line + b"\n" + line)
  assert [r["kind"] for r in out] == ["chat", "chat"]
  (doc,) = read(tmp_path, "b.txt", codecs.BOM_UTF8 + b"Prose.")
  assert doc["text"] == "Prose."
  rows = read(tmp_path, "b.csv", codecs.BOM_UTF8 + b"prompt,completion\np,c\n")
  assert rows[0]["messages"][0]["content"] == "p"
  assert read(tmp_path, "b.json", codecs.BOM_UTF8 + b"[" + line + b"]")[0]["kind"] == "chat"


def test_one_bad_record_is_one_rejection(tmp_path):
  good = '{"prompt": "p", "completion": "c"}'
  lines = ["[" * 100_000 + "]" * 100_000, '{"prompt": ' + "1" * 5000 + "}", '{"prompt": "\\ud800", "completion": "c"}', good]
  out = read(tmp_path, "x.jsonl", "\n".join(lines).encode())
  assert [r.get("dropped", {}).get("reason") for r in out] == ["bad json", "bad json", "invalid unicode", None]
  assert "nested too deeply" in out[0]["dropped"]["detail"] and "4300" in out[1]["dropped"]["detail"]
  (whole,) = read(tmp_path, "x.json", ("[" * 100_000).encode())
  assert whole["dropped"]["reason"] == "bad json"


def test_empty_files_have_a_row(tmp_path):
  for name in ("e.jsonl", "e.json", "e.csv", "e.tsv", "h.csv", "l.json"):
    content = b"prompt,completion\n" if name == "h.csv" else b"[]" if name == "l.json" else b""
    (r,) = read(tmp_path, name, content)
    assert r["id"] == name and r["dropped"]["reason"] == "no records"
  (r,) = read(tmp_path, "e.txt", b"")
  assert r["dropped"]["reason"] == "empty text"
  (tmp_path / "dir.jsonl").mkdir()
  (r,) = list(readers.read_file(tmp_path / "dir.jsonl", "dir.jsonl"))
  assert r["dropped"]["reason"] == "unreadable file"


def test_csv_field_over_the_csv_module_limit_keeps_distinct_ids(tmp_path):
  big = "x" * (csv.field_size_limit() + 10)
  data = f'prompt,completion\np,c\n"{big}",c\nq,d\n"multi\nline",e\n'.encode()
  out = read(tmp_path, "c.csv", data)
  assert [r["id"] for r in out] == ["c.csv:2", "c.csv:3", "c.csv:4", "c.csv:5"]  # a record is named by its first line
  assert [r.get("dropped", {}).get("reason") for r in out] == [None, "csv parse error", None, None]
  assert "field larger than field limit" in out[1]["dropped"]["detail"]


def test_record_size_limit(tmp_path):
  good = json.dumps({"prompt": "p", "completion": "c"})
  out = read(tmp_path, "s.jsonl", ("\n".join([good, '{"prompt": "' + "y" * 500 + '"}', good])).encode(), max_record_bytes=100)
  assert [r.get("dropped", {}).get("reason") for r in out] == [None, "record too large", None]
  assert out[1]["dropped"]["detail"].startswith("514 bytes") and out[1]["raw"].startswith('{"prompt"')
  rows = read(tmp_path, "s.csv", f'prompt,completion\n"{"z" * 50}\n{"z" * 60}",c\np,c\n'.encode(), max_record_bytes=100)
  assert [(r["id"], r.get("dropped", {}).get("reason")) for r in rows] == [("s.csv:2", "record too large"), ("s.csv:4", None)]
  assert rows[0]["dropped"]["detail"].startswith("116 bytes")  # counted to the end of the line that passed the limit
  (doc,) = read(tmp_path, "s.txt", b"w " * 100, max_record_bytes=100)
  assert doc["dropped"]["detail"].startswith("200 bytes")
  items = read(tmp_path, "s.json", json.dumps([json.loads(good), {"prompt": "y" * 500}]).encode(), max_record_bytes=100)
  assert [r.get("dropped", {}).get("reason") for r in items] == [None, "record too large"]


def test_a_huge_line_is_not_held_in_memory(tmp_path):
  path = tmp_path / "h.jsonl"
  with path.open("wb") as f:
    f.write(b'{"prompt": "')
    for _ in range(40):
      f.write(b"a" * 2**20)
    f.write(b'"}\n{"prompt": "p", "completion": "c"}\n')
  tracemalloc.start()
  out = list(readers.read_file(path, "h.jsonl", max_record_bytes=2**20))
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert [r.get("dropped", {}).get("reason") for r in out] == ["record too large", None]
  assert out[0]["dropped"]["detail"].startswith(f"{40 * 2**20 + 14} bytes")
  assert peak < 8 * 2**20, f"peak {peak} bytes for a 40 MiB line"


@pytest.mark.parametrize("limit", [0, 1, 7, 64])
def test_limits_at_the_edges(tmp_path, limit):
  """Lines just under, at and over the limit: each read or rejected once, none merged or lost."""
  lines = [b"1" * n for n in range(0, 70)]
  out = read(tmp_path, "n.jsonl", b"\n".join(lines), max_record_bytes=limit)
  assert len(out) == 69
  assert all((r.get("dropped", {}).get("reason") == "record too large") == (limit and int(r["id"].split(":")[1]) - 1 > limit) for r in out)


def _parquet_peak(path: pathlib.Path, limit: int) -> tuple[list[records.Record], int]:
  """The records of a Parquet file and the peak memory of reading them: Arrow's (its own pool, which
  tracemalloc does not see) plus Python's."""
  import pyarrow

  pool, default = pyarrow.proxy_memory_pool(pyarrow.default_memory_pool()), pyarrow.default_memory_pool()
  pyarrow.set_memory_pool(pool)
  tracemalloc.start()
  try:
    out = list(readers.read_file(path, path.name, max_record_bytes=limit))
  finally:
    pyarrow.set_memory_pool(default)
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
  return out, pool.max_memory() + python_peak


def test_parquet_rows_over_the_limit_are_not_materialised(tmp_path):
  import pyarrow
  import pyarrow.parquet

  row, n = 8 * 2**20, 6  # one row group of six 8 MiB rows: a few hundred KiB on disk
  path = tmp_path / "big.parquet"
  pyarrow.parquet.write_table(pyarrow.table({"text": ["x" * row] * n + ["fine"], "id": [str(i) for i in range(n + 1)]}), path)
  assert path.stat().st_size < 2**20
  out, peak = _parquet_peak(path, 2**20)
  assert [r.get("dropped", {}).get("reason") for r in out] == ["record too large"] * n + [None]
  assert row <= int(out[0]["dropped"]["detail"].split()[0]) < row + 100 and out[-1]["text"] == "fine"
  # Rows are sized in Arrow, read one at a time, never turned into Python strings: about one row's worth.
  assert peak < 4 * row, f"peak {peak >> 20} MiB reading {n} rows of {row >> 20} MiB"


def test_parquet_small_rows_still_read_in_batches(tmp_path):
  import pyarrow
  import pyarrow.parquet

  path = tmp_path / "small.parquet"
  pyarrow.parquet.write_table(pyarrow.table({"prompt": [f"p{i}" for i in range(600)], "completion": ["c"] * 600}), path, row_group_size=250)
  out = read(tmp_path, "small.parquet", path.read_bytes(), max_record_bytes=100)
  assert [r["id"] for r in out] == [f"small.parquet:{i}" for i in range(600)] and not any(map(records.is_dropped, out))
  group = pyarrow.parquet.ParquetFile(path).metadata.row_group(0)
  assert readers._parquet_batch_rows(group, 0) == readers._parquet_batch_rows(group, 2**20) == 256
  assert readers._parquet_batch_rows(group, 1) == 1


def _tree(root: pathlib.Path, files: dict[str, str], links: dict[str, str]) -> None:
  for name, text in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)
  for name, target in links.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).symlink_to(target)


def _names(folder: pathlib.Path) -> list[str]:
  return [p.relative_to(folder).as_posix() for p in inputs.list_files(folder)]


def test_linked_files_and_folders_are_listed_once(tmp_path):
  chat = '{"prompt": "p", "completion": "c"}\n'
  _tree(tmp_path / "ext", {"a.jsonl": chat * 3, "deep/b.jsonl": chat}, {})
  raw = tmp_path / "raw"
  _tree(raw, {"top.jsonl": chat, "sub/own.jsonl": chat, ".hidden/x.jsonl": chat},
        {"linked": "../ext", "again": "../ext", "sub/alias.jsonl": "../top.jsonl", "gone.jsonl": "nowhere.jsonl",
         "z/file.jsonl": str(tmp_path / "ext" / "a.jsonl"), "z/own": "../sub", ".hid": "../ext"})
  # A linked folder is read under its first name; a file reached twice is listed once, at its own place in
  # the folder if it has one, else where first met (the real tree before linked folders); a dangling link is
  # listed, so that reading it is a counted rejection.
  assert _names(raw) == ["again/deep/b.jsonl", "gone.jsonl", "sub/own.jsonl", "top.jsonl", "z/file.jsonl"]
  (gone,) = list(readers.read_file(raw / "gone.jsonl", "gone.jsonl"))
  assert gone["dropped"]["reason"] == "broken link" and gone["dropped"]["detail"].startswith("-> nowhere.jsonl: No such file")
  (raw / "loop1.jsonl").symlink_to("loop2.jsonl")
  (raw / "loop2.jsonl").symlink_to("loop1.jsonl")
  (loop,) = list(readers.read_file(raw / "loop1.jsonl", "loop1.jsonl"))
  assert loop["dropped"] == {"stage": "read", "reason": "broken link", "detail": "-> loop2.jsonl: Too many levels of symbolic links"}


@pytest.mark.parametrize("target", ["..", ".", "../..", "ROOT"])
def test_a_folder_link_loop_is_refused_by_name(tmp_path, target):
  raw = tmp_path / "raw"
  _tree(raw, {"a.jsonl": "{}"}, {"sub/up": str(raw) if target == "ROOT" else target})
  with pytest.raises(ConfigError, match=re.escape(f"{raw / 'sub' / 'up'} -> ") + ".*a loop"):
    inputs.list_files(raw)


@settings(max_examples=30, deadline=None)  # a tree of folders and links on disk per example
@given(parents=st.lists(st.integers(0, 10), max_size=4),
       links=st.lists(st.tuples(st.integers(0, 4), st.sampled_from(["dir", "file", "ext", "missing"]), st.integers(0, 4)), max_size=5))
def test_random_trees_with_links(parents, links):
  """Every real file once at its own place, a linked outside folder once, dangling links listed, loops refused."""
  with tempfile.TemporaryDirectory() as tmp:
    root, ext = pathlib.Path(tmp) / "raw", pathlib.Path(tmp) / "ext"
    _tree(ext, {"e.jsonl": "{}"}, {})
    dirs = [root]
    for i, parent in enumerate(parents):
      dirs.append(dirs[parent % len(dirs)] / f"d{i}")
    for i, d in enumerate(dirs):
      _tree(d, {f"f{i}.jsonl": "{}"}, {})
    loop, dangling, to_ext = False, [], []
    for j, (at, kind, target) in enumerate(links):
      where, name = dirs[at % len(dirs)], f"l{j}"
      goal = {"dir": dirs[target % len(dirs)], "file": dirs[target % len(dirs)] / f"f{target % len(dirs)}.jsonl",
              "ext": ext, "missing": root / "missing"}[kind]
      (where / name).symlink_to(goal)
      loop |= kind == "dir" and (where == goal or where.is_relative_to(goal))
      dangling += [(where / name).relative_to(root).as_posix()] if kind == "missing" else []
      to_ext += [(where / name / "e.jsonl").relative_to(root).as_posix()] if kind == "ext" else []
    if loop:
      with pytest.raises(ConfigError, match="a loop"):
        inputs.list_files(root)
      return
    listed = _names(root)
    assert listed == sorted(listed) and len(set(listed)) == len(listed)
    real = [(d / f"f{i}.jsonl").relative_to(root).as_posix() for i, d in enumerate(dirs)]
    linked = [n for n in listed if n in to_ext]
    assert sorted(set(listed) - set(linked)) == sorted(real + dangling)
    assert len(linked) == (1 if to_ext else 0)
