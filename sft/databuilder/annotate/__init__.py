"""Annotate with a model: the data builder's third step, each task a module of its own.

    fill           records that lack their response get the annotator's answer
    label          records with a text and a label set but no label get one label from the set
    self_instruct  new instructions (and their answers) written from kept seed tasks
    judge          every kept chat gets a 1-5 score against a rubric; low scores are dropped

All of them talk to an annotator (`sft.annotator`: a training workdir, a Hugging Face folder, or any
object with its interface) through chats the annotator renders with its own chat template. Every
failure is a counted rejection with its reason (empty, "truncated" at max_new_tokens, unparseable, a
label outside the set, too similar to a seed); an annotator that returns fewer answers than it was
asked is an error, never a silent skip. What a model writes goes through the same cleaning, filters
and deduplication as what was read.
"""

from sft.databuilder.annotate.common import JUDGE_STAGE, STAGE, chat_of, guard_problem
from sft.databuilder.annotate.fill import fill_responses
from sft.databuilder.annotate.judge import DEFAULT_RUBRIC, judge_batch, parse_score
from sft.databuilder.annotate.label import label_records, parse_label
from sft.databuilder.annotate.self_instruct import (
    SELF_INSTRUCT_SOURCE,
    parse_instruction,
    rouge_l,
    self_instruct,
    self_instruct_prompts,
)

__all__ = [
    "DEFAULT_RUBRIC", "JUDGE_STAGE", "SELF_INSTRUCT_SOURCE", "STAGE", "chat_of", "fill_responses", "guard_problem",
    "judge_batch", "label_records", "parse_instruction", "parse_label", "parse_score", "rouge_l", "self_instruct",
    "self_instruct_prompts",
]
