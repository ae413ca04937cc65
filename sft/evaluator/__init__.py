"""The evaluator: held-out loss and perplexity, greedy generation, text metrics and their intervals (stats)."""

from sft.evaluator.evaluate import EvalResult, Evaluator, Sample, intervals_of
from sft.evaluator.generate import generate, make_generate, make_greedy_generate, pad_prompts, strip_generation
from sft.evaluator.metrics import (
    bleu,
    chrf,
    classification_report,
    exact_match,
    mean_token_f1,
    normalize,
    normalize_answer,
    perplexity,
    rouge,
    token_f1,
)
from sft.evaluator.report import write_report
from sft.evaluator.sampling import Sampler
from sft.evaluator.tasks import TASKS
