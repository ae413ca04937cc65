"""python launch.py --config=configs/build_mix.py --workdir=/tmp/sft-mix-data

The worked example of a data build, on the repository's own planted mix (experiments/sft_mix/raw: JSONL,
JSON, CSV, Parquet and text in the alpaca, sharegpt, messages, prompt/completion and template-task schemas,
with malformed, duplicate, low-quality and contaminated records planted) -> ArrayRecord + JSONL splits,
rejected.jsonl, report.md with plots, and manifest.json whose accounting adds up per source.

It decontaminates against the example's own benchmark (experiments/sft_mix/eval): for your own folder use
configs/build.py (--config.input_dir=/path/to/raw, and your evaluation sets in decontaminate.eval_files).
Train on the result with --config.data.source=dir --config.data.dir=/tmp/sft-mix-data. At scale:
--config.runner=beam (DirectRunner, or --config.beam_options='("--runner=DataflowRunner", ...)').
"""

import pathlib

from sft.databuilder import build_config

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "sft_mix"


def get_config():
  c = build_config()
  c.input_dir = str(EXAMPLE / "raw")
  c.decontaminate.eval_files = (str(EXAMPLE / "eval" / "benchmark.jsonl"),)
  c.output.validation_fraction = 0.1
  return c
