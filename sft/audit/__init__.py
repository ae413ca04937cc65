"""The data audit: how good a finished data build is, measured on a reviewed sample of its records.

    import sft
    from configs import audit
    config = audit.get_config()
    config.build_dir = "/data/sft"
    sft.audit(config, "/data/sft-audit")                     # mode "sample": review.csv to fill
    config.mode, config.reviews = "score", ("/data/sft-audit/review.csv",)
    sft.audit(config, "/data/sft-audit")                     # report.md, results.json

data (the build's records and strata) -> sample (rows to review) -> judge (a model fills them) ->
review (filled files read back) -> score (the figures) -> report; job runs a mode. docs/audit.md says what
each figure means.
"""

import sys
import types


def run(config, workdir, *, annotator=None):
  """`sft.audit.job.run`: the audit `config.mode` describes, its files in `workdir`."""
  from sft.audit.job import run as run_job  # noqa: PLC0415 (importing the package stays cheap)

  return run_job(config, workdir, annotator=annotator)


class _Callable(types.ModuleType):
  """The package and the job share the name `sft.audit`: calling the package runs the job."""

  def __call__(self, config, workdir, *, annotator=None):
    return run(config, workdir, annotator=annotator)


sys.modules[__name__].__class__ = _Callable
