"""A few trainer steps of a tiny Infinity on procedural shapes with generated captions (offline tiny T5)."""
import math

import pytest
import torch

from infinity_helpers import tiny_infinity, tiny_vae
from var.utils.scales import ScaleSchedule
from var.train.data import ProceduralShapes
from var.train.objectives_infinity import InfinityObjective, shape_captions
from var.train.trainer import TrainConfig, Trainer

pytest.importorskip("transformers")
from t2i_helpers import tiny_t5_encoder  # noqa: E402

SCHEDULE = ScaleSchedule(((1, 1), (2, 2), (4, 4)))  # 16 px images with the stride-4 tiny VAE


def test_captions_name_each_class():
    caps = shape_captions()
    assert len(set(caps)) == 10 and caps[0] == "a red disc solid" and "stripes" in caps[5]


def test_objective_loss_and_text_dropout():
    vae, model = tiny_vae(), tiny_infinity()
    captions = tiny_t5_encoder().encode(shape_captions())
    images, labels = ProceduralShapes(8, image_size=16).tensors()
    obj = InfinityObjective(vae, SCHEDULE, captions, cond_drop_rate=0.0)
    loss, metrics = obj(model, (images, labels))
    assert math.isfinite(loss.item()) and 0 <= metrics["bit_acc"] <= 1
    loss.backward()
    assert model.head.weight.grad is not None and model.cfg_uncond.grad is None
    model.zero_grad()
    dropped, _ = InfinityObjective(vae, SCHEDULE, captions, cond_drop_rate=1.0)(model, (images, labels))
    dropped.backward()
    assert model.cfg_uncond.grad is not None and model.cfg_uncond.grad.abs().sum() > 0


def test_trainer_steps_reduce_the_loss(tmp_path):
    torch.manual_seed(0)
    vae, model = tiny_vae(), tiny_infinity(drop_path_rate=0.1)
    captions = tiny_t5_encoder().encode(shape_captions())
    objective = InfinityObjective(vae, SCHEDULE, captions, seed=0)
    data = ProceduralShapes(16, image_size=16)
    images, labels = data.tensors()
    with torch.no_grad():
        before = objective(model.eval(), (images, labels))[0].item()
    trainer = Trainer(model, objective, data, TrainConfig(out_dir=str(tmp_path), steps=6, batch_size=8, lr=3e-3,
                                                          ckpt_every=100, progress=False, device="cpu"))
    trainer.fit()
    trainer.close()
    with torch.no_grad():
        after = objective(model.eval(), (images, labels))[0].item()
    assert after < before
