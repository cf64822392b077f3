"""Logits processing shared by every sampler: CFG mixing, temperature, top-k / top-p, seeded draws.

All functions are pure (they never modify their inputs) so that a speculative sampler's draft and target
distributions are computed by exactly the same code. Shapes: logits are ``[..., V]``.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from var.errors import ConfigError, NonFiniteLogitsError

GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]


MIN_TEMPERATURE = 1e-4  # logits / temperature stays finite in fp32 for any logit below ~3e34


def check_sampling_args(top_k: int, top_p: float, temperature: float) -> None:
    """Raise :class:`ConfigError` naming the first out-of-range sampling knob."""
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0, or a value >= the vocabulary size, disables it), got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ConfigError(f"top_p must be in [0, 1] (0 or 1 disables it), got {top_p}")
    if not (MIN_TEMPERATURE <= temperature and math.isfinite(temperature)):
        raise ConfigError(f"temperature must be a finite number >= {MIN_TEMPERATURE:g} (smaller ones overflow the "
                          f"logits; top_k=1 samples greedily), got {temperature}")


def check_guidance(cfg: float, minimum: float, convention: str, name: str = "cfg") -> None:
    """Classifier-free guidance ``name`` must be finite and at least ``minimum`` (0 for VAR, 1 for LlamaGen)."""
    if not (isinstance(cfg, (int, float)) and minimum <= cfg and math.isfinite(cfg)):
        raise ConfigError(f"{name} must be a finite number >= {minimum:g} ({convention}), got {cfg}")


def apply_cfg(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, guidance) -> torch.Tensor:
    """Classifier-free guidance ``w * cond - (w - 1) * uncond`` (w = 1: conditional only).

    ``guidance`` is a float or a tensor broadcastable to the logits (e.g. a per-sample weight ``[B, 1, 1]``).
    """
    return guidance * cond_logits - (guidance - 1) * uncond_logits


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Mask (set to -inf) the tokens outside the top-k and outside the top-p nucleus; returns a new tensor.

    top-k keeps every token tied with the k-th largest logit; top-p removes the tokens whose ascending
    cumulative probability is <= 1 - top_p but always keeps the most likely one (VAR's and LlamaGen's rule).
    ``top_k=0`` and ``top_p`` in {0, 1} disable the respective filter.
    """
    vocab = logits.shape[-1]
    out = logits
    if 0 < top_k < vocab:
        kth_largest = logits.topk(top_k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        out = out.masked_fill(out < kth_largest, -math.inf)
    if 0.0 < top_p < 1.0:
        sorted_logits, sorted_idx = out.sort(dim=-1, descending=False)
        cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum_probs <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        out = out.masked_fill(remove, -math.inf)
    return out


TEMPERATURE_ORDERS = ("before_filter", "after_filter")


def processed_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                     temperature_order: str = "before_filter") -> torch.Tensor:
    """Temperature and top-k/top-p, in fp32: the logits whose softmax is the sampling distribution.

    ``temperature_order="before_filter"`` divides by the temperature, then filters (LlamaGen, VAR); ``"after_filter"``
    filters the raw logits, then divides (the CoDe release). The order changes the top-p nucleus, not top-k.
    """
    if temperature_order not in TEMPERATURE_ORDERS:
        raise ConfigError(f"temperature_order must be one of {TEMPERATURE_ORDERS}, got {temperature_order!r}")
    logits = logits.float()
    if temperature_order == "after_filter":
        filtered = top_k_top_p_filter(logits, top_k, top_p)
        return filtered / temperature if temperature != 1.0 else filtered
    if temperature != 1.0:
        logits = logits / temperature
    return top_k_top_p_filter(logits, top_k, top_p)


def logits_to_probs(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 0.0) -> torch.Tensor:
    """The sampling distribution ``[..., V]`` (fp32, rows sum to 1) after temperature and top-k/top-p."""
    return processed_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)


def check_finite(logits: torch.Tensor, where: str) -> None:
    """Raise :class:`NonFiniteLogitsError` if ``logits`` hold NaN or +-inf (reads the answer back at once: a
    sampling loop uses a deferred :class:`FiniteCheck` instead)."""
    if not torch.isfinite(logits).all():
        raise NonFiniteLogitsError(f"non-finite logits at {where} (NaN/inf: check the weights and the dtype)")


class FiniteCheck:
    """The finiteness check of a sampling loop's logits, kept on the device: :meth:`update` records (without a host
    synchronisation) the first check that saw NaN/inf; :meth:`raise_if_failed` reads that one number back, once at
    the end or folded into a read-back the loop makes anyway (:meth:`first_failure`). ``deferred=False`` raises in
    :meth:`update` (the immediate behaviour of :func:`check_finite`)."""

    def __init__(self, deferred: bool = True):
        self.deferred = deferred
        self.wheres: list[str] = []
        self._first: torch.Tensor | None = None  # 0-d long on the device: index into wheres, -1 = all finite

    def update(self, x: torch.Tensor, where: str) -> torch.Tensor:
        """Record whether ``x`` is finite; returns the per-row flags ``[rows, ...]`` (all but the last dim) so a
        caller can keep a non-finite row from reaching a draw."""
        if not self.deferred:
            check_finite(x, where)
            return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        finite_rows = torch.isfinite(x).all(dim=-1)
        index = len(self.wheres)
        self.wheres.append(where)
        bad = torch.where(finite_rows.all(), -1, index)
        self._first = bad if self._first is None else torch.where(self._first >= 0, self._first, bad)
        return finite_rows

    def first_failure(self) -> torch.Tensor | None:
        """The device-side index of the first failed check (-1: none yet), to read back with other numbers."""
        return self._first

    def raise_if_failed(self, first: int | None = None) -> None:
        """Raise :class:`NonFiniteLogitsError` naming the first failed check; ``first`` is :meth:`first_failure`
        already read back (else it is read here: one synchronisation)."""
        if first is None:
            first = int(self._first) if self._first is not None else -1
        if first >= 0:
            raise NonFiniteLogitsError(f"non-finite logits at {self.wheres[first]} (NaN/inf: check the weights, the "
                                       "dtype, cfg and the temperature)")


def _as_generator_list(generator: GeneratorArg, batch: int):
    if generator is None or isinstance(generator, torch.Generator):
        return None
    gens = list(generator)
    if len(gens) != batch:
        raise ConfigError(f"got {len(gens)} generators for a batch of {batch}: pass one per sample or a single one")
    return gens


def multinomial(probs: torch.Tensor, generator: GeneratorArg = None, *,
                finite: FiniteCheck | None = None) -> torch.Tensor:
    """Draw one index per row of ``probs [B, ..., V]`` -> LongTensor ``[B, ...]``.

    ``generator`` is one ``torch.Generator`` for the whole batch or a list with one per sample (then sample b
    uses only generator b, so a batch of N equals N single runs). Non-finite probabilities (e.g. guidance or the
    temperature pushed the logits to inf) raise :class:`NonFiniteLogitsError` at once, or, with a deferred
    ``finite`` check, are recorded there and the row draws from a uniform stand-in (no host synchronisation; the
    sampler raises when it reads the check).
    """
    batch, vocab = probs.shape[0], probs.shape[-1]
    if finite is None:
        if not torch.isfinite(probs).all():
            raise NonFiniteLogitsError("non-finite sampling probabilities (NaN/inf): check cfg, temperature, the "
                                       "weights and the dtype")
    else:  # torch.multinomial must never see a NaN row (an error on the CPU, a device assert on CUDA)
        ok = finite.update(probs, "the sampling probabilities")[..., None] & (probs.sum(-1, keepdim=True) > 0)
        probs = torch.where(ok, probs, torch.ones_like(probs))
    gens = _as_generator_list(generator, batch)
    if gens is None:
        return _draw_one(probs, generator)
    return torch.stack([_draw_one(probs[b], g) for b, g in enumerate(gens)], dim=0)


def _draw_one(probs: torch.Tensor, generator) -> torch.Tensor:
    """``torch.multinomial(probs, 1, replacement=True)`` per row, without its two host read-backs (it checks the
    rows for inf/NaN/negatives and zero sums with ``.item()``): its own one-sample algorithm, ``argmax(p / E)`` with
    ``E ~ Exp(1)`` drawn by ``exponential_`` on the generator, so the draws and the generator's state afterwards are
    the same (tested); the rows' validity is the caller's check (``finite``)."""
    exponential = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / exponential).argmax(dim=-1)


def rand_like_per_sample(shape, generator: GeneratorArg, device, dtype=torch.float32) -> torch.Tensor:
    """Uniform [0, 1) noise of ``shape`` ([B, ...]) drawn from one generator or one generator per sample."""
    gens = _as_generator_list(generator, shape[0])
    if gens is None:
        return torch.rand(shape, generator=generator, device=device, dtype=dtype)
    return torch.stack([torch.rand(shape[1:], generator=g, device=device, dtype=dtype) for g in gens], dim=0)


def sample_from_uniform(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: one index per row of ``probs [..., V]`` from the uniforms ``u [...]`` in [0, 1).

    A sampler that must give each sample a random stream independent of the batch draws a fixed number of
    uniforms per step and maps them through this (``torch.multinomial``'s consumption depends on the shape).
    The CDF is accumulated in fp64; a zero-probability index is never returned.
    """
    cdf = probs.double().cumsum(dim=-1)
    target = u.double()[..., None] * cdf[..., -1:]
    index = torch.searchsorted(cdf, target, right=True)[..., 0]  # first index whose cdf exceeds the target
    last_positive = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)  # guards u * total rounding up
    return torch.minimum(index, last_positive)


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: GeneratorArg = None) -> torch.Tensor:
    """Soft Gumbel-softmax sample ``softmax((logits + g) / tau)``, ``g = -log(Exp(1))`` drawn with
    ``exponential_`` on the generator(s) (VAR's ``more_smooth`` noise, so seeded runs match the original)."""
    gens = _as_generator_list(generator, logits.shape[0])
    if gens is None:
        exponential = torch.empty_like(logits, dtype=torch.float32).exponential_(generator=generator)
    else:
        exponential = torch.stack([torch.empty_like(logits[b], dtype=torch.float32).exponential_(generator=g)
                                   for b, g in enumerate(gens)])
    return F.softmax((logits.float() - exponential.log()) / tau, dim=-1)


def constrain_logits(logits_BNV: torch.Tensor, coarse_BN: torch.Tensor, members_KV: torch.Tensor) -> torch.Tensor:
    """Set the logits of codes outside each position's coarse cluster to -inf (new tensor; CTF's stage 2)."""
    return logits_BNV.masked_fill(~members_KV[coarse_BN], float("-inf"))
