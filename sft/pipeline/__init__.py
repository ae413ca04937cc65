"""The input pipeline: tokenizer, chat formatting with the response-only loss mask, grain packing."""

from sft.pipeline.dataset import count_truncated, empty_batch, eval_batches, pad_batch, train_dataset
from sft.pipeline.hf_tokenizer import HFTokenizer
from sft.pipeline.tokenizer import Tokenizer, get_or_train_tokenizer, train_tokenizer
from sft.pipeline.transforms import (
    TokenizeAndShift,
    render_prompt,
    shift_and_truncate,
    tokenize_chat,
    tokenize_record,
    tokenize_text,
    validate_messages,
)
