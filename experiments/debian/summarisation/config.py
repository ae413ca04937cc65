"""python launch.py --config=experiments/debian/summarisation/config.py --workdir=/tmp/debian-summarisation

Long description -> one-line synopsis of Debian packages (ROUGE). A 2M-parameter model is pretrained
briefly on other packages' descriptions, then fine-tuned, on CPU.
Make the data first: python experiments/debian/make_data.py. Results: results.md beside this file.
"""

import pathlib

from sft.config import base_config
from sft.errors import ConfigError

RAW = pathlib.Path(__file__).resolve().parent.parent / "raw" / "summarisation"


def get_config():
  if not any(RAW.glob("*.jsonl")):
    raise ConfigError(f"{RAW} holds no data: make it with python experiments/debian/make_data.py (it needs apt's English package lists)")
  c = base_config()
  c.data.build.stdlib = False
  c.data.build.input_dir = str(RAW)
  c.data.build.filter.gopher.min_words_to_apply = 1000  # web-page rules; every description is under 150 words
  c.data.build.output.validation_fraction = 0.1
  c.model.d_model = 192
  c.model.num_layers = 4
  c.model.num_heads = 3
  c.model.num_kv_heads = 1
  c.model.head_dim = 64
  c.model.mlp_dim = 512
  c.train.seq_len = 256
  c.train.batch_size = 16
  c.train.pretrain_steps = 150  # next-token steps on other packages' descriptions (pretrain.jsonl)
  c.train.sft_steps = 300
  c.train.lr = 3e-3
  c.eval.every_steps = 150
  c.eval.num_generations = 128
  c.eval.max_new_tokens = 32
  c.checkpoint.every_steps = 150
  return c
