"""Annotation throughput: sft.annotator against Hugging Face `generate` at the same batch size, and the cache.

    python benchmarks/annotate_speed.py [--num_prompts 256] [--max_new_tokens 64] [--batch_size 32] [--repeats 1]
                                        [--quick]

One Hugging Face folder, written by transformers in a temporary directory, serves both sides: a Llama of
the size generate_speed.py uses (26.1M parameters: vocab 8192, d_model 512, MLP 1408, 6 layers, 8 query
heads over 4 kv heads of 64, untied unembedding; float32, random weights a little larger than the default
init, so that answers differ from prompt to prompt) and a byte-level BPE tokenizer trained on the prompts'
text, with a ChatML template whose end of turn is the stop token. The chats are instruction prompts of
mixed lengths (a question, an instruction with a passage, a long passage to summarise, a conversation
with a system turn), from a fixed seed.

  ours  `open_annotator(folder, "hf", batch_size=...)`: `generate(chats, Decoding(max_new_tokens=N))`,
        greedy: render, batch by prompt-length bucket, KV-cache generation, decode to text.
  HF    LlamaForCausalLM (eval mode, torch.inference_mode, torch.set_num_threads(the CPUs this process
        may use)): the chats rendered with the tokenizer's `apply_chat_template`, sorted by length,
        left-padded batches of the same size, `generate` greedy with the same max_new_tokens and stop
        token, answers decoded to text; timed with each of its KV caches (dynamic, and static, which
        generation on CPU does not compile), and the ratio taken against the faster.

Counted on each side: everything from the chats to the answers' texts, after one warm-up call on a
separate set of chats, one per shape the measured chats use (ours compiles a decoding program per
prompt-length bucket and a prefill program per bucket and prefill width there; that call's time is
printed, not counted; the model's load is not timed either). New tokens are the
answers' tokens up to and including the stop token (an answer cut off at max_new_tokens has exactly that
many). Greedy float32 decoding of two implementations may part ways where two logits nearly tie: the
share of chats whose answers are equal (text and whether it finished) is printed, and should be most.

The cache: the same chats through `CachedAnnotator` into a fresh SQLite file, first with the warm
annotator (every chat a miss: generated and written), then a rerun as a rebuild makes it, with a new
annotator and cache object over the same file and model folder: every chat a hit, the model asked nothing
and never loaded (what the rerun counts: the fingerprint of the weights, the keys and the lookups).

Each side is timed --repeats times, the order rotating, and the median reported. --quick: a 2-layer toy
model, 24 chats, 8 new tokens, batch 8: a smoke test (about half a minute, mostly imports and compiling).
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import roofline  # noqa: E402
from sft.annotator import AnnotationCache, CachedAnnotator, Decoding, Generation, open_annotator  # noqa: E402
from sft.annotator.batches import bucket_of, prefill_width  # noqa: E402
from sft.evaluator.generate import prompt_room  # noqa: E402

# transformers.LlamaConfig fields; generate_speed.py's BENCH and a toy model.
BENCH = dict(
    vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=4, head_dim=64,
)  # fmt: skip
QUICK = dict(
    vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16,
)  # fmt: skip
COMMON = dict(rms_norm_eps=1e-5, rope_theta=10_000.0, tie_word_embeddings=False, max_position_embeddings=2048)
WEIGHT_STD = 0.1  # larger than the default init (0.02): answers differ from prompt to prompt
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>"]
TASK = "bench"
HF_CACHES = ("dynamic", "static")  # transformers' KV caches; on CPU neither is compiled

TOPICS = (
    "json.dumps", "a context manager", "a list comprehension", "the global interpreter lock", "binary search",
    "HTTP caching", "SQLite's write-ahead log", "a Python decorator", "gradient descent", "a hash table",
    "the TCP handshake", "unit testing", "regular expressions", "garbage collection", "a B-tree index",
    "mixed precision training", "the attention mechanism", "a REST API", "virtual memory", "dependency injection",
)  # fmt: skip
QUESTIONS = (
    "What does {t} do, and when should I use it?", "Explain {t} to a new programmer in a few sentences.",
    "What are the most common mistakes people make with {t}?", "How would you test code that relies on {t}?",
    "Compare {t} with {u}: which is faster, and why?", "Give three short examples of {t} in practice.",
    "Is {t} still a good idea in 2024? Answer briefly.", "Write a one-paragraph summary of {t} for a README.",
)  # fmt: skip
INSTRUCTIONS = (
    "Answer the question using only the passage below.", "Rewrite the following text so that a child can read it.",
    "List the main claims of this passage as bullet points.", "Find the factual errors in the text below, if any.",
    "Suggest a title for this passage and explain your choice.", "Translate the passage below into plain English.",
)  # fmt: skip
SENTENCES = (
    "The cache keeps every answer the model gave, keyed by the prompt and the settings that produced it.",
    "A write-ahead log lets readers continue while a single writer appends its changes at the end of a file.",
    "Binary search halves the interval at every step, so it needs about twenty comparisons for a million items.",
    "The function returns a string, and raises a TypeError when it meets an object it cannot serialise.",
    "Most of the time in a decoding step is spent reading the weights of the projections from memory.",
    "Garbage collection frees objects that no reference can reach, at the cost of occasional pauses.",
    "A decorator wraps a function in another one, which can run code before and after every call.",
    "Tests that depend on the clock or the network tend to fail now and then for reasons unrelated to the code.",
    "The index is a balanced tree whose leaves hold the keys in order, so range queries read neighbouring pages.",
    "Regular expressions are compact, but a careless pattern can take exponential time on a hostile input.",
    "Each request carries a token that the server checks before it reads or writes anything on the user's behalf.",
    "Learning rates that are too large make the loss jump around; ones that are too small waste compute.",
    "The handshake exchanges three packets before either side may send data over the new connection.",
    "Virtual memory gives every process the illusion of a large private address space backed by pages.",
    "Attention compares every query with every key, so its cost grows with the square of the sequence length.",
    "Half precision halves the memory traffic, but the optimiser keeps a full-precision copy of the weights.",
    "A hash table finds a key in constant time on average, unless many keys land in the same bucket.",
    "Dependency injection passes collaborators in from outside, which makes a class easier to test alone.",
    "The report lists how many records each stage removed and why, so that nothing disappears silently.",
    "When the disk is full the write fails, and the program should say so instead of losing the data.",
)  # fmt: skip


def passage(rng: np.random.Generator, low: int, high: int) -> str:
  return " ".join(rng.choice(SENTENCES, size=int(rng.integers(low, high)), replace=True))


def one_chat(rng: np.random.Generator) -> list[dict[str, str]]:
  """A short question (40%), an instruction with a short passage (30%), a long passage to summarise (15%),
  or a conversation with a system turn and an earlier answer (15%)."""
  t, u = rng.choice(TOPICS, size=2, replace=False)
  question = str(rng.choice(QUESTIONS)).format(t=t, u=u)
  kind = rng.random()
  if kind < 0.4:
    return [{"role": "user", "content": question}]
  if kind < 0.7:
    return [{"role": "user", "content": f"{rng.choice(INSTRUCTIONS)}\n\n{passage(rng, 2, 6)}"}]
  if kind < 0.85:
    return [{"role": "user", "content": f"Summarise this text in two sentences.\n\n{passage(rng, 8, 16)}"}]
  return [
      {"role": "system", "content": "You are a careful assistant. Answer briefly and say when you are unsure."},
      {"role": "user", "content": question},
      {"role": "assistant", "content": passage(rng, 1, 4)},
      {"role": "user", "content": str(rng.choice(QUESTIONS)).format(t=u, u=t)},
  ]


def make_chats(n: int, seed: int) -> list[list[dict[str, str]]]:
  """`n` distinct chats (see `one_chat`): the annotator answers equal prompts once, transformers each time."""
  rng = np.random.default_rng(seed)
  chats = {}
  while len(chats) < n:
    chat = one_chat(rng)
    chats.setdefault(repr(chat), chat)
  return list(chats.values())


def write_folder(folder: pathlib.Path, model_fields: dict, texts: list[str]) -> None:
  """A Hugging Face folder written by `tokenizers` and transformers: BPE tokenizer with the ChatML template,
  and a random Llama."""
  import json

  import tokenizers
  import torch
  import transformers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=model_fields["vocab_size"], special_tokens=SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(texts, trainer)
  folder.mkdir(parents=True, exist_ok=True)
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
  ids = dict(bos_token_id=None, eos_token_id=tok.token_to_id("<|im_end|>"), pad_token_id=None)
  config = transformers.LlamaConfig(**model_fields, **COMMON, **ids)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim > 1:  # the norms' scales stay 1
        p.normal_(0.0, WEIGHT_STD)
  model.save_pretrained(folder)


def chat_texts(chats) -> list[str]:
  return [m["content"] for chat in chats for m in chat] + ["system user assistant"] * 10


# --- Hugging Face ------------------------------------------------------------------------------------


class HFAnnotator:
  """The peer: transformers' own tokenizer, chat template and `generate`, batched as its docs batch."""

  def __init__(self, folder: pathlib.Path, batch_size: int, stop_ids: tuple[int, ...], pad_id: int):
    import torch
    import transformers

    self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, padding_side="left")
    self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(pad_id)  # sft's: the eos
    self.model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    self.batch_size, self.stop_ids, self.pad_id = batch_size, stop_ids, pad_id

  def prompt_ids(self, chats) -> list[list[int]]:
    render = functools.partial(self.tokenizer.apply_chat_template, add_generation_prompt=True, return_dict=False)
    return [render(chat) for chat in chats]

  def generate(self, chats, max_new_tokens: int, cache: str) -> tuple[list[Generation], list[int]]:
    """(one Generation per chat, in order; each answer's new tokens, its stop included), with the
    "dynamic" or the "static" KV cache."""
    import torch

    prompts = self.prompt_ids(chats)
    order = sorted(range(len(chats)), key=lambda i: len(prompts[i]))  # fewer pads per batch
    out: list[Generation | None] = [None] * len(chats)
    counts = [0] * len(chats)
    for start in range(0, len(order), self.batch_size):
      rows = order[start : start + self.batch_size]
      batch = self.tokenizer.pad({"input_ids": [prompts[r] for r in rows]}, return_tensors="pt")
      with torch.inference_mode():
        ids = self.model.generate(
            **batch, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(self.stop_ids),
            pad_token_id=self.pad_id, num_beams=1, cache_implementation=cache,
        )  # fmt: skip
      for r, row in zip(rows, ids[:, batch["input_ids"].shape[1] :].tolist()):
        cut = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
        answer = row if cut is None else row[:cut]
        counts[r] = len(answer) + (cut is not None)
        out[r] = Generation(self.tokenizer.decode(answer), cut is not None)
    return out, counts


# --- measuring ---------------------------------------------------------------------------------------


class Counting:
  """An annotator that counts the chats it is asked to answer."""

  def __init__(self, annotator):
    self.annotator, self.asked = annotator, 0

  @property
  def fingerprint(self) -> str:
    return self.annotator.fingerprint

  def generate(self, chats, decoding):
    self.asked += len(chats)
    return self.annotator.generate(chats, decoding)

  def log_likelihoods(self, chats, answers):
    self.asked += len(chats)
    return self.annotator.log_likelihoods(chats, answers)


def time_sides(sides: dict, repeats: int) -> tuple[dict[str, list[float]], dict]:
  """Seconds of each side's call, `repeats` times, each round in another order; and each one's last output."""
  seconds, outputs = {name: [] for name in sides}, {}
  names = list(sides)
  for r in range(repeats):
    for name in names[r % len(names):] + names[: r % len(names)]:
      outputs[name], s = timed(sides[name])
      seconds[name].append(s)
  return seconds, outputs


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def our_counts(answers: list[Generation], tokenizer, max_new_tokens: int) -> list[int]:
  """Each answer's new tokens: max_new_tokens for one cut off there, else its text's tokens and the stop."""
  return [len(tokenizer.encode(g.text)) + 1 if g.finished else max_new_tokens for g in answers]


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_prompts", type=int, default=256)
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=1, help="timed passes of each side, alternating; the median")
  parser.add_argument("--quick", action="store_true", help="a 2-layer toy model, 24 chats, 8 new tokens, batch 8")
  args = parser.parse_args(argv)
  for name in ("num_prompts", "max_new_tokens", "batch_size", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be at least 1")
  if args.quick:
    args.num_prompts, args.max_new_tokens, args.batch_size = 24, 8, 8
  import torch
  import transformers

  transformers.utils.logging.disable_progress_bar()
  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  torch.set_num_threads(threads)
  fields = QUICK if args.quick else BENCH
  chats = make_chats(args.num_prompts, seed=0)
  decoding = Decoding(max_new_tokens=args.max_new_tokens)
  with tempfile.TemporaryDirectory() as tmp:
    folder = pathlib.Path(tmp) / "model"
    write_folder(folder, fields, chat_texts(chats))
    return run(args, folder, chats, decoding, pathlib.Path(tmp), threads, torch, transformers)


def shapes_of(length: int, room: int) -> tuple[int, int]:
  """(bucket, prefill width) of a prompt: the decoding program and the prefill program it runs in."""
  bucket = bucket_of(length, room)
  return bucket, prefill_width(length, bucket)


def pick_warmup(chats, tokenizer, room: int, wanted: set[tuple[int, int]], measured) -> list:
  """The first chat of each wanted (bucket, prefill width) among `chats`, none of them `measured`."""
  picked, measured = {}, {repr(c) for c in measured}
  for chat in (c for c in chats if repr(c) not in measured):
    shapes = shapes_of(len(render(tokenizer, chat)), room)
    if shapes in wanted and shapes not in picked:
      picked[shapes] = chat
  missing = sorted(wanted - set(picked))
  assert not missing, f"no warm-up chat of the (bucket, prefill width) shapes {missing}: draw more"
  return [picked[b] for b in sorted(picked)]


def render(tokenizer, chat) -> list[int]:
  return tokenizer.render_prompt([*chat, {"role": "assistant", "content": "-"}])[0]


def run(args, folder, chats, decoding, tmp, threads, torch, transformers) -> dict:
  n_new = args.max_new_tokens
  ours = open_annotator(str(folder), "hf", batch_size=args.batch_size)
  tok = ours.model.tokenizer  # loads the model: not timed
  room = prompt_room(ours.context, n_new, "max_new_tokens")
  prompts = [render(tok, c) for c in chats]
  lengths = [len(p) for p in prompts]
  used = {shapes_of(n, room) for n in lengths}
  buckets = sorted({b for b, _ in used})
  warm = pick_warmup(make_chats(8 * args.num_prompts + 256, seed=1), tok, room, used, chats)
  theirs = HFAnnotator(folder, args.batch_size, tuple(tok.stop_ids), tok.pad_id)
  same_prompts = sum(a == list(b) for a, b in zip(prompts, theirs.prompt_ids(chats)))
  n_params = sum(p.numel() for p in theirs.model.parameters())
  print(
      f"model: {n_params / 1e6:.1f}M parameters (vocab {theirs.model.config.vocab_size}, d_model "
      f"{theirs.model.config.hidden_size}, {theirs.model.config.num_hidden_layers} layers), float32; "
      f"{len(chats)} chats, "
      f"prompts {min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}), buckets {buckets}; greedy, "
      f"max_new_tokens {n_new}, batch {args.batch_size}; jax {jax.__version__} on {jax.devices()[0].platform}, torch "
      f"{torch.__version__}, transformers {transformers.__version__}, torch.set_num_threads({threads}) (the CPUs this "
      f"process may use)",
      flush=True,
  )
  print(f"prompts: sft's chat rendering equals transformers' apply_chat_template for {same_prompts} of {len(chats)}")

  # Warm-up on a separate set: ours compiles a decoding program per bucket and a prefill program per
  # prefill width; HF runs once with each cache.
  _, ours_warm_s = timed(lambda: ours.generate(warm, decoding))
  hf_warm = {c: timed(functools.partial(theirs.generate, warm, n_new, c))[1] for c in HF_CACHES}
  print(
      f"warm-up ({len(warm)} chats, one per (bucket, prefill width)): ours {ours_warm_s:.2f} s (compiling "
      f"{len(buckets)} decoding and {len(used)} prefill programs, and running {len(buckets)} padded batches: not "
      f"counted); HF generate {', '.join(f'{c} cache {s:.2f} s' for c, s in hf_warm.items())}",
      flush=True,
  )

  sides = {"ours": lambda: (ours.generate(chats, decoding), None)}
  sides.update({cache: functools.partial(theirs.generate, chats, n_new, cache) for cache in HF_CACHES})
  seconds, outputs = time_sides(sides, args.repeats)
  best = min(HF_CACHES, key=lambda c: statistics.median(seconds[c]))
  ours_out, theirs_out = outputs["ours"][0], outputs[best][0]
  tokens = {"ours": sum(our_counts(ours_out, tok, n_new)), **{c: sum(outputs[c][1]) for c in HF_CACHES}}
  rates = {k: (len(chats) / statistics.median(v), tokens[k] / statistics.median(v)) for k, v in seconds.items()}
  for name, side in (("ours", "ours"), *((f"HF generate, {c} cache", c) for c in HF_CACHES)):
    print(
        f"{name}: {len(chats)} records in {statistics.median(seconds[side]):.3f} s: {rates[side][0]:.2f} records/s, "
        f"{rates[side][1]:.1f} new tokens/s  (seconds {[round(x, 3) for x in seconds[side]]})"
    )
  ratio = rates["ours"][0] / rates[best][0]
  print(f"ratio (ours / HF generate, {best} cache, the faster): {ratio:.2f}x records/s  (target >= 2x on CPU)")
  equal = sum(a == b for a, b in zip(ours_out, theirs_out))
  print(
      f"greedy answers equal: {equal} of {len(chats)} ({equal / len(chats):.3f}); distinct answers: ours "
      f"{len({g.text for g in ours_out})}, HF {len({g.text for g in theirs_out})}; finished before max_new_tokens: "
      f"ours {sum(g.finished for g in ours_out)}, HF {sum(g.finished for g in theirs_out)}",
      flush=True,
  )
  floor = weight_floor(QUICK if args.quick else BENCH, sum(lengths), tokens["ours"], args.batch_size)
  hf_seconds = statistics.median(seconds[best])
  print(
      f"floor (the weight products alone, measured now: {sum(lengths)} prompt tokens unpadded, then "
      f"{floor['steps']} decoding steps of {args.batch_size} full rows): ours {floor['jax']:.4f} s, HF "
      f"{floor['torch']:.4f} s; each side's time over its floor: ours "
      f"{statistics.median(seconds['ours']) / floor['jax']:.2f}x, HF {hf_seconds / floor['torch']:.2f}x; "
      f"the most any implementation on JAX's kernels could reach here: {hf_seconds / floor['jax']:.2f}x HF",
      flush=True,
  )
  result = {
      "records": len(chats), "compile_s": ours_warm_s, "hf_cache": best, "ratio": ratio,
      "floor_ours_s": floor["jax"], "floor_hf_s": floor["torch"], "best_possible_ratio": hf_seconds / floor["jax"],
      "ours_records_per_s": rates["ours"][0], "ours_tokens_per_s": rates["ours"][1],
      "hf_records_per_s": rates[best][0], "hf_tokens_per_s": rates[best][1], "answers_equal": equal / len(chats),
  }  # fmt: skip
  result.update(cache_rerun(args, folder, chats, decoding, ours, ours_out, tmp))
  return result


def weight_floor(fields: dict, prompt_tokens: int, new_tokens: int, batch_size: int) -> dict:
  """Seconds of the run's weight products alone, per library: every prompt token through the layers'
  projections (in passes of up to 4096 rows), then ceil(new tokens / batch) decoding steps of `batch_size`
  rows each with the vocabulary projection: no padding, no attention, every step full (as continuous
  batching would be at best). No implementation multiplying with that library's kernels runs faster."""
  rows = min(prompt_tokens, 4096)
  prefill_jax, prefill_torch = roofline.matmul_seconds(fields, rows, unembed=False)
  step_jax, step_torch = roofline.matmul_seconds(fields, batch_size, unembed=True)
  steps = -(-new_tokens // batch_size)
  return {
      "steps": steps,
      "jax": prompt_tokens / rows * prefill_jax + steps * step_jax,
      "torch": prompt_tokens / rows * prefill_torch + steps * step_torch,
  }


def cache_rerun(args, folder, chats, decoding, ours, ours_out, tmp) -> dict:
  """The same chats through CachedAnnotator: a first run of misses with the warm annotator, then a rerun
  with a fresh annotator and cache object over the same file, as a rebuild opens them."""
  path = tmp / "annotations.sqlite"
  first = CachedAnnotator(Counting(ours), AnnotationCache(path), TASK)
  first_out, first_s = timed(lambda: first.generate(chats, decoding))
  fresh = open_annotator(str(folder), "hf", batch_size=args.batch_size)
  again = CachedAnnotator(Counting(fresh), AnnotationCache(path), TASK)
  again_out, again_s = timed(lambda: again.generate(chats, decoding))
  assert first_out == ours_out and again_out == first_out, "the cache changed an answer"
  loaded = fresh._model is not None
  print(
      f"cache: first run {first_s:.3f} s ({first.misses} misses, model asked {first.annotator.asked} chats), cached "
      f"rerun {again_s * 1000:.2f} ms ({again.hits} hits, {again.misses} misses, model asked "
      f"{again.annotator.asked} chats, model {'loaded' if loaded else 'not loaded'}): {first_s / again_s:.1f}x  "
      "(target >= 50x)"
  )
  return {
      "cache_first_s": first_s, "cache_rerun_s": again_s, "cache_ratio": first_s / again_s,
      "rerun_asked": again.annotator.asked, "rerun_model_loaded": loaded,
  }  # fmt: skip


if __name__ == "__main__":
  main()
