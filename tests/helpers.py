"""Shared builders for the tests (tiny presets with non-trivial random weights, released key dumps) and the
chi-square exactness check of the next-token samplers."""
import ast
import itertools
import math

import torch

from var.models import GPT, GPTConfig, create


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


def key_spec(path) -> dict:
    """Meta tensors with the keys/shapes of a key dump (``key (shape)`` per line, printed from original modules)."""
    sd = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape = line.split(" ", 1)
            sd[key] = torch.empty(ast.literal_eval(shape), device="meta")
    return sd


def preset_gpt(name: str = "gpt_tiny", seed: int = 0, output_std: float = 0.5, **overrides):
    """A GPT preset in eval mode with a random head (LlamaGen zero-inits it: make the logits matter)."""
    torch.manual_seed(seed)
    model = create(name, **overrides).eval()
    torch.nn.init.normal_(model.output.weight, std=output_std)
    return model


def tiny_gpt(seed: int = 0, output_std: float = 0.3, embed_std: float | None = None, **config) -> GPT:
    """A 2-layer GPT (width 64, 4 heads, 10 classes, vocabulary 64, 4 x 4 grid unless ``config`` says otherwise),
    eval mode, with a random head (and token embeddings of std ``embed_std`` when given)."""
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(**{"dim": 64, "n_layer": 2, "n_head": 4, "multiple_of": 32, "num_classes": 10,
                           "vocab_size": 64, "grid_size": 4, **config}))
    torch.nn.init.normal_(gpt.output.weight, std=output_std)
    if embed_std is not None:
        torch.nn.init.normal_(gpt.tok_embeddings.weight, std=embed_std)
    return gpt.eval()


def exactness_gpt(vocab: int, grid: int) -> GPT:
    """The exactness tests' GPT: small enough to enumerate every ``vocab^(grid^2)`` image, with strong head and
    embeddings so its joint distribution is far from uniform."""
    return tiny_gpt(seed=3, output_std=0.6, embed_std=1.0, dim=32, n_head=2, multiple_of=16, num_classes=3,
                    vocab_size=vocab, grid_size=grid)


def class_rows(model, label: int):
    """``rows(n)`` -> (class ``label``, null class) inputs of ``n`` rows, for :func:`exact_distribution`."""
    return lambda n: (torch.full((n,), label), torch.full((n,), model.null_class))


@torch.no_grad()
def exact_distribution(model, rows, cfg_scale, temperature, top_k=0, top_p=0.0) -> dict:
    """``{sequence: probability}`` of every sequence of the model's grid by teacher forcing, with guidance,
    temperature, top-k and top-p written out here (not taken from the samplers). ``rows(n)``: the (conditional,
    unconditional) model inputs of ``n`` rows."""
    vocab, grid = model.config.vocab_size, model.config.grid_size
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=grid * grid)))
    logp = []
    for chunk in seqs.split(4096):
        cond, uncond = rows(len(chunk))
        cond_logits, uncond_logits = model(cond, chunk), model(uncond, chunk)
        logits = (uncond_logits + cfg_scale * (cond_logits - uncond_logits)) / temperature
        if top_k:
            kth = logits.sort(dim=-1, descending=True).values[..., top_k - 1:top_k]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if top_p:
            sorted_p, order = logits.softmax(-1).sort(dim=-1, descending=False)
            drop_sorted = sorted_p.cumsum(-1) <= 1 - top_p
            drop_sorted[..., -1] = False
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -math.inf)
        logp.append(logits.log_softmax(-1).gather(-1, chunk[..., None])[..., 0].sum(-1))
    return {tuple(s.tolist()): p for s, p in zip(seqs, torch.cat(logp).exp().tolist())}


def chi_square_pvalue(tokens, exact: dict) -> float:
    """Chi-square goodness of fit of sampled token rows against :func:`exact_distribution` (cells with fewer than
    5 expected samples pooled into one)."""
    from scipy.stats import chisquare

    counts = {}
    for row in tokens.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert all(exact[s] > 0 for s in counts), "sampled a sequence of probability zero"
    n = tokens.shape[0]
    observed, expected, pool_o, pool_e = [], [], 0, 0.0
    for s in sorted(exact, key=exact.get, reverse=True):
        if exact[s] * n >= 5:
            observed.append(counts.get(s, 0))
            expected.append(exact[s] * n)
        else:
            pool_o, pool_e = pool_o + counts.get(s, 0), pool_e + exact[s] * n
    if pool_e > 0:
        observed.append(pool_o)
        expected.append(pool_e)
    scale = sum(observed) / sum(expected)
    return chisquare(observed, [e * scale for e in expected]).pvalue
