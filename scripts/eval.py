"""Thin wrapper: ``python scripts/eval.py sample|metrics --help`` (same as ``var-eval``; works under torchrun)."""
import sys

from var.cli.eval import cli

if __name__ == "__main__":
    sys.exit(cli())
