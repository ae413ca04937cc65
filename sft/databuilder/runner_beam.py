"""The stages on Apache Beam: DirectRunner on one machine, Dataflow, Flink or Spark for a cluster
(`beam_options=("--runner=DataflowRunner", ...)`). It writes the same files as the local runner.

Near-duplicate detection is distributed the way datatrove does it, from dedup.py's pieces: signatures
in batches on the workers, band buckets by GroupByKey, the verified pairs of each bucket, and only
those pairs (few) gathered in one place for union-find.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import shutil
from typing import Any, Callable

from sft.databuilder import dedup, records

try:
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
except ImportError as err:  # pragma: no cover
  raise ImportError("runner='beam' needs Apache Beam: pip install -r requirements-beam.txt") from err

_SIGNATURE_BATCH = 2000
_CHUNK = 500  # records per call of a chunk-wise stage (language identification runs once per chunk)


def _by_id(items) -> list:
  return sorted(items, key=lambda r: r["id"])


class BeamRunner:
  """Collections are PCollections of one pipeline; `results` runs it and reads back what was asked."""

  def __init__(self, options: list[str], tmp_dir: pathlib.Path):
    self.pipeline = beam.Pipeline(options=PipelineOptions(options or ["--runner=DirectRunner"]))
    self.tmp_dir = pathlib.Path(tmp_dir)
    self._labels = itertools.count()

  def _label(self, name: str) -> str:
    return f"{next(self._labels):02d} {name}"

  def create(self, items: list, name: str):
    return self.pipeline | self._label(name) >> beam.Create(items)

  def flat_map(self, coll, fn: Callable, name: str):
    return coll | self._label(name) >> beam.FlatMap(fn)

  def map_chunks(self, coll, fn: Callable, name: str):
    return (
        coll
        | self._label(f"{name}: batch") >> beam.BatchElements(min_batch_size=1, max_batch_size=_CHUNK)
        | self._label(name) >> beam.FlatMap(fn)
    )

  def map_batches(self, coll, fn: Callable, batch_size: int, name: str):
    return (
        coll
        | self._label(f"{name}: batch") >> beam.BatchElements(min_batch_size=batch_size, max_batch_size=batch_size)
        | self._label(name) >> beam.FlatMap(fn)
    )

  def group_by(self, coll, key_fn: Callable, fn: Callable, name: str):
    keyed = coll | self._label(f"{name}: key") >> beam.Map(lambda x: (key_fn(x), x))
    passing = keyed | self._label(f"{name}: unkeyed") >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] is None else [])
    grouped = (
        keyed
        | self._label(f"{name}: keyed") >> beam.Filter(lambda kv: kv[0] is not None)
        | self._label(f"{name}: group") >> beam.GroupByKey()
        | self._label(name) >> beam.FlatMap(lambda kv: fn(kv[0], _by_id(kv[1])))
    )
    return (passing, grouped) | self._label(f"{name}: merge") >> beam.Flatten()

  def global_apply(self, coll, select: Callable, fn: Callable, name: str):
    return (
        coll
        | self._label(f"{name}: select") >> beam.Filter(select)
        | self._label(f"{name}: gather") >> beam.combiners.ToList()
        | self._label(name) >> beam.FlatMap(lambda items: fn(_by_id(items)))
    )

  def near_duplicates(self, coll, params: dict[str, Any], name: str):
    live = coll | self._label(f"{name}: live") >> beam.Filter(lambda r: not records.is_dropped(r))
    pairs = (
        live
        | self._label(f"{name}: batch") >> beam.BatchElements(min_batch_size=1, max_batch_size=_SIGNATURE_BATCH)
        | self._label(f"{name}: signatures") >> beam.FlatMap(dedup.signatures_of, params=params)
        | self._label(f"{name}: bands") >> beam.FlatMap(dedup.band_keys, bands=params["bands"], rows=params["rows"])
        | self._label(f"{name}: buckets") >> beam.GroupByKey()
        | self._label(f"{name}: pairs") >> beam.FlatMap(dedup.verified_bucket_pairs, threshold=params["threshold"])
        | self._label(f"{name}: distinct") >> beam.Distinct()
    )
    drops = (
        pairs
        | self._label(f"{name}: gather") >> beam.combiners.ToList()
        | self._label(f"{name}: clusters") >> beam.Map(dedup.drops_from_pairs)
    )
    return coll | self._label(name) >> beam.Map(dedup.mark_near_duplicate, drops=beam.pvalue.AsSingleton(drops))

  def start_workers(self, warm: Callable | None = None) -> None:
    """Beam starts and warms its own workers."""

  def close(self) -> None:
    """Nothing to stop: `results` ran the pipeline to its end."""

  def concat(self, colls: list, name: str):
    return tuple(colls) | self._label(name) >> beam.Flatten()

  def results(self, *colls) -> tuple[list, ...]:
    """Runs the pipeline; the collections' contents, read back from files it wrote."""
    shutil.rmtree(self.tmp_dir, ignore_errors=True)
    prefixes = []
    for i, coll in enumerate(colls):
      prefix = self.tmp_dir / f"result{i}"
      _ = coll | self._label(f"result {i}") >> beam.Map(json.dumps) | self._label(f"write result {i}") >> beam.io.WriteToText(str(prefix))
      prefixes.append(prefix)
    self.pipeline.run().wait_until_finish()
    out = []
    for prefix in prefixes:
      lines = [line for path in sorted(self.tmp_dir.glob(f"{prefix.name}-*")) for line in path.read_text(encoding="utf-8").splitlines()]
      out.append([json.loads(line) for line in lines])
    shutil.rmtree(self.tmp_dir, ignore_errors=True)
    return tuple(out)
