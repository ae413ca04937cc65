"""The data build on real text: the docstrings of the Python packages installed here, up to 200,000 records.

    python benchmarks/build_real.py [--num_records 200000] [--num_workers 0] [--corpus DIR]

build_100k.py's records are short, clean and made from one word list; these are what a builder meets:
reST and Markdown markup, code, tables, doctests, long and one-line texts, and true duplicates (vendored
copies, inherited docstrings). Every function, class and module docstring under the interpreter's
site-packages, then its standard library, is read with `ast`, files in sorted order, so one machine gives the same corpus every time
(another machine's packages give another: compare commits on one machine, in one run). Four in five
become instruction/answer records ("What does `name` in `path` do?" -> the docstring), one in five a
document; 200 of the answers are the evaluation set, so decontamination finds real overlaps.

The corpus is written to --corpus (a temporary folder by default; an existing one is reused as it is) and
built with the default config. Prints the same lines as build_100k.py, with the time per record.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import pathlib
import sys
import sysconfig
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from build_100k import time_build  # noqa: E402

_SHARD = 50_000  # records per raw file


def docstrings(root: pathlib.Path):
  """(where, name, docstring) of every module, class and function under `root`, files in sorted order."""
  for path in sorted(root.rglob("*.py")):
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old sources
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError, RecursionError):
      continue
    where = path.relative_to(root).as_posix()
    for node in ast.walk(tree):
      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node, clean=True)
        if doc and doc.strip():
          yield where, getattr(node, "name", where), doc


def write_corpus(folder: pathlib.Path, num_records: int) -> tuple[pathlib.Path, pathlib.Path]:
  """The raw folder (alpaca JSONL and document JSONL shards) and the evaluation file; returns them."""
  raw, eval_file = folder / "raw", folder / "eval.jsonl"
  if raw.is_dir() and eval_file.is_file():
    return raw, eval_file
  raw.mkdir(parents=True, exist_ok=True)
  paths = sysconfig.get_paths()
  roots = dict.fromkeys(pathlib.Path(paths[key]) for key in ("purelib", "platlib", "stdlib"))
  found = (item for root in roots for item in docstrings(root))
  chats, documents, evals = [], [], []
  for k, (where, name, doc) in enumerate(found):
    if k >= num_records:
      break
    if k % 5 == 4:
      documents.append({"text": doc})
    else:
      chats.append({"instruction": f"What does `{name}` in `{where}` do?", "input": "", "output": doc})
      if k % 1000 == 0 and len(evals) < 200:
        evals.append({"question": chats[-1]["instruction"], "answer": doc})
  for kind, rows in (("chats", chats), ("documents", documents)):
    for i in range(0, len(rows), _SHARD):
      lines = (json.dumps(r, ensure_ascii=False) for r in rows[i:i + _SHARD])
      (raw / f"{kind}-{i // _SHARD:03d}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  eval_file.write_text("\n".join(json.dumps(e, ensure_ascii=False) for e in evals) + "\n", encoding="utf-8")
  return raw, eval_file


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_records", type=int, default=200_000)
  parser.add_argument("--num_workers", type=int, default=0, help="0: one per CPU")
  parser.add_argument("--corpus", default="", help="folder for the corpus (kept); default: a temporary one")
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)

  with tempfile.TemporaryDirectory() as tmp:
    corpus = pathlib.Path(args.corpus or tmp)
    raw, eval_file = write_corpus(corpus, args.num_records)
    print(f"corpus: {sum(1 for p in raw.iterdir() for _ in p.open(encoding='utf-8'))} records in {raw}")
    time_build(raw, eval_file, args.num_workers, pathlib.Path(tmp))


if __name__ == "__main__":
  main()
