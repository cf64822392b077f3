"""Thin wrapper: ``python scripts/sample.py --help`` (same as ``var-sample``)."""
import sys

from var.cli.sample import cli

if __name__ == "__main__":
    sys.exit(cli())
