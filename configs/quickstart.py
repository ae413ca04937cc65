"""python launch.py --config=configs/quickstart.py --workdir=/tmp/sft-quickstart

Raw text to a fine-tuned model on CPU in a few minutes.

Data: the signatures and docstrings of this Python's standard library, read from its source files
and passed through the data builder (cleaning, Gopher filters, exact and near dedup; report and
manifest in <workdir>/data).
A short next-token pretraining phase on that raw text, then SFT on questions about the APIs
("What does `json.dumps` do?", "Which module defines `dumps`?", "What is the signature of ...?"),
with the loss on answer tokens only. Held-out APIs (chosen by a hash of their name) measure response
loss and exact match; their questions are never trained on, while the raw pretraining text covers every
API, as a pretrained model's corpus would. Run it again with the same --workdir to resume.
"""

from sft.config import base_config


def get_config():
  c = base_config()
  c.data.build.stdlib = True
  # API docs are code as much as prose: language identification would judge signatures, not language.
  c.data.build.filter.language.enabled = False
  c.data.build.output.validation_fraction = 0.05  # of APIs (by a hash of the module and top-level name)
  # A 2M-parameter model: about half a second per step on two CPU cores.
  c.model.d_model = 192
  c.model.num_layers = 4
  c.model.num_heads = 3
  c.model.num_kv_heads = 1
  c.model.head_dim = 64
  c.model.mlp_dim = 512
  c.train.seq_len = 128
  c.train.batch_size = 16
  c.train.pretrain_steps = 100
  c.train.sft_steps = 300
  c.train.lr = 3e-3
  c.eval.every_steps = 100
  c.checkpoint.every_steps = 100
  return c
