"""Every data builder stage on literal worked examples."""

import collections
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sft.annotator.base import AnnotatorError, Decoding, Generation
from sft.databuilder import annotate, build_config, clean, decontaminate, quality, readers, records, stages, templates
from sft.databuilder.build import params_of


def _params():
  config = build_config()
  config.stdlib = True
  return params_of(config)


def _chat(user, assistant, record_id="x:1"):
  return records.chat(record_id, "x", [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])


def _read(tmp_path, name, content):
  path = tmp_path / name
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  return list(readers.read_file(path, name))


def test_every_schema_becomes_the_same_chat(tmp_path):
  user, bot = "What is two plus two?", "Four."
  lines = [
      {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": bot}]},
      {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": bot}]},
      {"instruction": user, "input": "", "output": bot},
      {"prompt": user, "completion": bot},
      {"question": user, "answer": bot},
  ]
  out = _read(tmp_path, "a.jsonl", "\n".join(json.dumps(x) for x in lines))
  assert [r["id"] for r in out] == ["a.jsonl:1", "a.jsonl:2", "a.jsonl:3", "a.jsonl:4", "a.jsonl:5"]
  for r in out[:4]:
    assert r["kind"] == "chat" and r["messages"] == [{"role": "user", "content": user}, {"role": "assistant", "content": bot}]
  assert (out[4]["task"], out[4]["template"]) == ("qa", "closed_qa") and out[4]["messages"][1]["content"] == bot
  assert user in out[4]["messages"][0]["content"]


def test_alpaca_input_system_and_missing_output(tmp_path):
  line = {"instruction": "Translate.", "input": "Hello", "output": "Bonjour", "system": "Be brief."}
  missing = {"instruction": "Write a poem.", "output": ""}
  ok, todo = _read(tmp_path, "a.jsonl", json.dumps(line) + "\n" + json.dumps(missing))
  assert ok["messages"] == [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Translate.\n\nHello"},
      {"role": "assistant", "content": "Bonjour"},
  ]
  assert todo["needs_response"] and todo["messages"] == [{"role": "user", "content": "Write a poem."}]


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"instruction": "x",', "bad json"),
        ('{"instruction": 3, "output": "y"}', "wrong type"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role"),
        ('{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "a"}]}', "empty turn"),
        ('{"messages": [{"role": "assistant", "content": "a"}]}', "turns out of order"),
        ('{"messages": [{"role": "user", "content": 5}]}', "wrong type"),
        ('{"prompt": "hi"}', None),
        ('{"colour": "blue"}', "unknown schema"),
        ('[1, 2]', "wrong type"),
        ('{"text": ""}', "empty text"),
    ],
)
def test_malformed_lines_are_rejected_with_a_reason(tmp_path, line, reason):
  (record,) = _read(tmp_path, "bad.jsonl", line)
  if reason is None:
    assert record["needs_response"]
  else:
    assert record["dropped"]["stage"] == "read" and record["dropped"]["reason"] == reason
    assert record["id"] == "bad.jsonl:1" and record["source"] == "bad.jsonl"


def test_invalid_utf8_spoils_one_line_or_row_not_the_file(tmp_path):
  good = b'{"prompt": "a b", "completion": "c d"}'
  out = _read(tmp_path, "u.jsonl", good + b"\n" + b'{"prompt": "\xff"}' + b"\n" + good)
  assert [r.get("dropped", {}).get("reason") for r in out] == [None, "invalid utf-8", None]
  rows = _read(tmp_path, "u.csv", b"prompt,completion\nhi,there\n\xff\xfe,x\nshort\n")
  assert [r.get("dropped", {}).get("reason") for r in rows] == [None, "invalid utf-8", "wrong number of fields"]
  assert rows[0]["messages"][1]["content"] == "there"
  (txt,) = _read(tmp_path, "latin1.txt", "café".encode("latin-1"))
  assert txt["dropped"]["reason"] == "invalid utf-8"
  (other,) = _read(tmp_path, "x.xml", "<a/>")
  assert other["dropped"]["reason"] == "unsupported file type"


def test_json_parquet_and_text_files(tmp_path):
  import pyarrow
  import pyarrow.parquet

  out = _read(tmp_path, "d.json", json.dumps({"data": [{"prompt": "p", "completion": "c"}, {"text": "A document."}]}))
  assert [r["kind"] for r in out] == ["chat", "text"] and out[1]["id"] == "d.json:1"
  pyarrow.parquet.write_table(pyarrow.table({"prompt": ["p1", None], "completion": ["c1", "c2"]}), tmp_path / "t.parquet")
  rows = list(readers.read_file(tmp_path / "t.parquet", "t.parquet"))
  assert rows[0]["messages"][1]["content"] == "c1" and rows[1]["dropped"]["reason"] == "missing field"
  (doc,) = _read(tmp_path, "n.txt", "Some prose.\n")
  assert doc == {"id": "n.txt", "source": "n.txt", "kind": "text", "text": "Some prose.\n"}


def test_templates_paraphrase_by_id_and_check_types():
  raw = {"text": "Great film!", "label": "positive", "labels": ["positive", "negative"]}
  chats = [templates.to_chat(raw, "classification", f"r:{i}", "r") for i in range(30)]
  assert {c["messages"][1]["content"] for c in chats} == {"positive"}
  prompts = {c["messages"][0]["content"] for c in chats}
  assert len(prompts) == 3 and all("positive, negative" in p and "Great film!" in p for p in prompts)
  assert templates.to_chat(raw, "classification", "r:0", "r") == chats[0]  # same id, same paraphrase
  assert templates.task_of({"context", "question", "answer"}) == "qa"
  assert templates.task_of({"question", "answer"}) == "closed_qa"
  assert templates.task_of({"source_lang", "target_lang", "source_text", "target_text"}) == "translation"
  assert templates.task_of({"text"}) is None
  with pytest.raises(ValueError, match="'document' is list"):
    templates.to_chat({"document": ["a"], "summary": "b"}, "summary", "r:1", "r")


def test_every_template_names_an_evaluation_task_and_keeps_its_options():
  assert set(templates.TEMPLATE_TASK) == set(templates.TASKS)
  assert set(templates.TEMPLATE_TASK.values()) <= set(templates.TASK_NAMES)
  chat = templates.to_chat({"text": "Great film!", "label": "positive", "labels": ["positive", "negative"]}, "classification", "r:0", "r")
  assert (chat["task"], chat["template"], chat["labels"]) == ("classification", "classification", ["positive", "negative"])
  assert templates.to_chat({"document": "a b", "summary": "a"}, "summary", "r:0", "r")["task"] == "summarisation"
  assert templates.task_of({"text", "answer", "choices"}) == "cloze"
  cloze = templates.to_chat({"text": "The capital of France is ____.", "answer": "Paris", "choices": ["Rome", "Paris"]}, "cloze", "r:1", "r")
  assert (cloze["task"], cloze["choices"], cloze["messages"][1]["content"]) == ("cloze", ["Rome", "Paris"], "Paris")
  assert "The capital of France is ____." in cloze["messages"][0]["content"] and "Rome, Paris" in cloze["messages"][0]["content"]
  with pytest.raises(templates.Invalid, match="not one of 'labels'"):
    templates.to_chat({"text": "t", "label": "x", "labels": ["a", "b"]}, "classification", "r:0", "r")


def test_a_chat_may_name_its_task(tmp_path):
  chat = [{"role": "user", "content": "Is this spam?"}, {"role": "assistant", "content": "no"}]
  lines = [{"messages": chat, "task": "classification"}, {"messages": chat, "task": "poetry"}, {"messages": chat, "task": ["qa"]}, {"messages": chat}]
  out = _read(tmp_path, "t.jsonl", "\n".join(json.dumps(x) for x in lines))
  assert out[0]["task"] == "classification" and "task" not in out[3]
  assert [r["dropped"]["reason"] for r in out[1:3]] == ["unknown task", "unknown task"]


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(st.sampled_from("ab _-.\n"), max_size=20),
    answer=st.text(st.sampled_from("ab "), max_size=4),
    choices=st.none() | st.lists(st.text(st.sampled_from("ab"), max_size=3), max_size=4),
)
def test_a_cloze_record_is_a_well_formed_chat_or_a_counted_rejection(tmp_path_factory, text, answer, choices):
  """Any text, answer and choices: a chat whose prompt holds the text with its one blank and whose
  response is the answer (one of the choices), or a rejection with a reason, never a traceback."""
  raw = {"text": text, "answer": answer, **({"choices": choices} if choices is not None else {})}
  path = tmp_path_factory.mktemp("cloze") / "c.jsonl"
  path.write_text(json.dumps(raw) + "\n")
  [out] = readers.read_file(path, "c.jsonl")
  if records.is_dropped(out):
    assert out["dropped"]["reason"] in ("bad cloze", "bad choices")
    return
  assert text.count(templates.BLANK) == 1 and answer.strip()
  assert out["task"] == "cloze" and text in out["messages"][0]["content"] and out["messages"][1]["content"] == answer
  assert choices is None or (answer in out["choices"] and len(set(out["choices"])) == len(out["choices"]))


def test_clean_worked_example():
  counts = collections.Counter()
  text = "The Mona Lisa doesnâ€™t  have <b>eyebrows</b> &amp; mail a.b@x.org or +1 415-555-0100 from 10.0.0.1\x07.\n\n\n\nEnd  "
  out = clean.clean_text(text, _params()["clean"], counts)
  assert out == "The Mona Lisa doesn't have eyebrows & mail <EMAIL> or <PHONE> from <IP_ADDRESS>.\n\nEnd"
  assert counts == {"unicode_fixed": 1, "html_stripped": 1, "whitespace_normalized": 1, "pii_email": 1, "pii_phone": 1, "pii_ip_address": 1}
  kept = clean.scrub_pii("Python 3.11.7 came out on 2023-12-04; pi is 3.14159", ("email", "ip_address", "phone"), counts)
  assert kept == "Python 3.11.7 came out on 2023-12-04; pi is 3.14159"
  assert clean.strip_html("<p>a</p><script>evil()</script><style>x{}</style><div>b</div>").split() == ["a", "b"]


def test_clean_record_counts_edits_and_drops_emptied_turns():
  record = clean.clean_record(_chat("Hi   there", "<br/>"), _params()["clean"])
  assert record["dropped"] == {"stage": "clean", "reason": "empty after cleaning", "detail": "the assistant turn"}
  ok = clean.clean_record(_chat("Hi   there", "Fine."), _params()["clean"])
  assert ok["messages"][0]["content"] == "Hi there" and ok["edits"] == {"whitespace_normalized": 1}


def test_length_and_sft_rules():
  p = _params()["filter"]
  drop = lambda r: (quality.filter_record(r, p).get("dropped") or {}).get("reason")  # noqa: E731
  assert drop(_chat("What is the capital of France?", "Paris.")) is None
  assert drop(_chat("?", "!")) == "trivial response"
  assert drop(_chat("Say hi", "...")) == "trivial response"
  assert drop(_chat("Repeat after me: the cat sat on the mat.", "Repeat after me: the cat sat on the mat!")) == "response repeats prompt"
  assert drop(_chat("Help me.", "As an AI language model, I cannot do that.")) == "refusal boilerplate"
  assert drop(_chat("Help me.", "I'm sorry, but I can't assist with this.")) == "refusal boilerplate"
  assert drop(_chat("a", "b")) == "too few characters" or drop(_chat("a", "")) == "empty response"
  long = _chat("Tell me everything.", "word " * 30_000)
  assert drop(long) == "too many characters"
  counted = quality.length(_chat("one two", "three"), {**p["length"], "min_tokens": 4}, count_tokens=lambda t: len(t.split()))
  assert counted == ("too few tokens", "3 < 4")


PROSE = (
    "Rivers shape the land they flow through. Over thousands of years a river carves valleys, moves sediment from the "
    "mountains to the sea and builds fertile plains where people have farmed since the earliest civilisations. The Nile "
    "and the Indus supported early cities, and today rivers still provide drinking water, transport and energy to billions."
)


def test_gopher_rules():
  p = _params()["filter"]["gopher"]
  text = lambda body: records.text("t", "t", body)  # noqa: E731
  assert quality.gopher(text(PROSE), p) is None
  assert quality.gopher(text("short and sweet"), p) is None  # under min_words_to_apply: not judged
  assert quality.gopher(text("BUY NOW! Best prices! Click here!\n" * 30), p)[0] == "gopher: stop words"
  assert quality.gopher(text("# " * 40 + PROSE), p)[0] == "gopher: symbol ratio"
  assert quality.gopher(text(" ".join(["12345"] * 40) + " " + PROSE), p)[0] == "gopher: non-alphabetic words"
  assert quality.gopher(text("\n".join([PROSE] + ["The end of the story is near and the river is with us."] * 8)), p)[0] == "gopher: duplicated lines"
  assert quality.gopher(text(" ".join(["supercalifragilisticexpialidocious"] * 60) + " the of"), p)[0] == "gopher: mean word length"


def test_language_identification():
  p = _params()["filter"]["language"]
  assert quality.language(_chat("What is the difference between weather and climate?", "Weather is daily, climate is the long-run average."), p) is None
  french = _chat("Quelle est la capitale de l'Australie et pourquoi ?", "La capitale de l'Australie est Canberra, un compromis.")
  reason, detail = quality.language(french, p)
  assert reason == "language" and detail.startswith("fr (")
  pair = templates.to_chat({"source_lang": "English", "target_lang": "French", "source_text": "Where is the station, please?", "target_text": "Où est la gare, s'il vous plaît ?"}, "translation", "t:1", "t")
  assert quality.language(pair, p) is None  # a translation is two languages by design
  assert quality.language(_chat("Hola", "Bonjour"), p) is None  # shorter than min_chars: not judged


def test_decontamination_names_the_eval_item():
  question = "Which planet in the solar system has the largest number of confirmed moons orbiting it?"
  index = decontaminate.build_index([("eval:1", question), ("eval:2", "Too short to match"), ("eval:3", "Name eight planets of the solar system now")], n=13, min_words=8)
  assert index["lengths"] == [8, 13]
  hit = decontaminate.decontaminate_record(_chat(f"QUIZ -- {question.upper()}", "Saturn."), index)
  assert hit["dropped"]["reason"] == "overlaps eval set" and hit["dropped"]["detail"].startswith("eval:1: 'which planet in the solar system")
  whole = decontaminate.decontaminate_record(_chat("Please name eight planets of the solar system now.", "Mercury, ..."), index)
  assert whole["dropped"]["detail"].startswith("eval:3")
  assert "dropped" not in decontaminate.decontaminate_record(_chat("Which planet is largest?", "Jupiter."), index)


def test_eval_items_in_any_schema_are_indexed(tmp_path):
  path = tmp_path / "eval.jsonl"
  question = "Which planet in the solar system has the largest number of confirmed moons orbiting it?"
  path.write_text(json.dumps({"question": question, "answer": "Saturn"}) + "\n" + json.dumps({"problem": "Prove that the square root of two is irrational using a contradiction argument", "solution": "..."}) + "\n{}\n")
  index, counts = decontaminate.index_from_files([str(path)], n=13, min_words=8)
  assert counts == {str(path): {"items": 2, "raw": 1}}  # `{}` has no text; the unknown schema is matched as raw text
  hit = decontaminate.decontaminate_record(_chat("Prove that the square root of two is irrational using a contradiction argument.", "Suppose..."), index)
  assert hit["dropped"]["detail"].startswith("eval:eval.jsonl:2")
  assert "dropped" in decontaminate.decontaminate_record(_chat(question, "Saturn."), index)


def test_format_adds_the_system_turn_and_splits_by_group_hash():
  chats = [{**_chat(f"Question {i}?", f"Answer {i}.", f"x:{i}"), "group": f"api{i // 4}"} for i in range(4000)]
  formatted = [stages.format_record(r, "Be brief.", 0.1, salt="")[0] for r in chats]
  assert formatted[0]["messages"][0] == {"role": "system", "content": "Be brief."} and len(formatted[0]["messages"]) == 3
  by_group = collections.defaultdict(set)
  for r in formatted:
    by_group[r["group"]].add(r["split"])
  assert all(len(splits) == 1 for splits in by_group.values())  # a group never straddles splits
  share = sum(r["split"] == "validation" for r in formatted) / len(formatted)
  assert 0.07 < share < 0.13
  assert formatted == [stages.format_record(r, "Be brief.", 0.1, salt="")[0] for r in chats]
  assert [r["split"] for r in formatted] != [stages.format_record(r, "", 0.1, salt="x")[0]["split"] for r in chats]
  assert stages.format_record(records.text("t", "t", "Some text."), "Be brief.", 0.1, "")[0]["split"] == "pretrain"
  dropped = records.drop(chats[0], "filter", "x")
  assert stages.format_record(dropped, "Be brief.", 0.1, "") == [dropped]


class EchoModel:
  """A deterministic stand-in for an annotator (the real backends are tests/test_annotator.py's): answers
  from the prompt's words, scores by a keyword, and ranks labels by a fixed table."""

  fingerprint = "echo"

  def __init__(self, loglik=None, cut=()):
    self.calls, self.loglik, self.cut = [], loglik or {}, cut

  def generate(self, chats, decoding):
    prompts = [c[-1]["content"] for c in chats]
    self.calls.append(prompts)
    out = []
    for p in prompts:
      if p.startswith("Score the response"):
        text = "2" if "bad answer" in p else "Score: 5"
      elif p.startswith("Here are some tasks."):
        text = f"Task 4: Explain the idea number {len(out)} in simple words.\nTask 5: ignored"
      else:
        text = f"An answer to: {p}"
      out.append(Generation(text, finished=not any(c in p for c in self.cut)))
    return out

  def log_likelihoods(self, chats, answers):
    return [self.loglik[a] for a in answers]


DECODING = Decoding(max_new_tokens=16)


def test_fill_self_instruct_and_judge_with_an_annotator():
  model = EchoModel(cut=("Ramble",))
  todo = records.chat("a:1", "a", [{"role": "user", "content": "Write a poem."}], needs_response=True)
  long = records.chat("a:2", "a", [{"role": "user", "content": "Ramble on."}], needs_response=True)
  filled = annotate.fill_responses([todo, _chat("q", "a"), long], model, DECODING)
  assert filled[0]["messages"][-1] == {"role": "assistant", "content": "An answer to: Write a poem."} and "needs_response" not in filled[0]
  assert filled[0]["annotated"] == "response" and filled[1] == _chat("q", "a")
  assert filled[2]["dropped"]["stage"] == "annotate" and filled[2]["dropped"]["reason"] == "fill: truncated"
  assert annotate.fill_responses([todo], None, DECODING)[0]["dropped"]["reason"] == "missing response"

  seeds = [_chat(f"Seed task {i}?", "ok", f"s:{i}") for i in range(5)]
  params = {"num_instructions": 2, "examples_per_prompt": 3, "seed": 0, "max_similarity": 0.7}
  new = annotate.self_instruct(seeds, model, DECODING, params)
  assert [r["id"] for r in new] == ["self-instruct:0", "self-instruct:1"]
  assert new[0]["messages"][0]["content"] == "Explain the idea number 0 in simple words."
  assert new[0]["messages"][1]["content"].startswith("An answer to: Explain the idea")
  assert model.calls[-2][0].count("Seed task") == 3
  # The second instruction differs from the first by one word: ROUGE-L 0.875, not novel.
  strict = annotate.self_instruct(seeds, EchoModel(), DECODING, {**params, "max_similarity": 0.8})
  assert [r.get("dropped", {}).get("reason") for r in strict] == [None, "self-instruct: too similar"]
  assert strict[1]["annotated"] == "self-instruct" and "Explain the idea number 0" in strict[1]["dropped"]["detail"]

  judged = annotate.judge_batch([_chat("q1", "good answer"), _chat("q2", "bad answer")], model, DECODING, "rubric", min_score=3)
  assert judged[0]["judge_score"] == 5 and "dropped" not in judged[0]
  assert judged[1]["dropped"]["reason"] == "low score" and judged[1]["judge_score"] == 2
  assert annotate.parse_instruction("  \n3. Do this thing.") == "Do this thing."
  assert annotate.parse_score("I would say 4/5") == 4 and annotate.parse_score("great") is None
  assert annotate.parse_score("3.5") is None and annotate.parse_score("10") is None


def test_an_annotator_that_answers_fewer_prompts_is_an_error():
  class Short(EchoModel):
    def generate(self, chats, decoding):
      return super().generate(chats, decoding)[:-1]

  todo = [records.chat(f"a:{i}", "a", [{"role": "user", "content": "Hi"}], needs_response=True) for i in range(3)]
  with pytest.raises(AnnotatorError, match="returned 2 answers for 3 prompts"):
    annotate.fill_responses(todo, Short(), DECODING)


def test_labels_are_chosen_from_the_set_with_their_margin():
  unlabelled = [
      readers.to_record({"text": "Great film!", "labels": ["positive", "negative"]}, f"r:{i}", "r") for i in range(2)
  ]
  assert unlabelled[0]["needs_label"] and unlabelled[0]["messages"][-1]["role"] == "user"
  model = EchoModel(loglik={"positive": -0.1, "negative": -2.3})
  labelled = annotate.label_records(unlabelled, model, DECODING, "loglik", 0.0)
  p_pos = 1 / (1 + math.exp(-2.2))
  assert labelled[0]["messages"][-1] == {"role": "assistant", "content": "positive"} and "needs_label" not in labelled[0]
  assert labelled[0]["label_confidence"] == pytest.approx(2 * p_pos - 1, abs=1e-6) and labelled[0]["annotated"] == "label"
  unsure = annotate.label_records(unlabelled, model, DECODING, "loglik", 0.9)
  assert unsure[0]["dropped"]["reason"] == "label: unsure" and unsure[0]["label_confidence"] < 0.9
  assert annotate.label_records(unlabelled, None, DECODING, "loglik", 0.0)[0]["dropped"]["reason"] == "missing label"
  assert annotate.parse_label("Positive.", ["positive", "negative"]) == "positive"
  assert annotate.parse_label("I think it is negative", ["positive", "negative"]) == "negative"
  assert annotate.parse_label("positive or negative", ["positive", "negative"]) is None
  assert annotate.parse_label("very good", ["good", "very good"]) == "very good"
  generated = annotate.label_records(unlabelled, model, DECODING, "generate", 0.0)  # "An answer to: ..." names none
  assert generated[0]["dropped"]["reason"] == "label: off-set"


def test_rouge_l_is_the_reference_implementations():
  from rouge_score import rouge_scorer

  scorer = rouge_scorer.RougeScorer(["rougeL"])
  pairs = [("Explain the idea number 0 in simple words.", "Explain the idea number 1 in simple words."),
           ("Name a colour.", "Give three tips for staying healthy."), ("", "x"), ("a b c d", "d c b a")]
  for a, b in pairs:
    assert annotate.rouge_l(a, b) == pytest.approx(scorer.score(a, b)["rougeL"].fmeasure)
