"""python launch.py --config=configs/build.py --workdir=/tmp/my-data --config.input_dir=/path/to/raw

A data build of your own folder of raw files: every file under input_dir (JSONL, JSON, CSV/TSV, Parquet or
text; alpaca, sharegpt, OpenAI messages, prompt/completion, or `field_map` for other field names) is read,
cleaned, filtered and deduplicated into train and validation splits (ArrayRecord and JSONL), rejected.jsonl,
report.md with plots, and manifest.json whose accounting adds up per source. Every key and its default:
sft/databuilder/config.py. Without input_dir the build stops before any work, naming the key.

Nothing is decontaminated until you name your evaluation sets, in any format the readers take:
--config.decontaminate.eval_files="('/path/to/eval.jsonl',)". Train on the result with
--config.data.source=dir --config.data.dir=/tmp/my-data. configs/build_mix.py is the worked example.
"""

from sft.databuilder import build_config


def get_config():
  c = build_config()
  c.input_dir = ""  # your folder of raw files, on the command line; unset, the build refuses to start
  return c
