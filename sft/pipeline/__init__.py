"""The input pipeline: tokenizers (the chat protocol, SentencePiece, Hugging Face), chat formatting
with the response-only loss mask, grain packing and batching.

The grain parts (`dataset`, `transforms`) load on first use: the data builder's worker processes
import the tokenizers and the chat protocol, and should not pay for grain and JAX.
"""

from sft.pipeline.chat import KNOWN_CONTROL_STRINGS, ROLES, ChatTokenizer, validate_messages
from sft.pipeline.hf_tokenizer import HFTokenizer
from sft.pipeline.tokenizer import (
    Tokenizer,
    get_or_train_tokenizer,
    load_tokenizer,
    render_prompt,
    tokenize_chat,
    tokenize_text,
    train_tokenizer,
)

_GRAIN = {
    "SplitFit": "dataset",
    "split_fit": "dataset",
    "empty_batch": "dataset",
    "eval_batches": "dataset",
    "pad_batch": "dataset",
    "train_dataset": "dataset",
    "TokenizeAndShift": "transforms",
    "shift_and_truncate": "transforms",
    "tokenize_record": "transforms",
}


def __getattr__(name):
  if name in _GRAIN:
    if _GRAIN[name] == "dataset":
      from sft.pipeline import dataset as module  # noqa: PLC0415
    else:
      from sft.pipeline import transforms as module  # noqa: PLC0415
    return getattr(module, name)
  raise AttributeError(f"module 'sft.pipeline' has no attribute {name!r}")
