"""CoDe fine-tuning objectives: drafter CE on its scales, refiner distillation from a teacher."""
import pytest
import torch
import torch.nn.functional as F

from var.errors import ConfigError
from var.models import create
from var.train.objectives_code import (drafter_loss, linear_decay, make_batch, prefix_logits,
                                       refiner_distill_loss)


@pytest.fixture()
def setup():
    torch.manual_seed(2)
    tok = create("msvq_tiny").eval()
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    idx = [torch.randint(0, 64, (6, pn, pn)) for pn in tok.patch_nums]
    return tok, make_batch(tok, labels, idx)


def test_prefix_logits_equal_full_teacher_forcing(setup):
    _, batch = setup
    model = create("var_tiny").eval()
    full = model(batch["labels"], batch["x_BLCv_wo_first"])
    for n in range(1, 5):
        pre = prefix_logits(model, batch, n)
        end = model.begin_ends[n - 1][1]
        torch.testing.assert_close(pre, full[:, :end], atol=1e-5, rtol=1e-5)


def test_drafter_loss_only_sees_drafted_scales(setup):
    _, batch = setup
    model = create("var_tiny").eval()
    full = model(batch["labels"], batch["x_BLCv_wo_first"])
    loss = drafter_loss(model, batch, draft_steps=2)
    torch.testing.assert_close(loss, F.cross_entropy(full[:, :5].flatten(0, 1), batch["targets_BL"][:, :5].flatten()))
    changed = dict(batch, x_BLCv_wo_first=batch["x_BLCv_wo_first"].clone(), targets_BL=batch["targets_BL"].clone())
    changed["x_BLCv_wo_first"][:, 4:] += 1.0    # inputs of scales 2, 3
    changed["targets_BL"][:, 5:] = 0            # targets of scales 2, 3
    torch.testing.assert_close(drafter_loss(model, changed, draft_steps=2), loss)


def test_distillation_zero_for_identical_models_and_weighted(setup):
    _, batch = setup
    teacher = create("var_tiny", depth=3, width=96, num_heads=6).eval()
    refiner = create("var_tiny").eval()
    assert refiner_distill_loss(teacher, teacher, batch, draft_steps=2).abs() < 1e-6
    loss = refiner_distill_loss(refiner, teacher, batch, draft_steps=2, early_weight=0.0, direction="forward")
    with torch.no_grad():
        pt = F.log_softmax(teacher(batch["labels"], batch["x_BLCv_wo_first"]), -1)
    ps = F.log_softmax(refiner(batch["labels"], batch["x_BLCv_wo_first"]), -1)
    kl = (pt.exp() * (pt - ps)).sum(-1)
    torch.testing.assert_close(loss, kl[:, 5:].sum(1).mean() / 30)
    full = refiner_distill_loss(refiner, teacher, batch, draft_steps=2, early_weight=1.0, direction="forward")
    torch.testing.assert_close(full, kl.mean())
    full.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert refiner.head.weight.grad is not None


def test_validation_and_decay(setup):
    _, batch = setup
    model = create("var_tiny")
    assert linear_decay(0, 10) == 1.0 and linear_decay(5, 10) == 0.5 and linear_decay(12, 10) == 0.0
    with pytest.raises(ConfigError):
        linear_decay(0, 0)
    with pytest.raises(ConfigError, match="num_scales"):
        drafter_loss(model, batch, draft_steps=0)
    with pytest.raises(ConfigError, match="direction"):
        refiner_distill_loss(model, model, batch, draft_steps=1, direction="sideways")


def test_training_steps_reduce_both_losses(setup):
    _, batch = setup
    torch.manual_seed(3)
    drafter = create("var_tiny", depth=3, width=96, num_heads=6, drop_path_rate=0.0)
    refiner = create("var_tiny", drop_path_rate=0.0)
    teacher = create("var_tiny", depth=3, width=96, num_heads=6).eval()
    opt_d = torch.optim.AdamW(drafter.parameters(), lr=3e-3)
    opt_r = torch.optim.AdamW(refiner.parameters(), lr=3e-3)
    first = last = None
    for step in range(15):
        ld = drafter_loss(drafter, batch, draft_steps=3)
        lr = refiner_distill_loss(refiner, teacher, batch, draft_steps=3, early_weight=0.5)
        opt_d.zero_grad(); ld.backward(); opt_d.step()
        opt_r.zero_grad(); lr.backward(); opt_r.step()
        first = first or (ld.item(), lr.item())
        last = (ld.item(), lr.item())
    assert last[0] < 0.7 * first[0] and last[1] < 0.7 * first[1]


def test_trainer_adapters(setup):
    from var.train.objectives_code import CoDeDrafterObjective, CoDeRefinerObjective
    tok, batch = setup
    tokens = batch["targets_BL"]
    drafter = create("var_tiny", depth=3, width=96, num_heads=6).eval()
    refiner = create("var_tiny").eval()
    obj = CoDeDrafterObjective(tok, draft_steps=2, cond_drop_rate=0.0)
    loss, metrics = obj(drafter, (tokens, batch["labels"]))
    torch.testing.assert_close(loss, drafter_loss(drafter, batch, draft_steps=2))
    assert metrics["ce_drafted"] == pytest.approx(loss.item())

    obj = CoDeRefinerObjective(tok, drafter, draft_steps=2, decay_steps=4, cond_drop_rate=0.0)
    loss0, m0 = obj(refiner, (tokens, batch["labels"]))
    torch.testing.assert_close(loss0, refiner_distill_loss(refiner, drafter, batch, draft_steps=2, early_weight=1.0))
    obj.after_step(1)
    _, m2 = obj(refiner, (tokens, batch["labels"]))
    assert (m0["early_weight"], m2["early_weight"]) == (1.0, 0.5)
    state = obj.extra_state()
    fresh = CoDeRefinerObjective(tok, drafter, draft_steps=2, decay_steps=4)
    fresh.load_extra_state(state)
    assert fresh.step == 2
    dropped = CoDeDrafterObjective(tok, draft_steps=2, cond_drop_rate=1.0)
    null_batch = dict(batch, labels=torch.full_like(batch["labels"], 10))
    torch.testing.assert_close(dropped(drafter, (tokens, batch["labels"]))[0],
                               drafter_loss(drafter, null_batch, draft_steps=2))
