"""CTF: codebook k-means, stage-1/stage-2 losses, constrained two-stage sampling (N + 1 passes)."""
import json

import pytest
import torch

from var.errors import ConfigError
from var.models import create
from var.models import nar_ctf_presets  # noqa: F401  (registers the ctf_* presets)
from var.models.ctf import cluster_members, kmeans_codebook
from var.samplers.logits import constrain_logits
from var.train.objectives_nar_ctf import stage1_loss, stage2_loss
from var.samplers.coarse_to_fine import sample_coarse_to_fine
from var.samplers.logits import apply_cfg

K, V = 8, 64


def randomize_head(model, std=0.5):
    with torch.no_grad():
        model.output.weight.normal_(0, std)
    return model.eval()


@pytest.fixture()
def models():
    torch.manual_seed(0)
    codebook = torch.randn(V, 8)
    cluster_of = kmeans_codebook(codebook, K, seed=0)
    stage2 = randomize_head(create("ctf_stage2_tiny"))
    stage2.set_clusters(cluster_of)
    return randomize_head(create("ctf_stage1_tiny")), stage2, cluster_of


def test_kmeans_recovers_separated_blobs_and_is_deterministic():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(K, 4, generator=gen) * 20
    truth = torch.arange(V) % K
    points = centers[truth] + 0.1 * torch.randn(V, 4, generator=gen)
    labels = kmeans_codebook(points, K, seed=3)
    # same partition up to renaming: each found cluster maps to exactly one true cluster and vice versa
    pairs = set(zip(labels.tolist(), truth.tolist()))
    assert len(pairs) == K and len({a for a, _ in pairs}) == K
    assert torch.equal(labels, kmeans_codebook(points, K, seed=3))


def test_kmeans_never_leaves_a_cluster_empty_and_beats_random():
    x = torch.randn(V, 8)
    x[:40] = x[0]  # 40 duplicate codes: k-means++ alone could not seed K distinct centres from them
    labels = kmeans_codebook(x, 30, seed=1)
    assert torch.bincount(labels, minlength=30).min() >= 1
    x = torch.randn(V, 8)
    labels = kmeans_codebook(x, K)

    def inertia(lab):
        return sum(((x[lab == k] - x[lab == k].mean(0)) ** 2).sum() for k in range(K) if (lab == k).any())

    assert inertia(labels) < 0.8 * inertia(torch.arange(V) % K)
    with pytest.raises(ConfigError):
        kmeans_codebook(x, V + 1)


def test_constrain_logits():
    cluster_of = torch.tensor([0, 1, 0, 2, 1])
    members = cluster_members(cluster_of, 3)
    assert members.tolist() == [[True, False, True, False, False], [False, True, False, False, True],
                                [False, False, False, True, False]]
    out = constrain_logits(torch.zeros(1, 2, 5), torch.tensor([[0, 2]]), members)
    assert torch.isinf(out[0, 0, [1, 3, 4]]).all() and (out[0, 0, [0, 2]] == 0).all()
    assert torch.isfinite(out[0, 1]).sum() == 1


def test_constrained_sampling_stays_in_cluster(models):
    stage1, stage2, cluster_of = models
    labels = torch.tensor([0, 1, 2, 3, 9, 10])
    out = sample_coarse_to_fine(stage1, stage2, None, labels, generator=torch.Generator().manual_seed(0))
    coarse = out.coarse
    assert torch.equal(cluster_of[out.tokens], coarse)
    assert out.stats.forward_passes == 16 + 1 and out.tokens.shape == (6, 16)
    json.dumps(out.stats.as_dict())  # stats stay serialisable
    free = sample_coarse_to_fine(stage1, stage2, None, labels, constrained=False,
                                 generator=torch.Generator().manual_seed(0))
    assert not torch.equal(cluster_of[free.tokens], free.coarse)  # the constraint did something
    guided = sample_coarse_to_fine(stage1, stage2, create("vq_tiny").eval(), labels, stage2_cfg_scale=3.0,
                                   stage2_top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(cluster_of[guided.tokens], guided.coarse)
    assert guided.images.shape == (6, 3, 16, 16) and torch.isfinite(guided.images).all()


def test_stage1_greedy_matches_teacher_forcing(models):
    stage1, stage2, cluster_of = models
    labels = torch.tensor([4, 5])
    out = sample_coarse_to_fine(stage1, stage2, None, labels, cfg_scale=2.5, top_k=1)
    coarse = out.coarse
    with torch.no_grad():
        logits = apply_cfg(stage1(labels, coarse), stage1(torch.full_like(labels, 10), coarse), 2.5)
    assert torch.equal(logits.argmax(-1), coarse)


def test_stage2_is_one_bidirectional_pass(models):
    _, stage2, _ = models
    labels = torch.tensor([1])
    coarse = torch.randint(0, K, (1, 16))
    changed = coarse.clone()
    changed[0, -1] = (coarse[0, -1] + 1) % K
    with torch.no_grad():
        a, b = stage2(labels, coarse), stage2(labels, changed)
    assert a.shape == (1, 16, V)
    assert not torch.allclose(a[0, 0], b[0, 0])  # the first position sees the last coarse label


def test_pair_validation(models):
    stage1, _, cluster_of = models
    with pytest.raises(ConfigError, match="do not match"):
        sample_coarse_to_fine(stage1, create("ctf_stage2_tiny", num_coarse=9), None, [0])
    with pytest.raises(ConfigError, match="tokenizer"):
        sample_coarse_to_fine(stage1, create("ctf_stage2_tiny"), create("vq_tiny", codebook_size=32), [0])
    with pytest.raises(ConfigError, match="cluster_of"):
        create("ctf_stage2_tiny").set_clusters(cluster_of[:10])
    with pytest.raises(ConfigError, match="cluster_of"):
        create("ctf_stage2_tiny").set_clusters(cluster_of + K)


def test_training_reduces_both_losses():
    torch.manual_seed(0)
    nodrop = dict(token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    stage1, stage2 = create("ctf_stage1_tiny", **nodrop), create("ctf_stage2_tiny", **nodrop)
    cluster_of = kmeans_codebook(torch.randn(V, 8), K)
    stage2.set_clusters(cluster_of)
    labels = torch.arange(8) % 10
    fine = torch.randint(0, V, (8, 4, 4))
    opt = torch.optim.AdamW(list(stage1.parameters()) + list(stage2.parameters()), lr=3e-3)
    first = last = None
    for _ in range(20):
        l1, l2 = stage1_loss(stage1, labels, fine, cluster_of), stage2_loss(stage2, labels, fine)
        opt.zero_grad()
        (l1 + l2).backward()
        opt.step()
        first = first or (l1.item(), l2.item())
        last = (l1.item(), l2.item())
    assert last[0] < 0.8 * first[0] and last[1] < 0.8 * first[1]
    constrained = stage2_loss(stage2, labels, fine, constrained=True)
    assert constrained < stage2_loss(stage2, labels, fine)  # fewer competitors in the softmax


def test_stage2_builds_on_meta_and_reloads(models):
    """hub-style loading: build on the meta device, assign the saved tensors (cluster_of included), same output."""
    _, stage2, _ = models
    with torch.device("meta"):
        clone = create("ctf_stage2_tiny")
    clone.load_state_dict(stage2.state_dict(), assign=True)
    clone.eval()
    labels, coarse = torch.tensor([3]), torch.randint(0, K, (1, 16))
    assert torch.equal(clone.cluster_of, stage2.cluster_of)
    with torch.no_grad():
        torch.testing.assert_close(clone(labels, coarse), stage2(labels, coarse))


def test_stage2_save_and_load_pretrained(models, tmp_path):
    from var.hub import load_pretrained, save_pretrained
    _, stage2, cluster_of = models
    save_pretrained(stage2, tmp_path / "s2")
    loaded = load_pretrained(tmp_path / "s2")
    assert torch.equal(loaded.cluster_of, cluster_of)
    coarse = torch.randint(0, K, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(torch.tensor([2]), coarse), stage2(torch.tensor([2]), coarse))
