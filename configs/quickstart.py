"""python launch.py --config=configs/quickstart.py --workdir=/tmp/sft-quickstart

Raw text to a fine-tuned model on CPU in a few minutes, with a model that visibly learns.

Data: the signatures and docstrings of this Python's standard library, read from its source files
and passed through the data builder (cleaning, Gopher filters, exact and near dedup; report and
manifest in <workdir>/data). Four tasks about each documented API, every answer following from its
prompt, so a model trained from scratch can answer for APIs it never saw (sft/databuilder/stdlib_tasks.py):

    summarisation   "Summarise in one sentence:\\n\\n<the docstring's first sentences>"  -> its first sentence
    extraction      "List the parameter names of `dumps(obj, *, skipkeys=False)`."    -> "obj, skipkeys"
    qa              "In `dumps(obj, *, skipkeys=False)`, what is the default value of `skipkeys`?"  -> "False"
    classification  "In module `json`, is `JSONEncoder.encode` a function, a class or a method?"  -> "method"

A short next-token pretraining phase on the raw docstrings (the `pretrain` split, which also trains
the tokenizer), then SFT with the loss on answer tokens only; summarisation and extraction are learnt
once the model can copy from its prompt, which takes most of the run. Held-out APIs (chosen by a hash
of their module and top-level name) are never trained on; their response loss and the metrics of each
task (accuracy, ROUGE, exact match, token F1) are reported, in <workdir>/eval/report.md at the end.
Run it again with the same --workdir to resume.
"""

from sft.config import base_config


def get_config():
  c = base_config()
  c.data.build.stdlib = True
  # API docs are code as much as prose: language identification would judge signatures, not language.
  c.data.build.filter.language.enabled = False
  c.data.build.output.validation_fraction = 0.05  # of APIs (by a hash of the module and top-level name)
  # A 0.75M-parameter model: about a quarter of a second per step on two otherwise idle CPU cores.
  c.model.d_model = 128
  c.model.num_layers = 3
  c.model.num_heads = 4
  c.model.num_kv_heads = 4
  c.model.head_dim = 32
  c.model.mlp_dim = 256
  c.train.seq_len = 128
  c.train.batch_size = 16
  c.train.pretrain_steps = 50
  c.train.sft_steps = 900
  c.train.lr = 5e-3
  c.eval.every_steps = 300
  c.eval.compare_pretrained = True  # eval/compare.md: the final model against the one after pretraining
  c.checkpoint.every_steps = 300
  return c
