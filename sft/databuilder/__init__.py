"""The data builder: raw records -> an audited supervised fine-tuning dataset.

Stages, each a module of plain functions over records (see stages.py for the order):
readers (read) -> annotate / templates (label, generate) -> clean -> quality (filter)
-> decontaminate -> dedup (exact; near by MinHash LSH, minhash) -> write (ArrayRecord + JSONL)
-> report (report.md, manifest.json).
runner_local.py runs them over worker processes; runner_beam.py on Apache Beam; both call dedup.py.
"""

from sft.databuilder.build import build_dataset, check_outputs, ensure_built, load_manifest
from sft.databuilder.config import build_config
from sft.databuilder.stdlib_docs import ApiDoc, read_module, read_stdlib
from sft.databuilder.stdlib_tasks import api_records, pretrain_texts, strip_markup, summary_sentence
from sft.databuilder.write import split_files
