"""The data builder: raw records -> supervised (chat) records, with an account of what was dropped."""

from sft.databuilder.build import build_stdlib_dataset, get_or_build_stdlib_dataset, read_jsonl
from sft.databuilder.stdlib_docs import ApiDoc, read_module, read_stdlib
from sft.databuilder.stdlib_tasks import api_records, pretrain_texts, split_of, strip_markup, summary_sentence
