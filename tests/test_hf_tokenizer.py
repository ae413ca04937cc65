"""HFTokenizer: chat templates rendered with jinja2, assistant mask found from the template itself."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from sft.pipeline import tokenize_record
from sft.pipeline.hf_tokenizer import HFTokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What does json.dumps do?"},
    {"role": "assistant", "content": "Serialize obj to a JSON formatted str."},
    {"role": "user", "content": "And loads?"},
    {"role": "assistant", "content": "Deserialize a str."},
]


def make_folder(path, template, **config):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([m["content"] for m in CHAT] * 10 + ["system user assistant"] * 10, trainer)
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, **config}))
  return path


def learned_text(tok, messages):
  """The rendered characters covered by the tokens the mask marks."""
  text, _ = tok.assistant_spans(messages)
  ids, offsets = tok._encode_with_offsets(text)
  _, mask = tok.tokenize_chat(messages)
  return "".join(text[b:e] for (b, e), m in zip(offsets, mask) if m)


def test_chatml_mask_covers_exactly_the_assistant_turns(tmp_path):
  tok = HFTokenizer(make_folder(tmp_path, CHATML, eos_token="<|im_end|>"))
  assert learned_text(tok, CHAT) == "Serialize obj to a JSON formatted str.<|im_end|>\nDeserialize a str.<|im_end|>\n"
  tokens, mask = tok.tokenize_chat(CHAT)
  assert tokens.shape == mask.shape and tokens.dtype == np.int32
  prompt, reference = tok.render_prompt(CHAT[:3])
  assert tok.decode(prompt).endswith("assistant\n") and reference == CHAT[2]["content"]
  assert list(tokens[: len(prompt)]) == prompt  # the prompt is the chat's own prefix
  assert not mask[: len(prompt)].any() and mask[len(prompt)]  # and the answer starts right after it
  assert tok.stop_ids == (tok.token_id("<|im_end|>"),)


def test_llama3_style_template_with_bos(tmp_path):
  tok = HFTokenizer(make_folder(tmp_path, LLAMA3, bos_token="<|begin_of_text|>", eos_token={"content": "<|eot_id|>"}))
  assert learned_text(tok, CHAT[:3]) == "Serialize obj to a JSON formatted str.<|eot_id|>"
  tokens, _ = tok.tokenize_chat(CHAT[:3])
  assert tokens[0] == tok.bos_id  # written once, by the template
  assert list(tokens).count(tok.bos_id) == 1
  text_tokens, text_mask = tok.tokenize_text("plain text")
  assert text_tokens[0] == tok.bos_id and text_tokens[-1] == tok.eos_id and text_mask.all()


def test_the_pipeline_uses_the_template(tmp_path):
  tok = HFTokenizer(make_folder(tmp_path, CHATML, eos_token="<|im_end|>"))
  tokens, mask = tokenize_record({"messages": CHAT}, tok)
  np.testing.assert_array_equal((tokens, mask), tok.tokenize_chat(CHAT))


def test_templates_that_do_not_grow_by_prefix_are_refused(tmp_path):
  reversed_template = "{% for message in messages | reverse %}{{ message['content'] }}|{% endfor %}"
  tok = HFTokenizer(make_folder(tmp_path, reversed_template))
  with pytest.raises(ValueError, match="growing prefix"):
    tok.tokenize_chat(CHAT)


def test_missing_template_and_tokenizer_are_clear_errors(tmp_path):
  folder = make_folder(tmp_path / "a", CHATML)
  (folder / "tokenizer_config.json").write_text("{}")
  with pytest.raises(ValueError, match="no chat template"):
    HFTokenizer(folder)
  with pytest.raises(FileNotFoundError, match="tokenizer.json nor tokenizer.model"):
    HFTokenizer(tmp_path / "empty")


def test_matches_transformers_apply_chat_template(tmp_path):
  transformers = pytest.importorskip("transformers")
  folder = make_folder(tmp_path, CHATML, eos_token="<|im_end|>")
  reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), chat_template=CHATML)
  ours, _ = HFTokenizer(folder).tokenize_chat(CHAT)
  theirs = reference.apply_chat_template(CHAT, tokenize=True)
  theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
  assert list(ours) == list(theirs)


def test_sentencepiece_tokenizer_model_with_a_template(tmp_path):
  import io

  import sentencepiece as spm

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([m["content"] for m in CHAT] * 20), model_writer=model, vocab_size=120, minloglevel=2,
      user_defined_symbols=["[INST]", "[/INST]"], hard_vocab_limit=False,
  )
  (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
  template = (
      "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
      "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
  )
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"}))
  tok = HFTokenizer(tmp_path)
  chat = [m for m in CHAT if m["role"] != "system"][:2]
  text, spans = tok.assistant_spans(chat)
  assert text[spans[0][0] : spans[0][1]] == " " + chat[1]["content"] + "</s>"
  tokens, mask = tok.tokenize_chat(chat)
  learned = tok.decode([t for t, m in zip(tokens, mask) if m])
  assert learned.strip() == chat[1]["content"]
  assert mask.sum() > 0 and not mask[: len(tok.render_prompt(chat)[0]) - 1].any()


def test_load_tokenizer_opens_a_hugging_face_folder_that_speaks_the_chat_protocol(tmp_path):
  from sft.pipeline import ChatTokenizer, load_tokenizer

  tok = load_tokenizer(make_folder(tmp_path, CHATML, eos_token="<|im_end|>"))
  assert isinstance(tok, HFTokenizer) and isinstance(tok, ChatTokenizer)
  tokens, mask = tok.tokenize_chat(CHAT)
  assert len(tokens) == len(mask) and mask.any()
