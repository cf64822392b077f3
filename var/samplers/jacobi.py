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

One pass is five small steps (:func:`draft_window`, :func:`verify`, :func:`accept`, :func:`commit`,
:func:`refill`; :func:`next_samples` draws the new samples that :func:`accept` and :func:`refill` use).

Batch > 1: every sample keeps its own accepted length. Rows sit at different sequence positions in the same
pass; the window's K/V are written after the longest row and the accepted ones are moved next to each row's
committed prefix (the rest is masked out and overwritten later), then the cache is truncated. A row with fewer
positions left than the pass is wide behaves as in a pass of its own width, and every sample draws the same
uniforms per pass (:class:`PassUniforms`, mapped to tokens by inverse CDF), so a batch with one generator per
sample equals the single runs.

Variants:

* :func:`sample_mcsjd` (MC-SJD / speculative coupled decoding): new drafts are drawn from a coupling of the new
  and old target at the same position (``maximal``: keep the old draft with probability ``min(1, p/q)`` else
  draw the residual; ``gumbel``: one fixed Gumbel vector per position, draft = argmax(log p + g)). Each draft's
  marginal is still its recorded ``q``, so the output stays exact while consecutive drafts agree far more often.
* :func:`sample_lantern` (LANTERN's relaxed acceptance, approximate): the draft ``x`` may absorb the target mass of
  its latent neighbours (``k`` nearest codebook vectors, cumulative mass <= ``delta``); drafts are recorded one-hot,
  which keeps each token within TV ``delta`` of the exact distribution; ``delta = 0`` is SJD.
* :func:`sample_gsd` (grouped speculative decoding, approximate): accept with ``p(C) / q(C)`` over the dynamic
  cluster ``C(x)`` of tokens ranked near ``x`` in ``p`` (the release's 6 above and 7 below, or
  ``+-group_size // 2``; filtered by probability gap and embedding distance); ``group_size = 1`` is SJD.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from var.errors import ConfigError
from var.kernels.protocols import require_dense_cache
from var.models.compiled import CompileArg, DecodeStep, compile_spec, reusable_cache
from var.samplers.logits import FiniteCheck, GeneratorArg, rand_like_per_sample, sample_from_uniform
from var.samplers.next_token import TokenProcessor, finish, prepare
from var.samplers.stats import SamplerStats

DRAFT_INITS = ("random", "repeat_horizon", "repeat_vertical")
COUPLINGS = ("none", "maximal", "gumbel")
_TINY = 1e-30


# ---- acceptance rules ---------------------------------------------------------------------------------------
class ExactAcceptance:
    """Standard speculative (modified rejection) sampling: ratio ``p(x) / q(x)``, residual ``max(0, p - q)``."""

    exact = True
    carried_drafts_one_hot = False  # carried-over drafts keep their old target as q (SJD)

    def ratio_and_residual(self, p, q, x):
        ratio = p.gather(-1, x[..., None])[..., 0] / q.gather(-1, x[..., None])[..., 0].clamp_min(_TINY)
        return ratio, (p - q).clamp_min(0)


class LanternAcceptance(ExactAcceptance):
    """LANTERN: the target mass of the longest prefix of ``x``'s ``k`` nearest codes (L2 on ``codes_VD``) whose
    cumulative mass is <= ``delta`` is moved onto ``x`` before the test (the relaxed target ``p~``).

    ``residual="released"`` (the release): on rejection, the residual is ``max(0, p - q')`` with ``q'`` = ``q``
    zeroed on the ``k + 1`` nearest codes of ``x`` when some mass was moved; ``"relaxed"``: ``max(0, p~ - q)``.
    Drafts are recorded one-hot (``carried_drafts_one_hot``), even those carried over from the previous pass: with
    a one-hot ``q`` the output of a position is ``p~`` (or the release's rule, which moves the same mass), so its
    total variation from ``p`` is at most ``delta`` per token. With SJD's carried ``q`` (``one_hot_drafts=False``)
    no such bound holds (measured: TV 0.36-0.85 at delta 0.1-0.2)."""

    exact = False
    RESIDUALS = ("released", "relaxed")

    def __init__(self, codes_VD: torch.Tensor, k: int = 1000, delta: float = 0.1, *, residual: str = "released",
                 one_hot_drafts: bool = True):
        if not 0.0 <= delta <= 1.0 or k < 1:
            raise ConfigError(f"LANTERN needs k >= 1 and 0 <= delta <= 1, got k={k}, delta={delta}")
        if residual not in self.RESIDUALS:
            raise ConfigError(f"LANTERN residual must be one of {self.RESIDUALS}, got {residual!r}")
        self.codes, self.k, self.delta = codes_VD.float(), min(k, codes_VD.shape[0] - 1), delta
        self.residual = residual
        self.exact = delta == 0  # then p~ = p and the rule is plain SJD
        self.carried_drafts_one_hot = one_hot_drafts and not self.exact

    def neighbours(self, x: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """The ``count`` (default ``k``) nearest other codes of each token of ``x``, nearest first."""
        count = min(count or self.k, self.codes.shape[0] - 1)
        dist = torch.cdist(self.codes[x.reshape(-1)], self.codes)
        dist.scatter_(1, x.reshape(-1, 1), float("inf"))
        return dist.topk(count, dim=1, largest=False, sorted=True).indices.view(*x.shape, count)

    def _moved(self, p, x):
        """``(neighbours, their mass, moved mask)``: the longest nearest-first prefix with cumulative mass <= delta."""
        nbr = self.neighbours(x)
        mass = p.gather(-1, nbr)
        moved = (mass.cumsum(-1) <= self.delta) & (p.gather(-1, x[..., None]) > 0)  # never revive a filtered token
        return nbr, mass, moved

    def relaxed(self, p, x):
        nbr, mass, moved = self._moved(p, x)
        p_t = p.scatter(-1, nbr, torch.where(moved, torch.zeros_like(mass), mass))
        gained = p.gather(-1, x[..., None]) + (mass * moved).sum(-1, keepdim=True)
        return p_t.scatter(-1, x[..., None], gained)

    def ratio_and_residual(self, p, q, x):
        ratio, relaxed_residual = super().ratio_and_residual(self.relaxed(p, x), q, x)
        if self.residual == "relaxed" or self.exact:
            return ratio, relaxed_residual
        _, _, moved = self._moved(p, x)
        zeroed = self.neighbours(x, self.k + 1)  # the release zeroes q on k + 1 neighbours (its slice ``:k + 1``)
        q_zeroed = torch.where(moved.any(-1, keepdim=True), q.scatter(-1, zeroed, 0.0), q)
        return ratio, (p - q_zeroed).clamp_min(0)


GSD_RELEASED_RANKS = (6, 7)  # the release's slice [i - 7, i + 7) of the ascending order: 6 likelier, 7 less likely


class GroupedAcceptance(ExactAcceptance):
    """GSD: ratio ``p(C(x)) / q(C(x))`` over the dynamic cluster ``C(x)``: tokens ranked near ``x`` in ``p`` whose
    probability differs from ``p(x)`` by less than ``prob_gap`` and (if ``embed_VD`` is given) whose embeddings are
    within squared L2 ``embed_threshold`` of ``x``'s; the residual is the exact one.

    The rank window is the release's (:data:`GSD_RELEASED_RANKS`: 6 likelier and 7 less likely tokens) when
    ``group_size`` is None, else ``+-group_size // 2`` (``group_size = 1`` is SJD)."""

    exact = False

    def __init__(self, group_size: int | None = None, prob_gap: float = 0.15, embed_VD: torch.Tensor | None = None,
                 embed_threshold: float = 0.5):
        if group_size is not None and group_size < 1:
            raise ConfigError(f"GSD group size must be >= 1, got {group_size}")
        self.above, self.below = GSD_RELEASED_RANKS if group_size is None else (group_size // 2, group_size // 2)
        self.prob_gap, self.threshold = prob_gap, embed_threshold
        self.embed = embed_VD.float() if embed_VD is not None else None
        self.exact = self.above == self.below == 0  # C(x) = {x}: plain SJD

    def ratio_and_residual(self, p, q, x):
        V = p.shape[-1]
        order = p.argsort(dim=-1, descending=True, stable=True)
        rank = order.argsort(dim=-1)
        offsets = torch.arange(-self.above, self.below + 1, device=p.device)
        cand_rank = rank.gather(-1, x[..., None]) + offsets
        valid = (cand_rank >= 0) & (cand_rank < V)
        cand = order.gather(-1, cand_rank.clamp(0, V - 1))
        p_c, p_x = p.gather(-1, cand), p.gather(-1, x[..., None])
        valid &= (p_c - p_x).abs() < self.prob_gap
        if self.embed is not None:
            valid &= (self.embed[cand] - self.embed[x][..., None, :]).pow(2).sum(-1) < self.threshold
        valid[..., self.above] = True  # x itself
        ratio = (p_c * valid).sum(-1) / (q.gather(-1, cand) * valid).sum(-1).clamp_min(_TINY)
        ratio = torch.where(p_x[..., 0] > 0, ratio, torch.zeros_like(ratio))  # filtered tokens stay out
        return ratio, (p - q).clamp_min(0)


def gsd_embed_threshold(embed_VD: torch.Tensor, pair_fraction: float, *, max_rows: int = 1024) -> float:
    """An embedding threshold for GSD from the model's own table: the squared L2 distance under which
    ``pair_fraction`` of the pairs of distinct tokens fall (estimated on ``max_rows`` evenly spaced tokens against
    all). The release's 0.5 was set on Lumina-mGPT's embeddings; on another model the same number admits a very
    different share of pairs (4.3% on the bundled GPT)."""
    if not 0.0 < pair_fraction < 1.0:
        raise ConfigError(f"pair_fraction must be in (0, 1), got {pair_fraction}")
    embed = embed_VD.detach().float()
    vocab = embed.shape[0]
    rows = torch.linspace(0, vocab - 1, min(max_rows, vocab), device=embed.device).round().long().unique()
    dist = torch.cdist(embed[rows], embed).pow(2)
    dist[torch.arange(rows.numel(), device=embed.device), rows] = float("nan")  # a token and itself: not a pair
    pairs = dist[~dist.isnan()]
    return float(pairs.kthvalue(max(1, round(pair_fraction * pairs.numel()))).values)


# ---- the steps of one pass ---------------------------------------------------------------------------------
def _normalise(weights: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    total = weights.sum(-1, keepdim=True)
    return torch.where(total > _TINY, weights / total.clamp_min(_TINY), fallback)


@dataclass
class PassUniforms:
    """Every uniform one pass needs, ``[B, window]`` each, indexed by window position.

    Drawn in full whatever the pass width, so each sample consumes the same amount of its generator per pass as
    in a run on its own: a batch with one generator per sample then equals the single runs."""

    accept_BL: torch.Tensor    # acceptance test of the draft at each position
    residual_BL: torch.Tensor  # resample from the residual at the first rejection
    target_BL: torch.Tensor    # new sample from the target (next drafts, bonus token)
    coupling_BL: torch.Tensor  # maximal coupling's residual draw under an inexact rule
    fresh_BL: torch.Tensor     # initial drafts of the new slots

    @classmethod
    def draw(cls, batch: int, window: int, generator: GeneratorArg, device) -> "PassUniforms":
        u = rand_like_per_sample((batch, 5, window), generator, device)
        return cls(*u.unbind(1))


@dataclass
class WindowInputs:
    """What one forward pass reads: the last committed token and the drafts after it, with their absolute
    positions and the attention mask over ``[cache, window]``."""

    tokens_BW: torch.Tensor
    positions_BW: torch.Tensor
    mask_BWS: torch.Tensor
    prefix_slots_B: torch.Tensor  # committed K/V slots of each row (= position of the last committed token)


@dataclass
class Verdict:
    """The outcome of the acceptance tests of one pass."""

    commit_count_B: torch.Tensor  # tokens committed by this pass (accepted drafts + one resampled/bonus token)
    commit_BW: torch.Tensor       # the tokens to commit, valid up to ``commit_count``


def initial_drafts(init: str, tokens_BN: torch.Tensor, committed_B: torch.Tensor, drafts_BK: torch.Tensor,
                   first_new_slot_B: torch.Tensor, grid: int, vocab: int, uniforms_BK: torch.Tensor,
                   gumbel_BNV: torch.Tensor | None) -> torch.Tensor:
    """Fill draft slots ``k >= first_new_slot`` (token ``committed + k``) with initial drafts (recorded one-hot)."""
    batch, slots = drafts_BK.shape
    seq_len = tokens_BN.shape[1] - 1  # the last column is the commit sink
    token_BK = (committed_B[:, None] + torch.arange(slots, device=drafts_BK.device)).clamp(max=seq_len - 1)
    if gumbel_BNV is not None:  # the Gumbel coupling's draft before any target: argmax of the noise alone
        random_BK = gumbel_BNV.gather(1, token_BK[..., None].expand(-1, -1, vocab)).argmax(-1)
    else:
        random_BK = (uniforms_BK * vocab).long().clamp(max=vocab - 1)
    out = drafts_BK.clone()
    rows = torch.arange(batch, device=drafts_BK.device)
    for slot in range(slots):  # left to right: a repeat may copy a draft filled earlier in this loop
        token, value = token_BK[:, slot], random_BK[:, slot]
        if init != "random":
            source = token - 1 if init == "repeat_horizon" else token - grid
            has_source = (source >= 0) & ((token % grid != 0) if init == "repeat_horizon" else True)
            source = source.clamp(min=0)
            source_slot = (source - committed_B).clamp(min=0, max=slots - 1)
            known = torch.where(source < committed_B, tokens_BN[rows, source], out[rows, source_slot])
            value = torch.where(has_source, known, value)
        out[:, slot] = torch.where(slot >= first_new_slot_B, value, out[:, slot])
    return out


def draft_window(tokens_BN: torch.Tensor, committed_B: torch.Tensor, drafts_BK: torch.Tensor, width: int,
                 prefix_len: int, cache_length: int, key_slots: int | None = None) -> WindowInputs:
    """Step 1: the inputs of one pass of ``width`` positions, per row at its own sequence position. The mask covers
    ``key_slots`` cache slots (default ``cache_length + width``; the whole cache for a static-shape pass)."""
    offsets = torch.arange(width, device=tokens_BN.device)
    seq_len = tokens_BN.shape[1] - 1
    prefix_slots_B = prefix_len + committed_B - 1
    tokens_BW = torch.cat((tokens_BN.gather(1, (committed_B - 1)[:, None]), drafts_BK[:, :width - 1]), dim=1)
    positions_BW = (prefix_slots_B[:, None] + offsets).clamp(max=prefix_len + seq_len - 1)
    slots = torch.arange(key_slots or cache_length + width, device=tokens_BN.device)
    # a row sees its own committed prefix (rows are at different lengths) and the window causally; the window's
    # K/V are written after the longest row, so the slots between a row's prefix and the window are masked out
    sees_prefix = slots[None, None] < prefix_slots_B[:, None, None]
    sees_window = (slots[None, None] >= cache_length) & (slots[None, None] - cache_length <= offsets[None, :, None])
    return WindowInputs(tokens_BW, positions_BW, sees_prefix | sees_window, prefix_slots_B)


def verify(model, proc: TokenProcessor, cache, window: WindowInputs, committed_B: torch.Tensor,
           step: DecodeStep | None = None) -> torch.Tensor:
    """Step 2: one forward pass -> the target distribution ``[B, width, V]`` of every window position (through
    ``step``, the static-shape decode step, when compiled)."""
    tokens, positions = proc.double(window.tokens_BW), proc.double(window.positions_BW)
    mask = proc.double(window.mask_BWS)[:, None]
    if step is not None:
        logits = step(tokens, positions=positions, attn_mask=mask)
    else:
        logits = model.decode(tokens, cache, positions=positions, attn_mask=mask)
    token_BW = committed_B[:, None] + torch.arange(logits.shape[1], device=committed_B.device)
    return proc.probs(logits, "Jacobi window", proc.guided_tokens(token_BW))  # same target as plain decoding


def accept(rule: ExactAcceptance, target_BWV: torch.Tensor, drafts_BK: torch.Tensor, draft_q_BKV: torch.Tensor,
           valid_B: torch.Tensor, samples_BW: torch.Tensor, uniforms: PassUniforms) -> Verdict:
    """Step 3: test a row's drafts left to right; commit the accepted prefix plus the residual sample at the first
    rejection, or the bonus token (the new sample of the row's last valid position) if every draft is accepted.

    A row with ``valid`` positions left tests ``valid - 1`` drafts, as it would in a pass of its own width."""
    num_drafts = target_BWV.shape[1] - 1
    drafts, target = drafts_BK[:, :num_drafts], target_BWV[:, :num_drafts]
    ratio, residual = rule.ratio_and_residual(target, draft_q_BKV[:, :num_drafts], drafts)
    tested_B = (valid_B - 1).clamp(min=0)
    accepted = (uniforms.accept_BL[:, :num_drafts] < ratio) & (
        torch.arange(num_drafts, device=drafts.device)[None] < tested_B[:, None])
    # the first position not accepted: a rejection if it is below tested_B, else the bonus position
    stop_B = (torch.where(accepted.all(1), num_drafts, (~accepted).int().argmax(1)) if num_drafts
              else torch.zeros_like(valid_B))
    rejected = stop_B < tested_B
    rows = torch.arange(drafts_BK.shape[0], device=drafts_BK.device)
    last = samples_BW[rows, stop_B]  # the bonus token unless rejected
    if num_drafts:
        at = stop_B.clamp(max=num_drafts - 1)
        resampled = sample_from_uniform(_normalise(residual[rows, at], target[rows, at]),
                                        uniforms.residual_BL[rows, at])
        last = torch.where(rejected, resampled, last)
    commit = torch.cat((drafts, samples_BW[:, num_drafts:]), dim=1)
    commit[rows, stop_B] = last
    return Verdict(torch.where(valid_B > 0, stop_B + 1, 0), commit)


def next_samples(coupling: str, rule: ExactAcceptance, target_BWV: torch.Tensor, drafts_BK: torch.Tensor,
                 draft_q_BKV: torch.Tensor, committed_B: torch.Tensor, valid_B: torch.Tensor,
                 gumbel_BNV: torch.Tensor | None, uniforms: PassUniforms) -> torch.Tensor:
    """A new sample ``[B, width]`` of every window position from its target: the next pass's drafts and the bonus
    token. Independent draws, or (MC-SJD) coupled with the old draft so consecutive drafts agree more often."""
    width, vocab = target_BWV.shape[1], target_BWV.shape[2]
    independent = sample_from_uniform(target_BWV, uniforms.target_BL[:, :width])
    if coupling == "gumbel":  # one fixed Gumbel vector per token: argmax(log p + g) is a sample of p
        seq_len = gumbel_BNV.shape[1]
        token_BW = (committed_B[:, None] + torch.arange(width, device=target_BWV.device)).clamp(max=seq_len - 1)
        noise = gumbel_BNV.gather(1, token_BW[..., None].expand(-1, -1, vocab))
        return (target_BWV.log() + noise).argmax(-1)
    if coupling == "maximal" and width > 1:  # keep the old draft w.p. min(1, p/q), else draw the residual
        drafts, draft_q, target = drafts_BK[:, :width - 1], draft_q_BKV[:, :width - 1], target_BWV[:, :width - 1]
        ratio, residual = ExactAcceptance().ratio_and_residual(target, draft_q, drafts)  # the exact p, not p~
        keep = uniforms.accept_BL[:, :width - 1] < ratio
        redraw_u = uniforms.residual_BL if rule.exact else uniforms.coupling_BL
        redraw = sample_from_uniform(_normalise(residual, target), redraw_u[:, :width - 1])
        coupled = torch.cat((torch.where(keep, drafts, redraw), independent[:, width - 1:]), dim=1)
        # a row's last valid position holds its bonus token: an independent sample, as in a pass of its own width
        has_draft = torch.arange(width, device=target_BWV.device)[None] < (valid_B - 1)[:, None]
        return torch.where(has_draft, coupled, independent)
    return independent


def move_window_kv(cache, window_start: int, prefix_slots_B: torch.Tensor, count: int) -> None:
    """Copy each row's ``count`` K/V slots at ``[window_start, +count)`` to ``[prefix_slots_B[r], +count)``."""
    dst = prefix_slots_B[:, None] + torch.arange(count, device=prefix_slots_B.device)
    rows = torch.arange(prefix_slots_B.shape[0], device=prefix_slots_B.device)[:, None].expand_as(dst)
    for buf in cache.k + cache.v:  # [R, H, capacity, D]
        moved = buf[:, :, window_start:window_start + count].transpose(1, 2).clone()  # [R, count, H, D]
        buf.transpose(1, 2)[rows, dst] = moved  # index_put_ on a view writes into the cache


def commit(tokens_BN: torch.Tensor, committed_B: torch.Tensor, verdict: Verdict, cache, window: WindowInputs,
           window_start: int, proc: TokenProcessor) -> torch.Tensor:
    """Step 4: write the committed tokens; keep the K/V of the accepted inputs next to each row's prefix. Returns
    the cache length to truncate to (a device scalar: the caller reads it with its other per-pass numbers), which
    drops the rest (the rejected inputs' K/V were computed from a wrong draft)."""
    width = verdict.commit_BW.shape[1]
    offsets = torch.arange(width, device=tokens_BN.device)
    sink = tokens_BN.shape[1] - 1
    target_columns = torch.where(offsets[None] < verdict.commit_count_B[:, None], committed_B[:, None] + offsets,
                                 sink)
    tokens_BN.scatter_(1, target_columns, verdict.commit_BW)
    prefix_slots = proc.double(window.prefix_slots_B)
    move_window_kv(cache, window_start, prefix_slots, width)
    # inputs w_0..w_{m-1} (the last committed token and the accepted drafts) are consistent with the new prefix
    return (prefix_slots + proc.double(verdict.commit_count_B)).max()


def refill(init: str, tokens_BN: torch.Tensor, committed_B: torch.Tensor, commit_count_B: torch.Tensor,
           samples_BW: torch.Tensor, target_BWV: torch.Tensor, slots: int, grid: int, uniforms: PassUniforms,
           gumbel_BNV: torch.Tensor | None, carried_one_hot: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 5: the next window's drafts (``committed_B`` is already advanced): the new samples of the positions
    after the commit, recorded with their target as ``q`` (or one-hot: see :class:`LanternAcceptance`), then
    initial drafts for the slots past this pass's window."""
    width, vocab = target_BWV.shape[1], target_BWV.shape[2]
    source_BK = commit_count_B[:, None] + torch.arange(slots, device=tokens_BN.device)[None]
    carried = source_BK < width
    source_BK = source_BK.clamp(max=width - 1)
    drafts = torch.where(carried, samples_BW.gather(1, source_BK), torch.zeros_like(source_BK))
    drafts = initial_drafts(init, tokens_BN, committed_B, drafts, (width - commit_count_B).clamp(min=0), grid, vocab,
                            uniforms.fresh_BL[:, :slots], gumbel_BNV)
    one_hot = F.one_hot(drafts, vocab).float()
    if carried_one_hot:
        return drafts, one_hot
    carried_q = target_BWV.gather(1, source_BK[..., None].expand(-1, -1, vocab))
    return drafts, torch.where(carried[..., None], carried_q, one_hot)


# ---- the engine ---------------------------------------------------------------------------------------------
MAX_WINDOW_FLOOR = 64  # windows up to this length are allowed even on tiny grids (tests, toy models)


@torch.no_grad()
def sample_jacobi(model, tokenizer, labels_B, *, window: int = 16, init: str = "random", coupling: str = "none",
                  acceptance: ExactAcceptance | None = None, cfg_scale: float = 2.0, top_k: int = 0,
                  top_p: float = 0.0, temperature: float = 1.0, cfg_interval: int = -1,
                  generator: GeneratorArg = None, decode: bool = True, cfg: float | None = None,
                  compile: CompileArg = False):
    """Speculative Jacobi decoding with a pluggable draft coupling and acceptance rule (see the module doc).

    Args:
        window: window length L (inputs per pass = 1 committed token + L - 1 drafts); 1 = plain decoding.
        init: initial drafts, one of :data:`DRAFT_INITS`. coupling: one of :data:`COUPLINGS`.
        acceptance: :class:`ExactAcceptance` (default), :class:`LanternAcceptance` or :class:`GroupedAcceptance`.
        cfg_scale (``cfg``: deprecated), top_k, top_p, temperature, cfg_interval: as
            :func:`~var.samplers.next_token.sample_next_token`.
        generator: one ``torch.Generator`` or one per sample (each sample draws a fixed number of uniforms per
            pass, so a batch with one generator per sample equals the single runs).
        compile: compile the window pass (:mod:`var.models.compiled`: the static-shape ``GPT.decode_step`` at the
            full window width, one graph for every pass, CUDA graphs on CUDA); ``True`` or a backend name.
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
    labels_B, proc, rows = prepare(model, tokenizer, labels_B, cfg_scale, temperature, top_k, top_p, cfg_interval,
                                   cfg=cfg)
    proc.finite = FiniteCheck()  # read back with the per-pass numbers below
    device = labels_B.device
    batch, seq_len, vocab, prefix_len = len(labels_B), model.seq_len, model.vocab_size, model.prefix_len
    max_window = max(seq_len, MAX_WINDOW_FLOOR)
    if window > max_window:  # a window past the token count drafts nothing more, but its buffers grow with it
        raise ConfigError(f"window must be in [1, {max_window}] (the image's token count, at least "
                          f"{MAX_WINDOW_FLOOR}), got {window}")
    grid, slots = model.config.grid_size, window - 1
    spec = compile_spec(compile)
    capacity = prefix_len + seq_len + window

    def new_cache():
        return require_dense_cache(model.new_kv_cache(len(rows), capacity=capacity), "SJD")
    cache = new_cache() if spec is None else reusable_cache(model, ("jacobi", len(rows), capacity), new_cache)
    stats = SamplerStats(peak_kv_cache_bytes=cache.nbytes())
    gumbel_BNV = None
    if coupling == "gumbel":
        u = rand_like_per_sample((batch, seq_len, vocab), generator, device).clamp(1e-20, 1.0)
        gumbel_BNV = -torch.log((-torch.log(u)).clamp_min(1e-20))  # one fixed Gumbel vector per (sample, token)

    first = PassUniforms.draw(batch, window, generator, device)
    tokens_BN = torch.zeros(batch, seq_len + 1, dtype=torch.long, device=device)  # column N: sink for unused writes
    first_target_BV = proc.probs(model.prefill(rows, cache)[:, -1], "token 0")
    tokens_BN[:, 0] = sample_from_uniform(first_target_BV, first.target_BL[:, 0])
    stats.forward_passes = 1
    step = DecodeStep(model, cache, spec) if spec is not None else None
    committed_B = torch.ones(batch, dtype=torch.long, device=device)
    drafts_BK = initial_drafts(init, tokens_BN, committed_B, torch.zeros(batch, slots, dtype=torch.long,
                               device=device), torch.zeros_like(committed_B), grid, vocab, first.fresh_BL[:, :slots],
                               gumbel_BNV)
    draft_q_BKV = F.one_hot(drafts_BK, vocab).float()
    # per-pass statistics stay on the device and are read once at the end (no host sync for bookkeeping)
    accepted_means, histogram = [], torch.zeros(window + 2, dtype=torch.long, device=device)

    remaining_B = seq_len - committed_B
    longest = int(remaining_B.max())
    while longest > 0:
        # compiled passes keep the full width (one graph; a row only uses its valid positions: the same tokens)
        width = window if step is not None else min(window, longest)
        valid_B = remaining_B.clamp(max=width)  # positions a row still needs (0 for finished rows)
        uniforms = PassUniforms.draw(batch, window, generator, device)
        window_start = cache.length
        inputs = draft_window(tokens_BN, committed_B, drafts_BK, width, prefix_len, window_start,
                              key_slots=cache.capacity if step is not None else None)
        target_BWV = verify(model, proc, cache, inputs, committed_B, step)
        stats.forward_passes += 1
        samples_BW = next_samples(coupling, rule, target_BWV, drafts_BK, draft_q_BKV, committed_B, valid_B,
                                  gumbel_BNV, uniforms)
        verdict = accept(rule, target_BWV, drafts_BK, draft_q_BKV, valid_B, samples_BW, uniforms)
        new_length = commit(tokens_BN, committed_B, verdict, cache, inputs, window_start, proc)

        active = valid_B > 0  # finished rows are counted in the extra bin window + 1, dropped at the end
        accepted_means.append((verdict.commit_count_B * active).sum() / active.sum())
        bins = torch.where(active, verdict.commit_count_B, window + 1)
        histogram.scatter_add_(0, bins, torch.ones_like(bins))  # bincount would read its size back from the device
        committed_B = committed_B + verdict.commit_count_B
        remaining_B = seq_len - committed_B
        if slots:
            drafts_BK, draft_q_BKV = refill(init, tokens_BN, committed_B, verdict.commit_count_B, samples_BW,
                                            target_BWV, slots, grid, uniforms, gumbel_BNV,
                                            rule.carried_drafts_one_hot)
        # the pass's one read-back: the loop test and next width, the cache truncation and the finiteness flag
        longest, length, first_bad = torch.stack((remaining_B.max(), new_length,
                                                  proc.finite.first_failure())).tolist()
        proc.finite.raise_if_failed(first_bad)
        if step is not None:
            step.rewind(length, new_length)
        else:
            cache.truncate(length)

    proc.finite.raise_if_failed()  # a one-token image has no pass
    means = torch.stack(accepted_means).tolist() if accepted_means else []
    stats.extra.update(iterations=len(means), mean_accepted_per_iteration=sum(means) / max(len(means), 1),
                       accepted_histogram=histogram[:window + 1].tolist(), window=window, init=init, coupling=coupling,
                       acceptance=type(rule).__name__)
    return finish(model, tokenizer, tokens_BN[:, :seq_len], stats, t0, decode, cache=cache)


# ---- public samplers ----------------------------------------------------------------------------------------
def sample_sjd(model, tokenizer, labels_B, *, window: int = 16, init: str = "random", **kwargs):
    """SJD (exact): same output distribution as :func:`~var.samplers.next_token.sample_next_token`."""
    return sample_jacobi(model, tokenizer, labels_B, window=window, init=init, **kwargs)


def sample_mcsjd(model, tokenizer, labels_B, *, window: int = 32, coupling: str = "maximal", init: str = "random",
                 **kwargs):
    """MC-SJD / speculative coupled decoding (exact): drafts drawn from a ``maximal`` or ``gumbel`` coupling."""
    if coupling == "none":
        raise ConfigError("MC-SJD needs coupling='maximal' or 'gumbel' (use sample_sjd for independent drafts)")
    return sample_jacobi(model, tokenizer, labels_B, window=window, init=init, coupling=coupling, **kwargs)


LANTERN_CODES = ("raw", "normalised")


def _codes(vq, codes_VD, codes: str):
    if codes_VD is not None:
        return codes_VD
    if vq is None:
        raise ConfigError("LANTERN needs the tokenizer (or codes_VD) to find latent neighbours")
    if codes not in LANTERN_CODES:
        raise ConfigError(f"LANTERN codes must be one of {LANTERN_CODES}, got {codes!r}")
    # the release measures distances on the raw embedding table; "normalised" uses the vectors the decoder sees
    return vq.codebook(raw=codes == "raw").detach()


def sample_lantern(model, tokenizer, labels_B, *, k: int = 1000, delta: float = 0.1, window: int = 16,
                   codes_VD: torch.Tensor | None = None, codes: str = "raw", residual: str = "released",
                   one_hot_drafts: bool = True, **kwargs):
    """SJD with LANTERN's relaxed acceptance (approximate; ``delta = 0`` is SJD). With one-hot drafts (default)
    every token is within total variation ``delta`` of the exact distribution (see :class:`LanternAcceptance`).
    Neighbours are the ``k`` nearest codes: ``codes="raw"`` (the release: the unnormalised embedding table) or
    ``"normalised"``."""
    rule = LanternAcceptance(_codes(tokenizer, codes_VD, codes).to(model.output.weight.device), k=k, delta=delta,
                             residual=residual, one_hot_drafts=one_hot_drafts)
    return sample_jacobi(model, tokenizer, labels_B, window=window, acceptance=rule, **kwargs)


def sample_gsd(model, tokenizer, labels_B, *, group_size: int | None = None, prob_gap: float = 0.15,
               embed_threshold: float | None = 0.5, window: int = 16, **kwargs):
    """SJD with grouped speculative decoding's cluster acceptance (approximate). ``group_size=None`` is the
    release's rank window (6 likelier, 7 less likely tokens), an int ``+-group_size // 2`` (1 is SJD). The
    embedding filter uses the GPT's input embeddings (``embed_threshold=None`` disables it; the release's 0.5 was
    set on Lumina-mGPT: :func:`gsd_embed_threshold` picks one from this model's own embedding statistics)."""
    max_group = max(model.vocab_size, MAX_WINDOW_FLOOR)
    if group_size is not None and group_size > max_group:  # wider rank windows only cost memory
        raise ConfigError(f"GSD group size must be in [1, {max_group}] (the vocabulary, at least "
                          f"{MAX_WINDOW_FLOOR}), got {group_size}")
    embed = model.tok_embeddings.weight.detach() if embed_threshold is not None else None
    rule = GroupedAcceptance(group_size, prob_gap, embed, embed_threshold if embed_threshold is not None else 0.0)
    return sample_jacobi(model, tokenizer, labels_B, window=window, acceptance=rule, **kwargs)
