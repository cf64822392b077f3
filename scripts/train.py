"""Thin wrapper of ``var-train`` (works with ``torchrun scripts/train.py <subcommand> ...``)."""
import sys

from var.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
