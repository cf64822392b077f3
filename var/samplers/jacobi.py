"""Speculative Jacobi decoding (SJD, Teng et al. 2024) and its relatives for next-token image GPTs.

One forward pass verifies a window of ``L - 1`` draft tokens after the last committed token:

* input ``w_0`` = last committed token, ``w_j`` = draft of the ``j``-th next token (recorded with the exact
  distribution ``q_j`` it was drawn from: a one-hot for fresh initial drafts, the previous pass's target
  otherwise); the pass yields the processed target ``p_i`` (CFG, temperature, top-k/top-p via
  :class:`~var.samplers.next_token.TokenProcessor`) of each window position;
* drafts are checked left to right: accept with probability ``min(1, p(x) / q(x))``; at the first rejection the
  token is resampled from ``norm(max(0, p - q))`` (no second temperature) and the pass ends; if every draft is
  accepted a bonus token is drawn from the last ``p``. This is modified rejection sampling per position, so the
  output distribution is exactly the plain sampler's (:func:`sample_sjd`).
* The next window keeps the unaccepted positions' new samples as drafts (with their ``p`` as ``q``) and appends
  fresh drafts (``init``: ``random`` uniform tokens, ``repeat_horizon`` = copy of the left neighbour,
  ``repeat_vertical`` = copy of the token above; all one-hot, all drawn from the given generator).

Batch > 1: every sample keeps its own accepted length. Rows sit at different sequence positions in the same
pass; the window's K/V are written after the longest row and the accepted ones are moved next to each row's
committed prefix (the rest is masked out and overwritten later), then the cache is truncated.

Variants:

* :func:`sample_mcsjd` (MC-SJD / speculative coupled decoding): new drafts are drawn from a coupling of the new
  and old target at the same position (``maximal``: keep the old draft with probability ``min(1, p/q)`` else
  draw the residual; ``gumbel``: one fixed Gumbel vector per position, draft = argmax(log p + g)). Each draft's
  marginal is still its recorded ``q``, so the output stays exact while consecutive drafts agree far more often.
* :func:`sample_lantern` (LANTERN's relaxed acceptance, approximate): the draft ``x`` may absorb the target mass of
  its latent neighbours (``k`` nearest codebook vectors, cumulative mass <= ``delta``); TV to the exact
  distribution <= ``delta`` per token; ``delta = 0`` is SJD.
* :func:`sample_gsd` (grouped speculative decoding, approximate): accept with ``p(C) / q(C)`` over the dynamic
  cluster ``C(x)`` of tokens ranked within ``+-group_size // 2`` of ``x`` in ``p`` (filtered by probability gap and
  embedding distance); ``group_size = 1`` is SJD.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from var.errors import ConfigError
from var.samplers.logits import GeneratorArg, multinomial, rand_like_per_sample
from var.samplers.next_token import finish, prepare
from var.samplers.stats import SamplerStats

DRAFT_INITS = ("random", "repeat_horizon", "repeat_vertical")
COUPLINGS = ("none", "maximal", "gumbel")
_TINY = 1e-30


# ---- acceptance rules ---------------------------------------------------------------------------------------
class ExactAcceptance:
    """Standard speculative (modified rejection) sampling: ratio ``p(x) / q(x)``, residual ``max(0, p - q)``."""

    exact = True

    def ratio_and_residual(self, p, q, x):
        ratio = p.gather(-1, x[..., None])[..., 0] / q.gather(-1, x[..., None])[..., 0].clamp_min(_TINY)
        return ratio, (p - q).clamp_min(0)


class LanternAcceptance(ExactAcceptance):
    """LANTERN: the target mass of the longest prefix of ``x``'s ``k`` nearest codes (L2 on ``codes_VD``) whose
    cumulative mass is <= ``delta`` is moved onto ``x`` before the test (the relaxed target ``p~``)."""

    exact = False

    def __init__(self, codes_VD: torch.Tensor, k: int = 1000, delta: float = 0.1):
        if not 0.0 <= delta <= 1.0 or k < 1:
            raise ConfigError(f"LANTERN needs k >= 1 and 0 <= delta <= 1, got k={k}, delta={delta}")
        self.codes, self.k, self.delta = codes_VD.float(), min(k, codes_VD.shape[0] - 1), delta
        self.exact = delta == 0  # then p~ = p and the rule is plain SJD

    def neighbours(self, x: torch.Tensor) -> torch.Tensor:
        """The ``k`` nearest other codes of each token of ``x``, nearest first: ``[*x.shape, k]``."""
        dist = torch.cdist(self.codes[x.reshape(-1)], self.codes)
        dist.scatter_(1, x.reshape(-1, 1), float("inf"))
        return dist.topk(self.k, dim=1, largest=False, sorted=True).indices.view(*x.shape, self.k)

    def relaxed(self, p, x):
        nbr = self.neighbours(x)
        mass = p.gather(-1, nbr)
        p_x = p.gather(-1, x[..., None])
        moved = (mass.cumsum(-1) <= self.delta) & (p_x > 0)  # never revive a token top-k/top-p filtered out
        p_t = p.scatter(-1, nbr, torch.where(moved, torch.zeros_like(mass), mass))
        gained = p_x + (mass * moved).sum(-1, keepdim=True)
        return p_t.scatter(-1, x[..., None], gained)

    def ratio_and_residual(self, p, q, x):
        return super().ratio_and_residual(self.relaxed(p, x), q, x)


class GroupedAcceptance(ExactAcceptance):
    """GSD: ratio ``p(C(x)) / q(C(x))`` with ``C(x)`` = tokens ranked within ``+-group_size // 2`` of ``x`` in ``p``
    whose probability differs from ``p(x)`` by less than ``prob_gap`` and (if ``embed_VD`` is given) whose
    embeddings are within squared L2 ``embed_threshold`` of ``x``'s; the residual is the exact one."""

    exact = False

    def __init__(self, group_size: int = 10, prob_gap: float = 0.15, embed_VD: torch.Tensor | None = None,
                 embed_threshold: float = 0.5):
        if group_size < 1:
            raise ConfigError(f"GSD group size must be >= 1, got {group_size}")
        self.half, self.prob_gap, self.threshold = group_size // 2, prob_gap, embed_threshold
        self.embed = embed_VD.float() if embed_VD is not None else None
        self.exact = self.half == 0  # C(x) = {x}: plain SJD

    def ratio_and_residual(self, p, q, x):
        V = p.shape[-1]
        order = p.argsort(dim=-1, descending=True, stable=True)
        rank = order.argsort(dim=-1)
        offsets = torch.arange(-self.half, self.half + 1, device=p.device)
        cand_rank = rank.gather(-1, x[..., None]) + offsets
        valid = (cand_rank >= 0) & (cand_rank < V)
        cand = order.gather(-1, cand_rank.clamp(0, V - 1))
        p_c, p_x = p.gather(-1, cand), p.gather(-1, x[..., None])
        valid &= (p_c - p_x).abs() < self.prob_gap
        if self.embed is not None:
            valid &= (self.embed[cand] - self.embed[x][..., None, :]).pow(2).sum(-1) < self.threshold
        valid[..., self.half] = True  # x itself
        ratio = (p_c * valid).sum(-1) / (q.gather(-1, cand) * valid).sum(-1).clamp_min(_TINY)
        ratio = torch.where(p_x[..., 0] > 0, ratio, torch.zeros_like(ratio))  # filtered tokens stay out
        return ratio, (p - q).clamp_min(0)


# ---- helpers ------------------------------------------------------------------------------------------------
def _normalise(weights: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    total = weights.sum(-1, keepdim=True)
    return torch.where(total > _TINY, weights / total.clamp_min(_TINY), fallback)


def _move_window_kv(cache, src_start: int, dst_R: torch.Tensor, count: int) -> None:
    """Copy each row's ``count`` K/V slots at ``[src_start, +count)`` to ``[dst_R[r], +count)`` (all layers)."""
    dst = dst_R[:, None] + torch.arange(count, device=dst_R.device)
    rows = torch.arange(dst_R.shape[0], device=dst_R.device)[:, None].expand_as(dst)
    for buf in cache.k + cache.v:  # [R, H, capacity, D]
        moved = buf[:, :, src_start:src_start + count].transpose(1, 2).clone()  # [R, count, H, D]
        buf.transpose(1, 2)[rows, dst] = moved  # index_put_ on a view writes into the cache


def _fresh_drafts(init: str, committed_BN: torch.Tensor, n_B: torch.Tensor, drafts_BK: torch.Tensor,
                  first_fresh_B: torch.Tensor, N: int, grid: int, vocab: int, generator: GeneratorArg,
                  gumbel_BNV: torch.Tensor | None) -> torch.Tensor:
    """Fill draft slots ``k >= first_fresh`` (token ``n + k`` of ``N``) with initial drafts (one-hot ``q``)."""
    B, K = drafts_BK.shape
    u = rand_like_per_sample((B, K), generator, drafts_BK.device)
    out = drafts_BK.clone()
    t_BK = (n_B[:, None] + torch.arange(K, device=n_B.device)).clamp(max=N - 1)
    if gumbel_BNV is not None:
        random_tok = gumbel_BNV.gather(1, t_BK[..., None].expand(-1, -1, vocab)).argmax(-1)
    else:
        random_tok = (u * vocab).long().clamp(max=vocab - 1)
    rows = torch.arange(B, device=n_B.device)
    for k in range(K):
        t = t_BK[:, k]
        value = random_tok[:, k]
        if init != "random":
            src = t - 1 if init == "repeat_horizon" else t - grid
            has_src = (src >= 0) & ((t % grid != 0) if init == "repeat_horizon" else True)
            src = src.clamp(min=0)
            src_k = (src - n_B).clamp(min=0, max=K - 1)
            known = torch.where(src < n_B, committed_BN[rows, src], out[rows, src_k])
            value = torch.where(has_src, known, value)
        out[:, k] = torch.where(k >= first_fresh_B, value, out[:, k])
    return out


# ---- the engine ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_jacobi(model, vq, labels_B, *, window: int = 16, init: str = "random", coupling: str = "none",
                  acceptance: ExactAcceptance | None = None, cfg: float = 2.0, top_k: int = 0, top_p: float = 0.0,
                  temperature: float = 1.0, generator: GeneratorArg = None, decode: bool = True):
    """Speculative Jacobi decoding with a pluggable draft coupling and acceptance rule (see the module doc).

    Args:
        window: window length L (inputs per pass = 1 committed token + L - 1 drafts); 1 = plain decoding.
        init: initial drafts, one of :data:`DRAFT_INITS`. coupling: one of :data:`COUPLINGS`.
        acceptance: :class:`ExactAcceptance` (default), :class:`LanternAcceptance` or :class:`GroupedAcceptance`.
        cfg, top_k, top_p, temperature, generator: as :func:`~var.samplers.next_token.sample_next_token`.
    Returns:
        :class:`~var.samplers.stats.SampleOutput`; ``stats.extra`` holds ``iterations``,
        ``mean_accepted_per_iteration`` (per sample) and ``accepted_histogram``.
    """
    t0 = time.perf_counter()
    if window < 1:
        raise ConfigError(f"window must be >= 1, got {window}")
    if init not in DRAFT_INITS:
        raise ConfigError(f"init must be one of {DRAFT_INITS}, got {init!r}")
    if coupling not in COUPLINGS:
        raise ConfigError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
    rule = acceptance or ExactAcceptance()
    labels_B, proc, rows = prepare(model, vq, labels_B, cfg, temperature, top_k, top_p)
    device = labels_B.device
    B, N, V, L, T, grid = labels_B.shape[0], model.seq_len, model.vocab_size, window, model.prefix_len, \
        model.config.grid_size
    cache = model.new_kv_cache(rows.shape[0], capacity=T + N + L)
    stats = SamplerStats(peak_kv_cache_bytes=cache.nbytes())
    gumbel = None
    if coupling == "gumbel":
        u = rand_like_per_sample((B, N, V), generator, device).clamp(1e-20, 1.0)
        gumbel = -torch.log((-torch.log(u)).clamp_min(1e-20))  # one fixed Gumbel vector per (sample, token)

    tokens = torch.zeros(B, N + 1, dtype=torch.long, device=device)  # column N: a sink for unused writes
    tokens[:, 0] = multinomial(proc.probs(model.prefill(rows, cache)[:, -1], "token 0"), generator)
    stats.forward_passes = 1
    n = torch.ones(B, dtype=torch.long, device=device)
    K = L - 1  # draft slots
    drafts = torch.zeros(B, K, dtype=torch.long, device=device)
    if K:
        drafts = _fresh_drafts(init, tokens, n, drafts, torch.zeros_like(n), N, grid, V, generator, gumbel)
    draft_q = F.one_hot(drafts, V).float()
    ar = torch.arange(L, device=device)
    rows_idx = torch.arange(B, device=device)
    accepted_counts, hist = [], torch.zeros(L + 1, dtype=torch.long)

    while bool((n < N).any()):
        remaining = N - n
        Lw = int(min(L, int(remaining.max())))
        Lb = remaining.clamp(max=Lw)  # valid predictions per row (0 for finished rows)
        c = T + n - 1                 # committed K/V slots per row (= absolute position of w_0)
        S = cache.length
        inputs = torch.cat((tokens.gather(1, (n - 1)[:, None]), drafts[:, :Lw - 1]), dim=1)
        positions = (c[:, None] + ar[:Lw]).clamp(max=T + N - 1)
        slots = torch.arange(S + Lw, device=device)
        mask = (slots[None, None] < c[:, None, None]) | (
            (slots[None, None] >= S) & (slots[None, None] - S <= ar[:Lw][None, :, None]))
        logits = model.decode(proc.double(inputs), cache, positions=proc.double(positions),
                              attn_mask=proc.double(mask)[:, None])
        stats.forward_passes += 1
        p = proc.probs(logits, "Jacobi window")  # [B, Lw, V]: p[:, i] is token n + i

        # drafts k = 0..Lw-2 (token n + k) against p[:, k]; all uniforms/samples are drawn for every position
        x, q, pk = drafts[:, :Lw - 1], draft_q[:, :Lw - 1], p[:, :Lw - 1]
        u = rand_like_per_sample((B, Lw - 1), generator, device)
        ratio, residual = rule.ratio_and_residual(pk, q, x)
        accept = u < ratio
        resampled = multinomial(_normalise(residual, pk), generator) if Lw > 1 else x
        fresh = multinomial(p, generator)  # [B, Lw]: independent redrafts and the bonus token
        if coupling == "maximal" and Lw > 1:
            keep, redraw = accept, resampled
            if not rule.exact:  # couple with the exact target, not the relaxed one
                plain_ratio, plain_res = ExactAcceptance().ratio_and_residual(pk, q, x)
                keep, redraw = u < plain_ratio, multinomial(_normalise(plain_res, pk), generator)
            new_drafts = torch.cat((torch.where(keep, x, redraw), fresh[:, Lw - 1:]), dim=1)
        elif coupling == "gumbel":
            t_idx = (n[:, None] + ar[:Lw]).clamp(max=N - 1)
            new_drafts = (p.log() + gumbel.gather(1, t_idx[..., None].expand(-1, -1, V))).argmax(-1)
        else:
            new_drafts = fresh

        ok = accept & (ar[:Lw - 1][None] < Lb[:, None])
        kstar = torch.where(ok.all(1), Lw - 1, (~ok).int().argmax(1)) if Lw > 1 else torch.zeros_like(n)
        rejected = (kstar < Lb) & (kstar < Lw - 1)
        m = torch.where(rejected, kstar + 1, Lb)  # tokens committed by this pass
        out = torch.cat((x, new_drafts[:, Lw - 1:]), dim=1)  # accepted drafts, then the bonus token
        if Lw > 1:
            k_res = kstar.clamp(max=Lw - 2)
            out[rows_idx, k_res] = torch.where(rejected, resampled[rows_idx, k_res], out[rows_idx, k_res])
        target = torch.where(ar[:Lw][None] < m[:, None], n[:, None] + ar[:Lw], N)
        tokens.scatter_(1, target, out)

        # keep the K/V of the accepted inputs w_0..w_{m-1} next to each row's prefix, drop the rest
        _move_window_kv(cache, S, proc.double(c), Lw)
        cache.truncate(int((c + m).max()))
        active = Lb > 0
        accepted_counts.append(m[active].float().mean().item())
        hist += torch.bincount(m[active].cpu(), minlength=L + 1)[: L + 1]

        # next window: the new samples of the positions after the commit (q = their p), then fresh drafts
        n = n + m
        if K:
            src = (m[:, None] + ar[None, :K]).clamp(max=Lw - 1)
            from_p = (m[:, None] + ar[None, :K]) < Lw
            drafts = torch.where(from_p, new_drafts.gather(1, src), torch.zeros_like(src))
            drafts = _fresh_drafts(init, tokens, n, drafts, (Lw - m).clamp(min=0), N, grid, V, generator,
                                   gumbel)
            draft_q = torch.where(from_p[..., None], p.gather(1, src[..., None].expand(-1, -1, V)),
                                  F.one_hot(drafts, V).float())

    stats.extra.update(iterations=len(accepted_counts),
                       mean_accepted_per_iteration=sum(accepted_counts) / max(len(accepted_counts), 1),
                       accepted_histogram=hist.tolist(), window=L, init=init, coupling=coupling,
                       acceptance=type(rule).__name__)
    return finish(model, vq, tokens[:, :N], stats, t0, decode)


# ---- public samplers ----------------------------------------------------------------------------------------
def sample_sjd(model, vq, labels_B, *, window: int = 16, init: str = "random", **kwargs):
    """SJD (exact): same output distribution as :func:`~var.samplers.next_token.sample_next_token`."""
    return sample_jacobi(model, vq, labels_B, window=window, init=init, **kwargs)


def sample_mcsjd(model, vq, labels_B, *, window: int = 32, coupling: str = "maximal", init: str = "random",
                 **kwargs):
    """MC-SJD / speculative coupled decoding (exact): drafts drawn from a ``maximal`` or ``gumbel`` coupling."""
    if coupling == "none":
        raise ConfigError("MC-SJD needs coupling='maximal' or 'gumbel' (use sample_sjd for independent drafts)")
    return sample_jacobi(model, vq, labels_B, window=window, init=init, coupling=coupling, **kwargs)


def _codes(vq, codes_VD):
    if codes_VD is not None:
        return codes_VD
    if vq is None:
        raise ConfigError("LANTERN needs the tokenizer (or codes_VD) to find latent neighbours")
    return vq.quantize.codebook().detach()


def sample_lantern(model, vq, labels_B, *, k: int = 1000, delta: float = 0.1, window: int = 16,
                   codes_VD: torch.Tensor | None = None, **kwargs):
    """SJD with LANTERN's relaxed acceptance (approximate, TV <= ``delta`` per token; ``delta = 0`` is SJD).
    Neighbours are the ``k`` nearest L2-normalised VQ codes (what the decoder sees)."""
    rule = LanternAcceptance(_codes(vq, codes_VD).to(model.output.weight.device), k=k, delta=delta)
    return sample_jacobi(model, vq, labels_B, window=window, acceptance=rule, **kwargs)


def sample_gsd(model, vq, labels_B, *, group_size: int = 10, prob_gap: float = 0.15,
               embed_threshold: float | None = 0.5, window: int = 16, **kwargs):
    """SJD with grouped speculative decoding's cluster acceptance (approximate; ``group_size = 1`` is SJD).
    The embedding filter uses the GPT's input embeddings (``embed_threshold=None`` disables it)."""
    embed = model.tok_embeddings.weight.detach() if embed_threshold is not None else None
    rule = GroupedAcceptance(group_size, prob_gap, embed, embed_threshold if embed_threshold is not None else 0.0)
    return sample_jacobi(model, vq, labels_B, window=window, acceptance=rule, **kwargs)
