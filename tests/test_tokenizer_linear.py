"""Chat tokenization with a Hugging Face template is linear in turns: a bounded number of renderings
per chat, with the loss mask exactly as the prefix-by-prefix renderings give it."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hf_tokenizer import CHATML, FAMILIES, family_folder, make_folder

from sft.tokenizer.hf_tokenizer import HFTokenizer

# Templates the single watched rendering cannot vouch for, which are rendered prefix by prefix.
PEEKING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% if loop.last %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MACRO = (
    "{% macro turns(ms) %}{% for m in ms %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% endmacro %}{{ turns(messages) }}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COUNTED = (
    "{% if messages | length > 0 %}{% endif %}" + CHATML
)
EXTRA = {"peeking": PEEKING, "macro": MACRO, "counted": COUNTED, "sliced": "{% for message in messages[0:] %}" + CHATML[CHATML.index("{{") :]}


@pytest.fixture(scope="module", params=[*sorted(FAMILIES), *sorted(EXTRA)])
def template_tokenizer(request, tmp_path_factory):
  path = tmp_path_factory.mktemp(request.param.replace(".", "_"))
  if request.param in EXTRA:
    return request.param, HFTokenizer(make_folder(path, EXTRA[request.param], eos_token="<|im_end|>"))
  return request.param, HFTokenizer(family_folder(path, request.param))


def prefix_by_prefix(tok, messages):
  """The loss mask as it was computed before: one rendering per prefix, two per assistant turn."""
  text = tok.render(messages)
  spans = []
  for i, message in enumerate(messages):
    if message["role"] == "assistant":
      before, through = tok.render(messages[:i], add_generation_prompt=True), tok.render(messages[: i + 1])
      if not (through.startswith(before) and text.startswith(through)):
        raise ValueError("growing prefix")
      spans.append((len(before), len(through)))
  ids, offsets = tok._encode_with_offsets(text)
  return np.asarray(ids), np.asarray([int(any(s <= b < e for s, e in spans)) for b, _ in offsets])


def counting_renders(tok, monkeypatch):
  calls = []
  generate = tok._template.generate
  monkeypatch.setattr(tok._template, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
  return calls


def chat_of(n, system=False):
  turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: some words"} for i in range(n)]
  return ([{"role": "system", "content": "Be brief."}] if system else []) + turns


@pytest.mark.parametrize("name", ["qwen", "llama3", "gemma", "mistral", "llama2.model"])
def test_a_long_chat_is_rendered_a_bounded_number_of_times(tmp_path, monkeypatch, name):
  tok = HFTokenizer(family_folder(tmp_path, name))
  chat = chat_of(200, system=name in ("qwen", "llama3", "llama2.model"))
  calls = counting_renders(tok, monkeypatch)
  tokens, mask = tok.tokenize_chat(chat)
  assert len(calls) <= 8
  reference = prefix_by_prefix(tok, chat)
  np.testing.assert_array_equal(tokens, reference[0])
  np.testing.assert_array_equal(mask, reference[1])


def test_the_watched_rendering_falls_back_where_it_cannot_vouch(tmp_path, monkeypatch):
  for name, template in EXTRA.items():
    tok = HFTokenizer(make_folder(tmp_path / name, template, eos_token="<|im_end|>"))
    calls = counting_renders(tok, monkeypatch)
    tokens, mask = tok.tokenize_chat(chat_of(20))
    expected = 8 if name == "sliced" else 2 * 10  # the slice is watched; the others go prefix by prefix
    assert (len(calls) <= expected) if name == "sliced" else (len(calls) >= expected), name
    np.testing.assert_array_equal(mask, prefix_by_prefix(tok, chat_of(20))[1])


WORDS = st.sampled_from(["hi", "there", " ", "\n", "é日本 😀", "json.dumps", "  x", "."])
CONTENT = st.lists(WORDS, min_size=1, max_size=5).map(lambda parts: "a" + "".join(parts) + "z")


# Each example renders every prefix of its chat (~30 ms).
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=st.booleans(), contents=st.lists(CONTENT, min_size=2, max_size=9), first=st.sampled_from(["user", "assistant"]))
def test_the_mask_is_what_prefix_by_prefix_rendering_gives(template_tokenizer, system, contents, first):
  _, tok = template_tokenizer
  roles = ["user", "assistant"] if first == "user" else ["assistant", "user"]
  chat = ([{"role": "system", "content": "Be brief."}] if system else [])
  chat += [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]
  if not any(m["role"] == "assistant" for m in chat):
    return
  try:
    expected = prefix_by_prefix(tok, chat)
  except ValueError:  # the template refuses the chat (roles must alternate, no system turn): so does tokenize_chat
    with pytest.raises(ValueError):
      tok.tokenize_chat(chat)
    return
  tokens, mask = tok.tokenize_chat(chat)
  np.testing.assert_array_equal(tokens, expected[0])
  np.testing.assert_array_equal(mask, expected[1])
