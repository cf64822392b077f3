"""Small bundled models (safetensors + config) that ``var-sample`` uses when no checkpoint is given."""
from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent


def bundled_var_dir() -> Path | None:
    """Directory with ``tokenizer/`` and ``transformer/`` of the bundled VAR model, if it is installed."""
    path = ASSETS_DIR / "var_bundled"
    return path if (path / "transformer" / "config.json").exists() else None


def bundled_ar_dir() -> Path | None:
    """Directory with ``tokenizer/`` and ``transformer/`` of the bundled next-token (LlamaGen-style) model, if any."""
    path = ASSETS_DIR / "ar_bundled"
    return path if (path / "transformer" / "config.json").exists() else None


def bundled_t2i_dir() -> Path | None:
    """Directory with ``transformer/`` and ``text_encoder/`` of the bundled text-to-image model (its tokenizer is
    ``ar_bundled``'s), if it is installed."""
    path = ASSETS_DIR / "t2i_bundled"
    return path if (path / "text_encoder" / "config.json").exists() else None
