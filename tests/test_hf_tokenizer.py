"""HFTokenizer: chat templates rendered with jinja2, assistant mask found from the template itself."""

import io
import json

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers, trainers

from sft.errors import ConfigError
from sft.pipeline import tokenize_record
from sft.tokenizer.hf_tokenizer import HFTokenizer

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


def make_folder(path, template, specials=SPECIALS, **config):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
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
  with pytest.raises(ConfigError, match="tokenizer.json nor tokenizer.model"):
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
  from sft.tokenizer import ChatTokenizer, load_tokenizer

  tok = load_tokenizer(make_folder(tmp_path, CHATML, eos_token="<|im_end|>"))
  assert isinstance(tok, HFTokenizer) and isinstance(tok, ChatTokenizer)
  tokens, mask = tok.tokenize_chat(CHAT)
  assert len(tokens) == len(mask) and mask.any()


# --- the end of turn: generation stops where the template ends an assistant message -------------------

# The families' own templates (from their tokenizer_config.json), where LLAMA3 and CHATML above are short.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# name: (template, tokenizer_config.json, special tokens (tokenizer.json) or user-defined symbols (tokenizer.model), end of turn)
FAMILIES = {
    "qwen": (CHATML, {"eos_token": "<|endoftext|>"}, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "llama3": (
        LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
        [*SPECIALS, "<|end_of_text|>"], "<|eot_id|>",
    ),
    "gemma": (GEMMA, {"bos_token": "<bos>", "eos_token": "<eos>"}, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    "mistral": (MISTRAL, {"bos_token": "<s>", "eos_token": "</s>"}, ["<s>", "</s>"], "</s>"),
    "llama2.model": (LLAMA2, {"bos_token": "<s>", "eos_token": "</s>"}, ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"], "</s>"),
    "chatml.model": (CHATML, {"bos_token": "<s>", "eos_token": "</s>"}, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
}  # fmt: skip


def make_sp_folder(path, template, symbols, **config):
  """A tokenizer.model folder (SentencePiece: <unk> <s> </s> are control pieces 0-2), like Llama 2's."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([m["content"] for m in CHAT] * 20), model_writer=model, vocab_size=300, minloglevel=2,
      user_defined_symbols=symbols, byte_fallback=True, normalization_rule_name="identity",
      remove_extra_whitespaces=False, hard_vocab_limit=False,
  )  # fmt: skip
  path.mkdir(parents=True, exist_ok=True)
  (path / "tokenizer.model").write_bytes(model.getvalue())
  (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, **config}))
  return path


def family_folder(path, name):
  template, config, specials, _ = FAMILIES[name]
  if name.endswith(".model"):
    return make_sp_folder(path, template, specials, **config)
  return make_folder(path, template, specials=specials, **config)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  return request.param, HFTokenizer(family_folder(tmp_path_factory.mktemp(request.param.replace(".", "_")), request.param))


def test_stop_ids_hold_the_end_of_turn_the_template_writes(family):
  name, tok = family
  end = tok.token_id(FAMILIES[name][3])
  assert tok.end_of_turn_ids == (end,)
  assert set(tok.stop_ids) == {tok.eos_id, end}  # Qwen, Llama 3, Gemma, ChatML: two ids; Llama 2, Mistral: eos is the end
  assert tok.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]).count(FAMILIES[name][3]) >= 1


TURN_CONTENT = st.lists(
    st.sampled_from(["hi", " there", "\n", "  ", "é日本 😀", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>", "<eos>", "[/INST]", "."]),
    max_size=6,
).map(lambda parts: "a" + "".join(parts) + "z")  # no edge whitespace: Gemma and Llama trim it


# Each example renders and tokenizes a four-turn chat for one family.
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(contents=st.tuples(TURN_CONTENT, TURN_CONTENT, TURN_CONTENT, TURN_CONTENT))
def test_every_learned_answer_ends_at_a_stop_id(family, contents):
  """What training teaches the model to write after an answer is a token generation stops at, and no
  answer text (forged end-of-turn strings included) is one."""
  _, tok = family
  roles = ["user", "assistant", "user", "assistant"]
  chat = [{"role": r, "content": c} for r, c in zip(roles, contents)]
  tokens, mask = tok.tokenize_chat(chat)
  answers = [[int(t) for t, m in run] for learned, run in _mask_runs(tokens, mask) if learned]
  assert len(answers) == 2
  for answer, message in zip(answers, chat[1::2]):
    first_stop = next((i for i, t in enumerate(answer) if t in tok.stop_ids), None)
    assert first_stop is not None, f"the answer {tok.decode(answer)!r} holds no stop id"
    assert tok.decode(answer[:first_stop]).strip() == message["content"]


def _mask_runs(tokens, mask):
  runs = []
  for token, m in zip(tokens, mask):
    if runs and runs[-1][0] == m:
      runs[-1][1].append((token, m))
    else:
      runs.append((m, [(token, m)]))
  return runs


def test_a_template_that_writes_no_special_after_an_answer_falls_back_to_eos(tmp_path):
  plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
  tok = HFTokenizer(make_folder(tmp_path / "plain", plain, eos_token="<|im_end|>"))
  assert tok.end_of_turn_ids == () and tok.stop_ids == (tok.token_id("<|im_end|>"),)
  # Specials further on, after text, are not the end of the turn.
  late = "{% for m in messages %}{{ m['content'] + ' (end) <|eot_id|>' }}{% endfor %}"
  tok = HFTokenizer(make_folder(tmp_path / "late", late, eos_token="<|im_end|>"))
  assert tok.end_of_turn_ids == () and tok.stop_ids == (tok.token_id("<|im_end|>"),)
  # A template that cannot render a user/assistant chat (it would fail on the data too) keeps the eos.
  refusing = "{{ raise_exception('system message required') }}"
  tok = HFTokenizer(make_folder(tmp_path / "refusing", refusing, eos_token="<|im_end|>"))
  assert tok.stop_ids == (tok.token_id("<|im_end|>"),)


def test_generation_config_eos_ids_are_stops_too(tmp_path):
  folder = make_folder(tmp_path, CHATML, specials=FAMILIES["qwen"][2], eos_token="<|endoftext|>")
  (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
  tok = HFTokenizer(folder)
  assert set(tok.stop_ids) == {7, 9, tok.eos_id, tok.token_id("<|im_end|>")}


def test_the_builtin_tokenizer_stops_at_its_end_of_turn_and_eos(tokenizer):
  from sft.tokenizer.sentencepiece_tokenizer import EOS_ID

  tokens, mask = tokenizer.tokenize_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "an answer"}])
  learned = [int(t) for t, m in zip(tokens, mask) if m]
  assert tokenizer.decode(learned[:-1]) == "an answer" and learned[-1] in tokenizer.stop_ids
  assert set(tokenizer.stop_ids) == {tokenizer.end_id, EOS_ID}


def test_special_tokens_named_only_in_special_tokens_map_are_read(tmp_path):
  """Older folders name eos and pad in special_tokens_map.json alone; tokenizer_config.json wins where both do."""
  folder = make_folder(tmp_path / "map", CHATML, specials=FAMILIES["qwen"][2])
  (folder / "special_tokens_map.json").write_text(
      json.dumps({"eos_token": {"content": "<|endoftext|>", "special": True}, "pad_token": "<|im_end|>"})
  )
  tok = HFTokenizer(folder)
  assert tok.eos_id == tok.token_id("<|endoftext|>") and tok.pad_id == tok.token_id("<|im_end|>")
  assert tok.eos_id in tok.stop_ids
  both = make_folder(tmp_path / "both", CHATML, specials=FAMILIES["qwen"][2], eos_token="<|im_end|>")
  (both / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
  assert HFTokenizer(both).eos_id == HFTokenizer(both).token_id("<|im_end|>")
  (both / "special_tokens_map.json").write_text(json.dumps({"pad_token": ["not", "a token"]}))
  with pytest.raises(ConfigError, match="special_tokens_map.json: pad_token must be a string"):
    HFTokenizer(both)
