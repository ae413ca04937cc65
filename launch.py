"""Runs one experiment: a config file, a workdir, and overrides on the command line.

  python launch.py --config=configs/quickstart.py --workdir=/tmp/sft-quickstart --config.train.sft_steps=50

The same as the `sft` command that `pip install -e .` puts on the PATH; the logic is in sft/cli.py.
"""

from sft.cli import main

if __name__ == "__main__":
  main()
