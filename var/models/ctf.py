"""CTF: coarse-to-fine token prediction (Guo, Zhang, Shieh, 2025).

* Offline, :func:`kmeans_codebook` groups a tokenizer's codebook vectors into ``K`` clusters; ``cluster_of[v]`` is
  the coarse label of code ``v``.
* Stage 1 is an unchanged :class:`~var.models.gpt.GPT` whose vocabulary is the K coarse labels
  (:func:`var.train.objectives_nar_ctf.stage1_loss`: next-token CE on ``cluster_of[tokens]``).
* Stage 2 (:class:`CTFStage2`) reads the class and the whole coarse sequence with **bidirectional** attention and
  predicts every fine code in one pass (:func:`~var.train.objectives_nar_ctf.stage2_loss`). It stores the clustering (``cluster_of`` buffer,
  installed with :meth:`CTFStage2.set_clusters`), so a stage-2 checkpoint always travels with its coarse map.

Choices where the paper is silent (documented in the README, CTF section): stage 2 is a LlamaGen-style
transformer with the class token as a prefix and 2D RoPE, attention unmasked; its loss is plain CE over all V codes
(``constrained=True`` restricts the softmax to the codes of the given cluster); k-means uses k-means++ seeding,
Lloyd iterations and re-seeds empty clusters with the worst-fitted codes, so no coarse label is ever empty.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from var.errors import ConfigError
from var.models.gpt import ClassPrefixTransformer, GPTConfig


# ---- codebook clustering ------------------------------------------------------------------------------------------
def _sq_dist(x_NC: torch.Tensor, c_KC: torch.Tensor) -> torch.Tensor:
    return (x_NC.pow(2).sum(1, keepdim=True) + c_KC.pow(2).sum(1) - 2 * x_NC @ c_KC.T).clamp_min_(0)


def _fill_empty(x_VC, c_KC, assign_V, num_clusters: int) -> torch.Tensor:
    """Give every empty cluster the worst-fitted code of a cluster that keeps at least one member."""
    assign_V = assign_V.clone()
    counts = torch.bincount(assign_V, minlength=num_clusters)
    for k in torch.nonzero(counts == 0).flatten().tolist():
        err = _sq_dist(x_VC, c_KC).gather(1, assign_V[:, None])[:, 0]
        err[counts[assign_V] <= 1] = -1
        worst = int(err.argmax())
        counts[assign_V[worst]] -= 1
        assign_V[worst], counts[k] = k, 1
        c_KC[k] = x_VC[worst]
    return assign_V


@torch.no_grad()
def kmeans_codebook(codebook_VC: torch.Tensor, num_clusters: int, *, iters: int = 50,
                    seed: int = 0) -> torch.Tensor:
    """k-means (k-means++ init, Lloyd steps) of the code vectors -> ``cluster_of [V]`` (long, every label used).

    Deterministic for a given ``seed``; runs in fp64 on the codebook's device.
    """
    x = codebook_VC.detach().double()
    V = x.shape[0]
    if not 1 <= num_clusters <= V:
        raise ConfigError(f"num_clusters must be in [1, {V}] (the codebook size), got {num_clusters}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    centers = [x[torch.randint(V, (1,), generator=gen).item()]]
    d2 = _sq_dist(x, centers[0][None])[:, 0]
    for _ in range(1, num_clusters):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / V)
        centers.append(x[torch.multinomial(probs.float().cpu(), 1, generator=gen).item()])
        d2 = torch.minimum(d2, _sq_dist(x, centers[-1][None])[:, 0])
    c = torch.stack(centers)
    assign = _fill_empty(x, c, _sq_dist(x, c).argmin(1), num_clusters)
    for _ in range(iters):
        counts = torch.bincount(assign, minlength=num_clusters)
        c = torch.zeros_like(c).index_add_(0, assign, x) / counts[:, None].double()
        new_assign = _fill_empty(x, c, _sq_dist(x, c).argmin(1), num_clusters)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return assign


def cluster_members(cluster_of_V: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Boolean ``[K, V]``: ``members[k, v]`` iff code v is in cluster k."""
    return F.one_hot(cluster_of_V, num_clusters).T.bool()


# ---- stage 2 -----------------------------------------------------------------------------------------------------
@dataclass
class CTFStage2Config(GPTConfig):
    """A :class:`GPTConfig` plus ``num_coarse`` (K); ``vocab_size`` is the fine codebook size V."""

    num_coarse: int = 512

    def __post_init__(self):
        super().__post_init__()
        if self.num_coarse < 1:
            raise ConfigError(f"num_coarse must be positive, got {self.num_coarse}")


class CTFStage2(ClassPrefixTransformer):
    """Fine codes of all positions from ``[class; coarse labels]`` in one bidirectional pass."""

    def __init__(self, config: CTFStage2Config | None = None, **overrides):
        config = config or CTFStage2Config(**overrides)
        super().__init__(config, "coarse_embeddings", config.num_coarse)
        # coarse label of every fine code (set from k-means with set_clusters; saved with the weights)
        self.register_buffer("cluster_of", torch.arange(config.vocab_size) % config.num_coarse)
        self.init_weights()

    @torch.no_grad()
    def set_clusters(self, cluster_of_V: torch.Tensor) -> None:
        """Install the codebook clustering ``[V]`` (labels in ``[0, num_coarse)``) this model is trained with."""
        V, K = self.config.vocab_size, self.config.num_coarse
        if cluster_of_V.shape != (V,) or cluster_of_V.dtype.is_floating_point or cluster_of_V.min() < 0 \
                or cluster_of_V.max() >= K:
            raise ConfigError(f"cluster_of must be an integer tensor [{V}] with labels in [0, {K})")
        self.cluster_of.copy_(cluster_of_V)

    def members(self) -> torch.Tensor:
        """``[K, V]`` boolean cluster membership of the installed clustering."""
        return cluster_members(self.cluster_of, self.config.num_coarse)

    def forward(self, labels_B: torch.Tensor, coarse_BN: torch.Tensor) -> torch.Tensor:
        """``labels [B]``, coarse labels ``[B, grid^2]`` (raster) -> fine logits ``[B, grid^2, V]`` (fp32)."""
        coarse_BN = coarse_BN.reshape(coarse_BN.shape[0], -1)
        if coarse_BN.shape[1] != self.seq_len:
            raise ConfigError(f"stage 2 takes the full grid of {self.seq_len} coarse labels, got {coarse_BN.shape[1]}")
        x = torch.cat((self.cls_embedding(labels_B), self.coarse_embeddings(coarse_BN)), dim=1)
        L = x.shape[1]
        full = torch.ones(L, L, dtype=torch.bool, device=x.device)
        return self.blocks_and_head(x, self.rope(range(L), x.device), None, full)[:, self.prefix_len:]
