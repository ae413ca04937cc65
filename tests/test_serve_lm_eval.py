"""lm-evaluation-harness against `sft serve`: its `local-completions` model ranks multiple-choice candidates
by log-likelihood (token ids from the server's /tokenize, scored with `echo` and `logprobs`), its
`local-chat-completions` model answers a generation task greedily, and both scores equal the eval job's on
the same items: choice accuracy, and exact match with SQuAD's normalisation. Everything is local: a tiny
Hugging Face folder, task YAMLs and JSONL files written here, no Hub.

The multiple-choice task's context is the chat prompt as the template renders it and each candidate is the
answer followed by the end-of-turn string (target_delimiter ""), so the tokens lm-eval scores are the ones
the eval job scores (choices.py: the candidate and the end of turn that closes it); the test checks that
before it compares scores.
"""

import json

import numpy as np
import pytest
import requests
import serving_util  # its test_config would be collected as a test if imported by name

from sft import eval_job
from sft.evaluator.metrics import normalize_answer

pytestmark = pytest.mark.slow  # a server, the eval job and two lm-eval runs: about a minute on CPU

# Llama 3's turns without its BOS and blank lines. The generation prompt ends in a control token: lm-eval
# moves a context's trailing whitespace into the continuation (TemplateLM._encode_pair), so with ChatML's
# "<|im_start|>assistant\n" it would score the "\n" as part of every candidate, not the project's tokens.
TEMPLATE = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>' + message['content']"
    " + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>' }}"
    "{% endif %}"
)
END_OF_TURN = "<|eot_id|>"
MAX_NEW_TOKENS = 4  # eval.max_new_tokens and the generation task's max_gen_toks
WRONG = "no such answer"  # the reference of the items a model must get wrong
QUESTIONS = [f"{verb} {thing}?" for verb in ("What splits", "Who reads", "Name", "Where is")
             for thing in ("shell lines", "JSON text", "a module", "the lexer", "a token", "the quote", "a copy", "it")]
WORDS = ["copy", "json", "split", "quote", "dumps", "loads", "lexer", "token"]

MC_YAML = """\
task: sft_choices
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""
# Greedy, at most MAX_NEW_TOKENS, and `until: []`: the eval job stops at the model's stop tokens only (lm-eval's
# default would also stop at a blank line).
GEN_YAML = """\
task: sft_answers
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  until: []
  max_gen_toks: {max_new_tokens}
  temperature: 0
  do_sample: false
process_results: !function sft_metrics.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
# The eval job's exact match: the same normalisation, imported from the project.
METRICS_PY = """\
from sft.evaluator.metrics import normalize_answer


def process_results(doc, results):
  return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """(base URL, Server, model folder) of `sft serve` on 127.0.0.1, lm-eval imported with the Hub offline."""
  folder = serving_util.make_hf_folder(tmp_path_factory.mktemp("hf"), TEMPLATE, END_OF_TURN)
  with pytest.MonkeyPatch.context() as mp:
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
      mp.setenv(name, "1")
    mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
    mp.delenv("SFT_API_KEY", raising=False)
    with serving_util.running_server(serving_util.test_config(), folder) as (url, server):
      yield url, server, folder


def _clean(answer: str) -> bool:
  """An answer that survives a JSONL round trip and reads as an answer after normalisation."""
  return answer.isascii() and answer.isprintable() and normalize_answer(answer) not in ("", normalize_answer(WRONG))


def _greedy_answers(url: str, questions: list[str]) -> list[str]:
  answers = []
  for question in questions:
    body = {"model": "tiny", "messages": [{"role": "user", "content": question}], "max_tokens": MAX_NEW_TOKENS,
            "temperature": 0}
    response = requests.post(f"{url}/chat/completions", json=body, timeout=60)
    response.raise_for_status()
    answers.append(response.json()["choices"][0]["message"]["content"])
  return answers


@pytest.fixture(scope="module")
def items(served, tmp_path_factory):
  """The eval job's file and the records it reads from it, and lm-eval's tasks made of those records.

  Generation items: the reference is the server's greedy answer for every other question with a clean
  one (right) and WRONG for the rest, so exact match is neither 0 nor 1; an answer of the eval job's that
  differs fails the word-for-word comparison. Multiple-choice items: three candidates each, the reference
  first, second or third."""
  url, server, _ = served
  root = tmp_path_factory.mktemp("items")
  answers = _greedy_answers(url, QUESTIONS)
  chats = [(q, a) for q, a in zip(QUESTIONS, answers) if _clean(a)][:8]
  assert len(chats) >= 4, f"too few clean greedy answers to make right and wrong items: {answers}"
  rows = [{"prompt": q, "completion": a if i % 2 == 0 else WRONG} for i, (q, a) in enumerate(chats)]
  for i in range(8):
    choices = [WORDS[(i + k) % 8] for k in range(-(i % 3), 3 - i % 3)]
    rows.append({"text": f"The ____ of item {i}.", "answer": WORDS[i], "choices": choices})
  evalset = root / "evalset.jsonl"
  evalset.write_text("".join(json.dumps(r) + "\n" for r in rows))
  records, _ = eval_job.read_eval_files([str(evalset)])

  tok = server.tokenizer
  mc, gen = [], []
  for record in records:
    *asked, answer = record["messages"]
    if record.get("choices"):
      context = tok.render(asked, add_generation_prompt=True)
      mc.append({"context": context, "choices": [c + END_OF_TURN for c in record["choices"]],
                 "gold": record["choices"].index(answer["content"]), "record": record["id"]})
    else:
      gen.append({"question": asked[-1]["content"], "answer": answer["content"], "record": record["id"]})
  tasks = root / "tasks"
  tasks.mkdir()
  for name, docs, yaml in (("choices", mc, MC_YAML), ("answers", gen, GEN_YAML)):
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / f"sft_{name}.yaml").write_text(yaml.format(data=json.dumps(str(data)), max_new_tokens=MAX_NEW_TOKENS))
  (tasks / "sft_metrics.py").write_text(METRICS_PY)
  return {"evalset": evalset, "records": records, "mc": mc, "gen": gen, "tasks": tasks}


@pytest.fixture(scope="module")
def eval_results(served, items, tmp_path_factory):
  """The eval job on the same file, the same model folder and context, greedy: its results.json."""
  from configs import eval as eval_configs  # noqa: PLC0415

  _, server, folder = served
  config = eval_configs.get_config()
  config.model.checkpoint = str(folder)
  config.train.seq_len = server.limits.context
  config.eval.files = (str(items["evalset"]),)
  config.eval.update(batch_size=2, max_new_tokens=MAX_NEW_TOKENS, bootstrap_samples=100)
  workdir = tmp_path_factory.mktemp("eval")
  eval_job.evaluate_model(config, workdir)
  return json.loads((workdir / "eval" / "results.json").read_text())


def _evaluate(lm, items, task: str, **kwargs) -> dict:
  import lm_eval  # noqa: PLC0415  (here: datasets reads HF_DATASETS_* when first imported, after `served` set them)
  from lm_eval.tasks import TaskManager  # noqa: PLC0415

  manager = TaskManager(include_path=str(items["tasks"]))
  return lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True, bootstrap_iters=0,
                                 **kwargs)


def _by_doc(out: dict, task: str) -> list[dict]:
  return sorted(out["samples"][task], key=lambda s: s["doc_id"])


def test_multiple_choice_through_local_completions_ranks_as_the_eval_job(served, items, eval_results):
  from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: PLC0415

  url, server, _ = served
  lm = LocalCompletionsAPI(base_url=f"{url}/completions", model="tiny", max_length=server.limits.context, max_retries=1)
  assert lm.tokenizer_backend == "remote"  # auto-detected: /tokenizer_info and /tokenize answer as vLLM's do

  # The tokens lm-eval sends are the eval job's: the prompt, then the candidate and its end of turn, learned.
  records = {r["id"]: r for r in items["records"]}
  for doc in items["mc"]:
    asked = records[doc["record"]]["messages"][:-1]
    for choice in doc["choices"]:
      context_ids, continuation_ids = lm._encode_pair(doc["context"], choice)
      answer = {"role": "assistant", "content": choice.removesuffix(END_OF_TURN)}
      tokens, mask = server.tokenizer.tokenize_chat([*asked, answer])
      assert context_ids + continuation_ids == tokens.tolist(), doc
      assert mask.tolist() == [0] * len(context_ids) + [1] * len(continuation_ids), doc

  out = _evaluate(lm, items, "sft_choices")
  accuracy = out["results"]["sft_choices"]["acc,none"]
  assert accuracy == eval_results["metrics"]["eval/cloze/choice_accuracy"]
  assert 0 < accuracy < 1, "every pick right or every pick wrong: the comparison shows little"
  # Item by item: the same candidate picked, each candidate's log-likelihood the eval job's (another program).
  ranked = sorted(eval_results["choices"], key=lambda c: c["record"])
  samples = _by_doc(out, "sft_choices")
  assert len(samples) == len(items["mc"]) == len(ranked)
  for sample, item in zip(samples, ranked):
    loglik = [ll for ll, _ in sample["filtered_resps"]]
    assert loglik == pytest.approx(item["loglik"], abs=1e-4)
    assert int(np.argmax(loglik)) == item["pick"] and sample["target"] == item["gold"]


def test_generation_through_local_chat_completions_matches_the_eval_job(served, items, eval_results):
  from lm_eval.models.openai_completions import LocalChatCompletion  # noqa: PLC0415

  url, _, _ = served
  lm = LocalChatCompletion(base_url=f"{url}/chat/completions", model="tiny", max_retries=1)
  out = _evaluate(lm, items, "sft_answers", apply_chat_template=True)
  exact = out["results"]["sft_answers"]["exact_match,none"]
  assert exact == eval_results["metrics"]["eval/chat/exact_match"]
  assert 0 < exact < 1
  # The same chats asked, the same answers given, word for word.
  samples = _by_doc(out, "sft_answers")
  answered = [s for s in eval_results["samples"] if s["task"] == "chat"]
  assert len(samples) == len(items["gen"]) == len(answered)
  for sample, doc, project in zip(samples, items["gen"], answered):
    (chat,), settings = sample["arguments"][0]
    assert json.loads(chat) == [{"role": "user", "content": doc["question"]}]
    assert settings["max_gen_toks"] == MAX_NEW_TOKENS
    assert sample["filtered_resps"][0] == project["prediction"] and doc["answer"] == project["reference"]


def _ended_at_once(url: str, vocab_size: int) -> list[int]:
  """A prompt after which the greedy next token is a stop token: found among seeded random prompts."""
  rng = np.random.default_rng(0)
  for _ in range(32):  # about one prompt in 300 does
    prompts = rng.integers(6, vocab_size, size=(64, 5)).tolist()  # past the special tokens, ids 0-5
    body = {"model": "tiny", "prompt": prompts, "max_tokens": 1, "temperature": 0}
    response = requests.post(f"{url}/completions", json=body, timeout=60)
    response.raise_for_status()
    for choice in response.json()["choices"]:
      if choice["finish_reason"] == "stop":
        return prompts[choice["index"]]
  raise RuntimeError("no seeded prompt makes the model stop at once")


def test_a_candidate_the_model_would_end_keeps_its_last_token(served):
  """lm-eval asks for the candidate with max_tokens 1 and drops the last logprob, the generated token's:
  one must come back even when the model would stop there, or the candidate's last token goes unscored."""
  from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: PLC0415

  url, server, _ = served
  prompt = _ended_at_once(url, server.tokenizer.vocab_size)
  body = {"model": "tiny", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}
  scored = requests.post(f"{url}/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
  lm = LocalCompletionsAPI(base_url=f"{url}/completions", model="tiny", max_length=server.limits.context, max_retries=1)
  [(loglik, _)] = lm._loglikelihood_tokens([(None, prompt[:-1], prompt[-1:])])
  assert loglik == pytest.approx(scored["token_logprobs"][-1], abs=1e-4) and loglik < 0
