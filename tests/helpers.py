"""Shared builders for the VAR tests (tiny presets with non-trivial random weights)."""
import torch

from var.models import create


def tiny_var_pair(seed: int = 0, **var_overrides):
    """(tokenizer, model) of the tiny presets, eval mode, weights initialised like a training run."""
    torch.manual_seed(seed)
    tok = create("msvq_tiny").eval()
    model = create("var_tiny", **var_overrides).eval()
    model.init_weights(init_adaln_gamma=0.5, init_head=1.0)  # strong gammas/head: every path matters
    return tok, model


def random_indices(tok, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, tok.vocab_size, (batch, pn, pn), generator=g) for pn in tok.patch_nums]
