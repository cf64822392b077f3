"""Evaluation: sample export (PNG folders, ADM ``.npz``), distributed sampling, FID/IS/KID/precision/recall.

Submodules are imported on use (``var.eval.metrics``, ``var.eval.export``, ``var.eval.distributed``, ...), so that
``import var.eval`` stays cheap and optional dependencies (torch-fidelity, matplotlib) are only needed when used.
"""
