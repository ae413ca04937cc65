"""The whole build on folders of random files: it never raises, every source's accounting adds up,
and every record lands once, under a unique id, in a parseable output line."""

import collections
import json
import pathlib
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_readers import EXTENSIONS, csv_bytes, flat_rows, schema_records

from sft.databuilder import build_config, build_dataset

_lines = st.lists(st.binary(max_size=40) | schema_records.map(lambda v: json.dumps(v, ensure_ascii=False).encode()), max_size=6)
_file = st.one_of(
    st.tuples(st.sampled_from(EXTENSIONS[:-1]), st.binary(max_size=200)),
    st.tuples(st.just(".jsonl"), _lines.map(lambda ls: b"\n".join(line.replace(b"\n", b" ") for line in ls))),
    st.tuples(st.just(".json"), st.lists(schema_records, max_size=5).map(lambda rs: json.dumps(rs, ensure_ascii=False).encode())),
    st.tuples(st.sampled_from([".csv", ".tsv"]), flat_rows.map(lambda rows: csv_bytes(rows, ","))),
    st.tuples(st.sampled_from([".txt", ".md"]), st.text(max_size=200).map(lambda t: t.encode("utf-8"))),
    st.tuples(st.just(".xml"), st.just(b"<a/>")),
)


@pytest.mark.slow
# A whole data build per example (about a second): a few.
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(files=st.lists(_file, min_size=1, max_size=4), near=st.booleans())
def test_random_folders_build(files, near):
  with tempfile.TemporaryDirectory() as tmp:
    raw, out = pathlib.Path(tmp) / "raw", pathlib.Path(tmp) / "out"
    (raw / "sub").mkdir(parents=True)
    for i, (ext, data) in enumerate(files):
      (raw / ("sub" if i % 2 else "") / f"f{i}{ext}").write_bytes(data)
    config = build_config()
    config.input_dir = str(raw)
    config.filter.language.enabled = False
    config.dedup.near = near
    config.num_workers = 1
    manifest = build_dataset(config, out, progress=False)

    by_source = manifest["accounting"]["by_source"]
    assert set(by_source) == {i["source"] for i in manifest["inputs"]}, "every input has a row"
    for source, row in by_source.items():
      assert row["read"] == row["kept"] + row["dropped"] >= 1, source
    ids, per_source = [], collections.Counter()
    for path in sorted(out.glob("*.jsonl")):
      for line in path.read_text(encoding="utf-8").split("\n")[:-1]:  # JSON leaves U+2028 and U+0085 raw: not line breaks here
        record = json.loads(line)
        ids.append(record["id"])
        per_source[record["source"]] += 1
    assert len(ids) == len(set(ids)), [i for i, n in collections.Counter(ids).items() if n > 1]
    assert per_source == {s: row["read"] for s, row in by_source.items()}, "every record lands in exactly one file"


def test_a_linked_subfolder_is_read_and_accounted(tmp_path):
  chat = json.dumps({"prompt": "What is a linked folder?", "completion": "A folder reached through a symbolic link."})
  (tmp_path / "elsewhere").mkdir()
  (tmp_path / "elsewhere" / "more.jsonl").write_text("".join(chat.replace("?", f" {i}?") + "\n" for i in range(5)))
  raw = tmp_path / "raw"
  raw.mkdir()
  (raw / "own.jsonl").write_text(chat + "\n")
  (raw / "linked").symlink_to(tmp_path / "elsewhere")
  config = build_config()
  config.input_dir = str(raw)
  config.filter.language.enabled = False
  config.num_workers = 1
  manifest = build_dataset(config, tmp_path / "out", progress=False)
  assert [i["source"] for i in manifest["inputs"]] == ["linked/more.jsonl", "own.jsonl"]
  assert manifest["accounting"]["by_source"]["linked/more.jsonl"]["read"] == 5



def test_a_dangling_link_is_a_counted_row_not_a_failed_build(tmp_path):
  raw = tmp_path / "raw"
  raw.mkdir()
  (raw / "own.jsonl").write_text(json.dumps({"prompt": "What is a dangling link?", "completion": "A link to nothing."}) + "\n")
  (raw / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
  config = build_config()
  config.input_dir = str(raw)
  config.filter.language.enabled = False
  config.num_workers = 1
  manifest = build_dataset(config, tmp_path / "out", progress=False)
  gone = manifest["accounting"]["by_source"]["gone.jsonl"]
  assert gone["read"] == 1 and gone["dropped_by_reason"] == {"read: broken link": 1}, gone
  assert [i["sha256"] for i in manifest["inputs"] if i["source"] == "gone.jsonl"] == [None]
