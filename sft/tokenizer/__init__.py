"""Tokenizers: the chat protocol every tokenizer implements (`chat`), the built-in SentencePiece tokenizer
(`sentencepiece_tokenizer`, with `sentencepiece_proto` for its model file), and a Hugging Face folder's
tokenizer and chat template (`hf_tokenizer`, rendering in the sandbox of `hf_template`).

No JAX and no grain here: the data builder's worker processes import these.
"""

from sft.tokenizer.chat import KNOWN_CONTROL_STRINGS, ROLES, ChatTokenizer, TokenizerFailure, validate_messages
from sft.tokenizer.hf_tokenizer import HFTokenizer
from sft.tokenizer.sentencepiece_tokenizer import (
    Tokenizer,
    get_or_train_tokenizer,
    load_tokenizer,
    render_prompt,
    tokenize_chat,
    tokenize_text,
    train_tokenizer,
)

__all__ = [
    "KNOWN_CONTROL_STRINGS",
    "ROLES",
    "ChatTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "TokenizerFailure",
    "get_or_train_tokenizer",
    "load_tokenizer",
    "render_prompt",
    "tokenize_chat",
    "tokenize_text",
    "train_tokenizer",
    "validate_messages",
]
