"""python launch.py --config=configs/eval.py --workdir=/tmp/sft-eval \
     --config.eval.model_workdir=/tmp/sft-quickstart --config.data.dir=/tmp/sft-quickstart/data

Evaluates a model without training it and writes <workdir>/eval/report.md (metrics per task and over
all tasks, the best and worst answers, a confusion matrix PNG per classification task) and
<workdir>/eval/results.json.

The model: --config.eval.model_workdir=<a training workdir> (its latest checkpoint, built as its
config.json says), or --config.model.checkpoint=<a Hugging Face folder>.
The records: the validation split of a data build (--config.data.dir, the default source "dir"), or
--config.eval.files="('a.jsonl', 'b.csv')" in any format the data builder reads.
Every figure carries a 95% interval and its item count. With --config.eval.compare_to=<a second training
workdir or Hugging Face folder>, both models answer the same records; <workdir>/eval/compare.md and
compare.json give B - A per task and metric, with paired-bootstrap intervals and McNemar's exact test.
"""

from sft.config import base_config


def get_config():
  c = base_config()
  c.job = "eval"
  c.data.source = "dir"
  c.data.dir = ""  # a data build's output folder, e.g. <workdir>/data of a quickstart run
  # and the model, on the command line: --config.eval.model_workdir or --config.model.checkpoint
  c.train.pretrain_steps = 0  # nothing is trained: the pretraining split is not read
  c.eval.num_generations = -1  # every record is answered
  c.eval.max_new_tokens = 64
  return c
