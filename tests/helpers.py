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


class HostReads:
    """Count the host read-backs of device values while active (a CPU stand-in for
    ``torch.cuda.set_sync_debug_mode``): ``.item()/.tolist()``, ``bool/int/float()`` of a tensor, ``nonzero`` and
    other ops whose output size depends on the data. ``with HostReads() as reads: ...; reads.count``."""

    NAMES = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere", "unique",
             "bincount", "masked_select", "unique_consecutive"}

    def __enter__(self):
        from torch.overrides import TorchFunctionMode

        counter = self
        self.count, self.names = 0, []

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", "")
                data_dependent = name in HostReads.NAMES or (
                    name == "repeat_interleave" and isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"),
                                                               torch.Tensor) and kwargs.get("output_size") is None)
                if name == "__getitem__" and len(args) > 1:  # boolean-mask indexing has a data-dependent size
                    index = args[1] if isinstance(args[1], tuple) else (args[1],)
                    data_dependent = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
                if data_dependent:
                    counter.count += 1
                    counter.names.append(name)
                return func(*args, **kwargs)

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
