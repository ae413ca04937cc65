"""The input pipeline: tokenizers (the chat protocol, SentencePiece, Hugging Face), chat formatting
with the response-only loss mask, grain packing and batching."""

from sft.pipeline.chat import ROLES, ChatTokenizer, validate_messages
from sft.pipeline.dataset import count_truncated, empty_batch, eval_batches, pad_batch, train_dataset
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
from sft.pipeline.transforms import TokenizeAndShift, shift_and_truncate, tokenize_record
