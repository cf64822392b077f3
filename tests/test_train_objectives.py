"""Each objective reduces its loss in a few steps; class dropout, label smoothing, loss weighting, perceptual
and GAN pieces behave as documented."""
import pytest
import torch
import torch.nn.functional as F

from var.errors import CheckpointError, ConfigError
from var.models import create
from var.train.data import ProceduralShapes
from var.train.objectives import (ARObjective, PerceptualLoss, VARObjective, VGG16Features, VQObjective,
                                  codebook_metrics, drop_labels, scale_loss_weights, split_scales)


def _batch(n=8, size=16, seed=0):
    return ProceduralShapes(n, image_size=size, seed=seed).tensors()


def _losses(model, objective, batch, steps, lr):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss, metrics = objective(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        objective.after_step(step)
        losses.append(loss.item())
    return losses, metrics


def test_vq_objective_multiscale_reduces_loss():
    model = create("msvq_tiny")
    losses, metrics = _losses(model, VQObjective(recon="l1"), _batch(), 12, 3e-3)
    assert losses[-1] < 0.8 * losses[0]
    assert 0 < metrics["code_used"] <= 1 and metrics["code_perplexity"] >= 1 and "psnr" in metrics


def test_vq_objective_single_scale_l2_with_gan_reduces_loss():
    model = create("vq_tiny")
    objective = VQObjective(recon="l2", gan_weight=0.1, gan_start=2)
    d0 = [p.clone() for p in objective.discriminator.parameters()]
    losses, metrics = _losses(model, objective, _batch(), 12, 3e-3)
    assert losses[-1] < losses[0]
    assert "g_loss" in metrics
    assert any(not torch.equal(a, b) for a, b in zip(d0, objective.discriminator.parameters()))
    state = objective.extra_state()
    fresh = VQObjective(recon="l2", gan_weight=0.1, gan_start=2)
    fresh.load_extra_state(state)
    for a, b in zip(fresh.discriminator.parameters(), objective.discriminator.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError):
        fresh.load_extra_state(VQObjective().extra_state())


def test_var_objective_reduces_loss():
    tok = create("msvq_tiny").eval()
    model = create("var_tiny", cond_drop_rate=0.1)
    model.init_weights(init_adaln_gamma=1e-3)
    images, labels = _batch()
    losses, metrics = _losses(model, VARObjective(tok, seed=1), (images, labels), 15, 3e-3)
    assert losses[-1] < 0.8 * losses[0]
    assert 0 <= metrics["acc"] <= 1


def test_var_objective_tokens_equal_images_and_mean_ce():
    tok = create("msvq_tiny").eval()
    model = create("var_tiny").eval()
    images, labels = _batch()
    tokens = torch.cat([i.flatten(1) for i in tok.encode(images)], dim=1)
    obj = VARObjective(tok, cond_drop_rate=0.0)
    loss_img, _ = obj(model, (images, labels))
    loss_tok, _ = obj(model, (tokens, labels))
    assert torch.equal(loss_img, loss_tok)
    logits = model(labels, tok.teacher_forcing_input(split_scales(tokens, tok.patch_nums)))
    ref = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())  # uniform 1/L weighting == mean CE
    torch.testing.assert_close(loss_img, ref)
    smooth, m = VARObjective(tok, cond_drop_rate=0.0, label_smoothing=0.1)(model, (images, labels))
    assert not torch.allclose(smooth, loss_img) and m["ce"] == pytest.approx(loss_img.item(), rel=1e-5)
    w = scale_loss_weights((1, 2, 3))
    assert w.shape == (1, 14) and torch.allclose(w.sum(), torch.tensor(1.0))


def test_ar_objective_reduces_loss():
    tok = create("vq_tiny").eval()
    model = create("gpt_tiny", token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    model.init_weights()
    images, labels = _batch()
    losses, _ = _losses(model, ARObjective(tok, seed=2), (images, labels), 15, 3e-3)
    assert losses[-1] < 0.8 * losses[0]


def test_ar_objective_matches_next_token_ce():
    tok = create("vq_tiny").eval()
    model = create("gpt_tiny").eval()
    images, labels = _batch()
    tokens = tok.encode(images)[0].flatten(1)
    loss, _ = ARObjective(tok, cond_drop_rate=0.0)(model, (tokens, labels))
    ref = F.cross_entropy(model(labels, tokens).flatten(0, 1), tokens.flatten())
    torch.testing.assert_close(loss, ref)


def test_drop_labels_seeded():
    labels = torch.arange(1000) % 10
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = drop_labels(labels, 0.1, 10, g1), drop_labels(labels, 0.1, 10, g2)
    assert torch.equal(a, b)
    frac = (a == 10).float().mean().item()
    assert 0.05 < frac < 0.15
    assert torch.equal(drop_labels(labels, 0.0, 10, g1), labels)
    assert (drop_labels(labels, 1.0, 10, g1) == 10).all()


def test_codebook_metrics():
    usage = torch.zeros(2, 8)
    usage[:, :4] = 1.0
    m = codebook_metrics(usage)
    assert m["code_used"] == pytest.approx(0.5) and m["code_perplexity"] == pytest.approx(4.0, rel=1e-5)


def test_perceptual_loss_from_local_file_only(tmp_path):
    with pytest.raises(CheckpointError):
        PerceptualLoss(tmp_path / "missing.pth")
    with pytest.raises(ConfigError):
        VQObjective(perceptual_weight=1.0)
    from safetensors.torch import save_file
    torch.manual_seed(0)
    vgg = VGG16Features()
    save_file({k: v.contiguous() for k, v in vgg.state_dict().items()}, str(tmp_path / "vgg.safetensors"))
    loss_fn = PerceptualLoss(tmp_path / "vgg.safetensors")
    x, _ = _batch(2, 32)
    assert loss_fn(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert loss_fn(x, x.flip(-1)).item() > 0
    objective = VQObjective(perceptual_weight=0.5, perceptual_path=str(tmp_path / "vgg.safetensors"))
    _, metrics = objective(create("msvq_tiny", patch_nums=(1, 2, 4, 8)), (x, None))
    assert metrics["perceptual"] > 0


def test_codebook_data_init_and_dead_code_restart_fight_collapse():
    images, _ = _batch(16, 16)
    usage = {}
    for init, restart in (("model", 0), ("data", 3)):
        torch.manual_seed(0)
        model = create("msvq_tiny", vocab_size=64)
        objective = VQObjective(codebook_init=init, restart_dead_every=restart, seed=0)
        _, metrics = _losses(model, objective, (images, None), 6, 1e-3)
        usage[init] = metrics["code_perplexity"]
    assert usage["data"] > usage["model"]
    state = objective.extra_state()
    assert state["initialized"] and "hits" in state


def test_quantizer_inputs_cover_all_scales():
    tok = create("msvq_tiny")
    images, _ = _batch(2, 16)
    rows = VQObjective.quantizer_inputs(tok, images)
    assert rows.shape == (2 * sum(p * p for p in tok.patch_nums), tok.embed_dim)
    ss = create("vq_tiny")
    assert VQObjective.quantizer_inputs(ss, images).shape == (2 * 16, ss.embed_dim)
