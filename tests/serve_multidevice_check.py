"""Run in a fresh process with 8 fake CPU devices: `sft serve`'s engine over a mesh of 8 (the slots sharded
over the data axis) answers as on one device. Prints one JSON line: the greedy tokens of each prompt, and
each prompt's scored log-probabilities; tests/test_serve_engine.py compares it with its own process's."""

import os
import sys

if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import pathlib  # noqa: E402
import threading  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PROMPTS = [[5, 9, 13, 200, 7], list(range(30, 70)), [300, 301, 302], list(range(100, 120)), [44] * 9]


def answers(folder: pathlib.Path, slots: int) -> dict:
  """Greedy answers (12 tokens at most) and scored log-probabilities of PROMPTS, through the engine."""
  from sft.serve import loading  # noqa: PLC0415
  from sft.serve.engine import Engine, Job, Sampling  # noqa: PLC0415

  model = loading.load_model(folder, "hf", slots, 128, "slots")
  engine = Engine(model, slots=slots, chunk=4, max_waiting=64, context=128)
  results = [dict(tokens=[], done=threading.Event()) for _ in range(2 * len(PROMPTS))]

  def emit(i):
    def on(kind, value):
      if kind == "token":
        results[i]["tokens"].append(value.id)
      elif kind == "scored":
        results[i]["tokens"] = [round(x, 4) for x in value[0][1:]]
        results[i]["done"].set()
      else:
        results[i]["end"] = [kind, value]
        results[i]["done"].set()
    return on

  for i, prompt in enumerate(PROMPTS):
    engine.submit(Job(prompt, emit=emit(i), sampling=Sampling(max_tokens=12)))
    engine.submit(Job(prompt, emit=emit(len(PROMPTS) + i), score=True))
  engine.start()
  for r in results:
    assert r["done"].wait(300)
  engine.stop(5)
  return {"devices": len(model.run.mesh.devices.flat), "tokens": [r["tokens"] for r in results[: len(PROMPTS)]],
          "logprobs": [r["tokens"] for r in results[len(PROMPTS):]]}


if __name__ == "__main__":
  print(json.dumps(answers(pathlib.Path(sys.argv[1]), 8)))
