"""Thin wrapper: ``python scripts/compare_llamagen_t2i.py --help`` is ``var-bench original-llamagen-t2i --help`` (logic in var.eval)."""
import sys

from var.cli.bench import cli

if __name__ == "__main__":
    sys.exit(cli(["original-llamagen-t2i", *sys.argv[1:]]))
