"""`python -m sft`: the `sft` command (sft/cli.py)."""

from sft.cli import main

main()
