"""Serving under load: `sft serve` against `transformers serve`, the same model, the same clients, one run.

    python benchmarks/serve_load.py [--clients 16] [--requests_per_client 4] [--new_tokens 128] [--passes 2]
                                    [--d_model 256] [--layers 4] [--vocab 4096] [--slots 16] [--decode_chunk 8]
                                    [--context 512] [--quick]

One Hugging Face folder, written in a temporary directory as annotate_speed.py writes its own (a random
float32 Llama, default d_model 256, 4 layers, 4 query heads over 2 kv heads, vocab 4096; a byte-level BPE
tokenizer with a ChatML template whose end of turn is the stop token), is served by both, each in its own
process on this machine, one at a time under load:

  sft           `python -m sft.cli serve --config=serve --workdir=<folder>` with --slots, --context and
                --decode_chunk as its config keys (continuous batching over a fixed set of KV-cache rows).
  transformers  `transformers serve <folder> --continuous-batching --device cpu --dtype float32` (paged
                attention), its KV cache sized with --cb-num-blocks to twice the tokens of sft's (slots x
                context; see `hf_num_blocks`; left to itself it takes most of the free memory, 13.7 GB
                here), and --cb-max-batch-tokens 512 (--hf_max_batch_tokens): its default, 8192, sizes
                every step's attention mask for 8192 new tokens and made it ~4x slower on 2 CPU cores (46
                against 199 tokens/s). --hf_batching=none runs it without continuous batching (one
                `generate` at a time: 21 tokens/s there), for comparison.

The load: --clients concurrent clients, each sending --requests_per_client streaming chat completions one
after another (a closed loop), greedy (temperature 0), max_tokens --new_tokens, over instruction chats of
mixed lengths (annotate_speed.py's, from a fixed seed), through httpx2's server-sent events. Every pass has
chats of its own, and the warm-up others again (so no prompt repeats: transformers caches prefixes): the
warm-up sends --clients requests to each server first, covering every prompt-length bucket sft compiles for
the measured chats, so compilation and first use (sft's programs, transformers' cache allocation) are not
counted; its time is printed. The passes alternate which server goes first.

Counted per server: output tokens/s (the usage's completion tokens of every request of a pass over the
pass's wall time, the median over passes), request latency p50 and p99 (request sent to its last event,
all passes' requests pooled; with few requests p99 is about the slowest), time to first token p50 (to
the first event with text). ignore_eos is not standard, so either model may stop early at the end of
turn: the tokens each produced against the tokens asked and the requests that stopped are printed. The
greedy answers of the two are compared (the same weights; float32 near ties may part them). The target:
sft >= 2x transformers' tokens/s with a p99 latency no worse.

`transformers serve` needs `accelerate` (the `transformers[serving]` extra). The machine's load average
is printed before and after: with other work on the cores the figures are noisy. --quick: a 2-layer toy
model, 2 clients, 1 request each, 8 new tokens, 1 pass: a smoke test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.annotate_speed import chat_texts, make_chats, write_folder  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_PAGE = 256  # tokens per block of transformers' paged cache (ContinuousBatchingConfig.page_size)
START_TIMEOUT_S = 300
MODEL_NAME = "bench"  # sft's name for the model; transformers serve answers to the folder's path


@dataclasses.dataclass
class Reply:
  """One streamed request as the client saw it: seconds since the pass began, usage, answer."""

  start: float
  first: float | None = None  # the first event with text
  end: float = math.nan
  tokens: int = 0  # the usage's completion_tokens
  finish: str | None = None
  text: str = ""
  error: str | None = None


@dataclasses.dataclass
class Side:
  """What one server gave over the passes."""

  name: str
  tokens_per_s: list[float] = dataclasses.field(default_factory=list)
  replies: list[Reply] = dataclasses.field(default_factory=list)
  warmup_s: float = 0.0

  def latency(self, q: float) -> float:
    return float(np.percentile([r.end - r.start for r in self.replies], q))

  def ttft(self, q: float) -> float:
    return float(np.percentile([(r.first if r.first is not None else r.end) - r.start for r in self.replies], q))


# --- the model folder --------------------------------------------------------------------------------


def model_fields(args) -> dict:
  """transformers.LlamaConfig fields from the flags."""
  return dict(
      vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.mlp or 11 * args.d_model // 4,
      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
      head_dim=args.d_model // args.heads,
  )  # fmt: skip


def filler_words(n: int, seed: int = 0) -> list[str]:
  """Lines of random lowercase words: enough distinct merges for the BPE trainer to fill the vocabulary,
  so that every id the model can emit decodes to text."""
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  return [" ".join("".join(rng.choice(letters, int(rng.integers(3, 10)))) for _ in range(50)) for _ in range(n)]


def write_model(folder: pathlib.Path, fields: dict, chats) -> None:
  import tokenizers

  write_folder(folder, fields, chat_texts(chats) + filler_words(max(50, fields["vocab_size"] // 10)))
  size = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
  assert size == fields["vocab_size"], f"the tokenizer has {size} tokens, the model {fields['vocab_size']}"


def prompt_lengths(folder: pathlib.Path, chats) -> list[int]:
  """Each chat's prompt tokens as the chat template renders it (sft renders the same, annotate_speed.py checks)."""
  import transformers

  tok = transformers.AutoTokenizer.from_pretrained(folder)
  return [len(tok.apply_chat_template(c, add_generation_prompt=True, return_dict=False)) for c in chats]


# --- the servers -------------------------------------------------------------------------------------


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def sft_command(folder: pathlib.Path, port: int, args) -> list[str]:
  return [
      sys.executable, "-m", "sft.cli", "serve", "--config=serve", f"--workdir={folder}", f"--config.port={port}",
      f"--config.name={MODEL_NAME}", f"--config.slots={args.slots}", f"--config.context={args.context}",
      f"--config.decode_chunk={args.decode_chunk}", f"--config.max_tokens={max(args.new_tokens, 1024)}",
      f"--config.max_waiting={max(256, args.clients)}",
  ]  # fmt: skip


def hf_num_blocks(args) -> int:
  """Blocks of transformers' paged cache: twice the tokens of sft's cache (slots x context), a margin for
  its whole pages and for the free blocks it keeps before it admits a request."""
  return 2 * math.ceil(args.slots * args.context / HF_PAGE)


def hf_command(folder: pathlib.Path, port: int, args) -> list[str]:
  cmd = [
      sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--device", "cpu",
      "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
  ]  # fmt: skip
  if args.hf_batching == "continuous":
    cmd += ["--continuous-batching", "--cb-num-blocks", str(hf_num_blocks(args))]
    cmd += ["--cb-max-batch-tokens", str(args.hf_max_batch_tokens)] if args.hf_max_batch_tokens else []
  return cmd


@contextlib.contextmanager
def server(name: str, cmd: list[str], port: int, log_path: pathlib.Path, env: dict):
  """A server process, up once its /health answers 200; stopped (SIGTERM, then SIGKILL) on leaving."""
  import httpx2

  with open(log_path, "wb") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
  try:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
      if proc.poll() is not None or time.monotonic() > deadline:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{name} did not start (exit code {proc.returncode}); its log ends:\n{tail}")
      with contextlib.suppress(httpx2.TransportError):
        if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
          break
      time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/v1"
  finally:
    proc.terminate()
    try:
      proc.wait(30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


# --- the load ----------------------------------------------------------------------------------------


async def one_request(client, url: str, model: str, chat, max_tokens: int, t0: float) -> Reply:
  import httpx2

  body = {
      "model": model, "messages": chat, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
      "stream_options": {"include_usage": True},
  }  # fmt: skip
  reply = Reply(start=time.perf_counter() - t0)
  parts = []
  async with client.stream("POST", f"{url}/chat/completions", json=body) as response:
    if response.status_code != 200:
      reply.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
    else:
      async for event in httpx2.EventSource(response):
        if event.data == "[DONE]":
          break
        chunk = json.loads(event.data)
        if "error" in chunk:
          reply.error = str(chunk["error"])[:300]
          break
        for choice in chunk.get("choices") or ():
          text = (choice.get("delta") or {}).get("content")
          if text:
            reply.first = reply.first if reply.first is not None else time.perf_counter() - t0
            parts.append(text)
          reply.finish = choice.get("finish_reason") or reply.finish
        if chunk.get("usage"):
          reply.tokens = int(chunk["usage"]["completion_tokens"])
  reply.end = time.perf_counter() - t0
  reply.text = "".join(parts)
  return reply


async def run_load(url: str, model: str, chats, clients: int, max_tokens: int) -> tuple[list[Reply], float]:
  """The chats (in order) through `clients` concurrent clients, each sending its next one when the last one
  ended; (the replies in the chats' order, the wall seconds)."""
  import httpx2

  replies: list[Reply | None] = [None] * len(chats)
  queue = list(range(len(chats)))[::-1]
  limits = httpx2.Limits(max_connections=clients, max_keepalive_connections=clients)
  async with httpx2.AsyncClient(timeout=httpx2.Timeout(600.0), limits=limits) as client:
    t0 = time.perf_counter()

    async def worker():
      while queue:
        i = queue.pop()
        replies[i] = await one_request(client, url, model, chats[i], max_tokens, t0)

    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
  failed = [r.error for r in replies if r.error]
  if failed:
    raise RuntimeError(f"{len(failed)} of {len(chats)} requests failed at {url}, e.g. {failed[0]}")
  return replies, wall


# --- the run -----------------------------------------------------------------------------------------


def pick_warmup(pool, pool_lengths, measured_lengths, context: int, clients: int) -> list:
  """`clients` chats of `pool`: one per sft prompt bucket the measured chats use (so none compiles in a
  timed pass), then the next ones."""
  from sft.serve.engine import bucket_of

  wanted = {bucket_of(n, context) for n in measured_lengths}
  picked, rest = {}, []
  for chat, n in zip(pool, pool_lengths):
    b = bucket_of(n, context)
    if b in wanted and b not in picked:
      picked[b] = chat
    elif len(rest) < clients:
      rest.append(chat)
  missing = sorted(wanted - set(picked))
  assert not missing, f"no warm-up chat in the prompt buckets {missing}: draw more"
  return (list(picked.values()) + rest)[: max(clients, len(picked))]


def load_average() -> str:
  return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
  parser.add_argument("--requests_per_client", type=int, default=4, help="requests each client sends per pass")
  parser.add_argument("--new_tokens", type=int, default=128, help="max_tokens of every request")
  parser.add_argument("--passes", type=int, default=2, help="timed passes over each server, alternating")
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv_heads", type=int, default=2)
  parser.add_argument("--mlp", type=int, default=0, help="MLP width; 0: 11/4 of d_model")
  parser.add_argument("--vocab", type=int, default=4096)
  parser.add_argument("--slots", type=int, default=0, help="sft's slots (rows decoded together); 0: --clients")
  parser.add_argument("--decode_chunk", type=int, default=8, help="sft's decoding steps per device call")
  parser.add_argument("--context", type=int, default=512, help="sft's tokens per slot (prompt + answer)")
  parser.add_argument("--hf_batching", choices=("continuous", "none"), default="continuous")
  parser.add_argument(
      "--hf_max_batch_tokens", type=int, default=512, help="transformers' --cb-max-batch-tokens; 0: its own (8192)"
  )
  parser.add_argument("--quick", action="store_true", help="a 2-layer toy model, 2 clients x 1 request, 8 tokens")
  args = parser.parse_args(argv)
  if args.quick:
    args.clients, args.requests_per_client, args.new_tokens, args.passes = 2, 1, 8, 1
    args.d_model, args.layers, args.heads, args.kv_heads, args.mlp, args.vocab = 64, 2, 4, 2, 128, 2048
  args.slots = args.slots or args.clients
  for name in ("clients", "requests_per_client", "new_tokens", "passes", "d_model", "layers", "vocab", "slots"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be at least 1")
  if args.d_model % args.heads or args.heads % args.kv_heads:
    parser.error("--heads must divide --d_model, and --kv_heads divide --heads")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  if importlib.util.find_spec("accelerate") is None:
    sys.exit("FATAL transformers serve needs accelerate: pip install 'transformers[serving]'")
  import torch
  import transformers

  transformers.utils.logging.disable_progress_bar()
  per_pass = args.clients * args.requests_per_client
  before = load_average()
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    folder = tmp / "model"
    chats = make_chats(per_pass * args.passes + 8 * args.clients + 64, seed=0)
    write_model(folder, model_fields(args), chats)
    lengths = prompt_lengths(folder, chats)
    measured = [chats[p * per_pass : (p + 1) * per_pass] for p in range(args.passes)]
    measured_lengths = lengths[: per_pass * args.passes]
    longest = max(measured_lengths)
    if longest + args.new_tokens > args.context:
      sys.exit(f"FATAL a prompt of {longest} tokens and {args.new_tokens} new ones exceed --context={args.context}")
    pool = slice(per_pass * args.passes, None)
    warm = pick_warmup(chats[pool], lengths[pool], measured_lengths, args.context, args.clients)
    n_params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(folder).parameters())
    print(
        f"model: {n_params / 1e6:.1f}M parameters (vocab {args.vocab}, d_model {args.d_model}, {args.layers} layers, "
        f"{args.heads} heads / {args.kv_heads} kv heads), float32, random weights; per pass {per_pass} streaming chat "
        f"completions ({args.clients} clients x {args.requests_per_client}, each client's next request when its last "
        f"ended), prompts {min(measured_lengths)}-{longest} tokens (mean {np.mean(measured_lengths):.0f}), max_tokens "
        f"{args.new_tokens}, greedy; {args.passes} pass{'es' if args.passes > 1 else ''}, alternating which server "
        "goes first",
        flush=True,
    )
    blocks = hf_num_blocks(args)
    cb = "no continuous batching (one generate at a time)"
    if args.hf_batching == "continuous":
      cb = (
          f"continuous batching (paged attention, --cb-num-blocks {blocks}: {blocks * HF_PAGE} tokens of KV cache; "
          f"--cb-max-batch-tokens {args.hf_max_batch_tokens or 'its default'})"
      )
    print(f"sft serve: {args.slots} slots, context {args.context}, decode_chunk {args.decode_chunk}")
    print(
        f"transformers serve: {cb} on cpu; transformers {transformers.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )
    print(f"machine: {os.cpu_count()} CPUs, load average before {before}", flush=True)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    sides = {"sft": Side("sft serve"), "transformers": Side("transformers serve")}
    sft_port, hf_port = free_port(), free_port()
    with contextlib.ExitStack() as stack:
      urls = {
          "sft": stack.enter_context(
              server("sft serve", sft_command(folder, sft_port, args), sft_port, tmp / "sft.log", env)
          ),
          "transformers": stack.enter_context(
              server("transformers serve", hf_command(folder, hf_port, args), hf_port, tmp / "hf.log", env)
          ),
      }
      models = {"sft": MODEL_NAME, "transformers": str(folder)}
      for key, side in sides.items():
        start = time.perf_counter()
        asyncio.run(run_load(urls[key], models[key], warm, args.clients, args.new_tokens))
        side.warmup_s = time.perf_counter() - start
      print(
          f"warm-up ({len(warm)} requests on other chats, every sft prompt bucket of the measured ones; compilation "
          f"and first use, not counted): sft {sides['sft'].warmup_s:.2f} s, transformers "
          f"{sides['transformers'].warmup_s:.2f} s",
          flush=True,
      )
      answers: dict[str, list[Reply]] = {"sft": [], "transformers": []}
      for p, pass_chats in enumerate(measured):
        order = ["sft", "transformers"] if p % 2 == 0 else ["transformers", "sft"]
        for key in order:
          replies, wall = asyncio.run(run_load(urls[key], models[key], pass_chats, args.clients, args.new_tokens))
          sides[key].tokens_per_s.append(sum(r.tokens for r in replies) / wall)
          sides[key].replies += replies
          answers[key] += replies
          print(
              f"pass {p + 1}: {sides[key].name}: {sum(r.tokens for r in replies)} output tokens in {wall:.2f} s: "
              f"{sides[key].tokens_per_s[-1]:.1f} tokens/s",
              flush=True,
          )
    return report(args, sides, answers, before)


def report(args, sides: dict[str, Side], answers, before: str) -> dict:
  asked = args.clients * args.requests_per_client * args.passes * args.new_tokens
  result = {"clients": args.clients, "new_tokens": args.new_tokens, "load_before": before}
  for key, side in sides.items():
    tps = statistics.median(side.tokens_per_s)
    produced = sum(r.tokens for r in side.replies)
    early = [r for r in side.replies if r.tokens < args.new_tokens]
    print(
        f"{side.name}: {tps:.1f} output tokens/s (median of {[round(x, 1) for x in side.tokens_per_s]}); request "
        f"latency p50 {side.latency(50):.3f} s, p99 {side.latency(99):.3f} s; time to first token p50 "
        f"{side.ttft(50):.3f} s"
    )
    print(
        f"{side.name}: output tokens (usage) {produced} of {asked} asked; {len(early)} of {len(side.replies)} requests "
        f"ended before max_tokens ({', '.join(sorted({str(r.finish) for r in early})) or 'none'})"
    )
    if produced < 0.95 * asked:
      print(f"NOTE: {side.name} produced {produced / asked:.0%} of the tokens asked: its model stopped early")
    result[key] = {
        "tokens_per_s": tps, "tokens_per_s_passes": side.tokens_per_s, "p50_s": side.latency(50),
        "p99_s": side.latency(99), "ttft_p50_s": side.ttft(50), "tokens": produced, "asked": asked,
        "ended_early": len(early), "warmup_s": side.warmup_s,
    }  # fmt: skip
  ours, theirs = result["sft"], result["transformers"]
  ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
  p99 = ours["p99_s"] / theirs["p99_s"]
  ttft = ours["ttft_p50_s"] / theirs["ttft_p50_s"]
  print(
      f"ratio (sft / transformers): {ratio:.2f}x tokens/s, p99 latency {p99:.2f}x, time to first token p50 {ttft:.2f}x"
  )
  met = ratio >= 2 and p99 <= 1
  print(
      f"target (>= 2x tokens/s, p99 latency no worse): {'met' if met else 'not met'} (tokens/s {ratio:.2f}x "
      f"{'>=' if ratio >= 2 else '<'} 2x, p99 {p99:.2f}x {'<=' if p99 <= 1 else '>'} 1x)"
  )
  equal = sum(a.text == b.text for a, b in zip(answers["sft"], answers["transformers"]))
  print(f"greedy answers equal: {equal} of {len(answers['sft'])}")
  print(f"machine load average before {before}, after {load_average()}")
  result.update(ratio=ratio, p99_ratio=p99, ttft_ratio=ttft, target_met=met, answers_equal=equal)
  return result


if __name__ == "__main__":
  main()
