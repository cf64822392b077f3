"""Thin wrapper of ``var-train`` (works with ``torchrun scripts/train.py <subcommand> ...``)."""
import sys

from var.cli.train import cli

if __name__ == "__main__":
    sys.exit(cli())
