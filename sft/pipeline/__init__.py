"""The input pipeline: records -> token arrays with the response-only loss mask (`transforms`), grain
packing and batching (`dataset`), and a view of the packed rows (`inspect`). The tokenizers it calls are
`sft.tokenizer`'s.

The grain parts load on first use: importing `sft.pipeline.inspect` alone (the data builder's report does)
should not pay for grain.
"""

_GRAIN = {
    "SplitFit": "dataset",
    "split_fit": "dataset",
    "empty_batch": "dataset",
    "eval_batches": "dataset",
    "pad_batch": "dataset",
    "train_dataset": "dataset",
    "TokenizeAndShift": "transforms",
    "shift_and_truncate": "transforms",
    "tokenize_record": "transforms",
}


def __getattr__(name):
  if name in _GRAIN:
    if _GRAIN[name] == "dataset":
      from sft.pipeline import dataset as module  # noqa: PLC0415
    else:
      from sft.pipeline import transforms as module  # noqa: PLC0415
    return getattr(module, name)
  raise AttributeError(f"module 'sft.pipeline' has no attribute {name!r}")
