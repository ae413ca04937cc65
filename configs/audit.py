"""python launch.py --config=configs/audit.py --workdir=/tmp/my-data-audit --config.build_dir=/tmp/my-data

How good a finished data build is, measured on a reviewed sample of its records. The workdir is the audit's
own folder (never the build's): every file of the audit goes there. Three modes, one after the other:
--config.mode=sample (the default) writes review.csv and review.jsonl (the same rows: a stratified, seeded
sample of kept, dropped and annotated records) and instructions.md; fill the verdict columns of either file.
--config.mode=score --config.reviews="('/tmp/my-data-audit/review.csv',)" reads the filled files and writes
report.md and results.json (the precision of each drop reason, the kept records' error rate, the filters'
recall, annotation accuracy, agreement between reviewers, each with its 95% interval) and a "Data quality"
section in the build's report.md. --config.mode=judge --config.judge.model=<a training workdir or a Hugging
Face folder> fills the sample with a model's verdicts (review-machine.csv), scored like a person's. Every key and its default: sft/audit/config.py; what the figures mean: docs/audit.md.
"""

from sft.audit.config import audit_config


def get_config():
  c = audit_config()
  c.build_dir = ""  # the finished data build, on the command line; unset, the audit refuses to start
  return c
