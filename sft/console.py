"""Progress lines on stdout, also in a notebook that configured no logging."""

import logging
import sys

log = logging.getLogger("sft")


def ensure_console_handler() -> None:
  if not log.handlers:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
