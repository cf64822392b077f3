"""Trainer state: kill-and-resume reproduces the uninterrupted run; corrupt/partial checkpoints are detected and
the previous one stays usable; schedules, weight-decay groups, precision and EMA."""
import json
import os

import pytest
import torch

from var.errors import CheckpointError, ConfigError
from var.models import create
from var.models.infinity import Infinity, InfinityConfig
from var.train.checkpoint import (checkpoint_path, latest_valid_checkpoint, list_checkpoints, load_checkpoint,
                                  save_checkpoint)
from var.train.data import ProceduralShapes
from var.train.objectives import VARObjective
from var.train.trainer import EMA, LRSchedule, TrainConfig, Trainer, decay_parameter_names


class Killed(Exception):
    pass


def _trainer(out_dir, steps=6, resume="", **overrides):
    torch.manual_seed(0)
    tok = create("msvq_tiny").eval()
    model = create("var_tiny", drop_path_rate=0.2, cond_drop_rate=0.5)  # exercises the global and objective RNGs
    model.init_weights(init_adaln_gamma=1e-2)
    dataset = ProceduralShapes(48, image_size=16, seed=0, hflip=True)
    cfg = dict(out_dir=str(out_dir), steps=steps, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=2,
               ckpt_every=3, keep_checkpoints=3, log_every=1, ema_decay=0.9, progress=False, resume=resume, seed=5)
    cfg.update(overrides)
    return Trainer(model, VARObjective(tok, seed=0), dataset, TrainConfig(**cfg))


def _kill_after(trainer, step):
    original = trainer.train_step

    def train_step(batches):
        if trainer.step == step:
            raise Killed
        return original(batches)
    trainer.train_step = train_step


def test_kill_and_resume_is_bitwise_identical(tmp_path):
    ref = _trainer(tmp_path / "ref")
    ref.fit()
    ref_weights = {k: v.clone() for k, v in ref.model.state_dict().items()}
    ref_ema = {k: v.clone() for k, v in ref.ema.shadow.items()}

    run = _trainer(tmp_path / "run")
    _kill_after(run, 4)  # dies in the middle of step 5, after the step-3 checkpoint
    with pytest.raises(Killed):
        run.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["ckpt_00000003.pt"]
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a row cut short by the kill
    resumed = _trainer(tmp_path / "run", resume="auto")
    resumed.fit()
    assert resumed.step == 6
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, ref_weights[k]), k
    for k, v in resumed.ema.shadow.items():
        assert torch.equal(v, ref_ema[k]), k
    # step 4 was logged before the kill and again after the resume: the files keep every step once
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,lr") and [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4, 5, 6]
    steps = [json.loads(r)["step"] for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_corrupt_checkpoint_detected_and_previous_used(tmp_path):
    run = _trainer(tmp_path, steps=6)
    run.fit()
    newest, older = list_checkpoints(tmp_path)
    assert newest.name == "ckpt_00000006.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a partial write (what a non-atomic save could leave)
    with pytest.raises(CheckpointError, match="corrupt|partial"):
        load_checkpoint(newest)
    path, state = latest_valid_checkpoint(tmp_path)
    assert path == older and state["step"] == 3
    flipped = bytearray(older.read_bytes())
    flipped[-10] ^= 0xFF  # a flipped byte is caught by the digest too
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not a var training checkpoint"):
        (tmp_path / "junk.pt").write_bytes(b"junk")
        load_checkpoint(tmp_path / "junk.pt")
    resumed = _trainer(tmp_path, steps=6, resume="auto")
    assert resumed.maybe_resume() and resumed.step == 3


def test_atomic_save_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = checkpoint_path(tmp_path, 1)
    state = {k: 0 for k in ("step", "model", "optimizer", "scheduler", "data", "ranks", "config")}
    save_checkpoint(state, path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_checkpoint({**state, "step": 2}, path)
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 0
    assert list_checkpoints(tmp_path) == [path]  # the leftover .tmp is ignored


def test_lr_schedule_shapes():
    cos = LRSchedule(total=100, warmup=10, kind="cosine", start_ratio=0.005, end_ratio=0.01)
    assert cos(0) == pytest.approx(0.005) and cos(10) == pytest.approx(1.0) and cos(100) == pytest.approx(0.01)
    assert cos(55) == pytest.approx(0.01 + 0.99 * 0.5)
    lin = LRSchedule(total=100, warmup=0, kind="linear", start_ratio=0.0, end_ratio=0.1)
    assert lin(50) == pytest.approx(0.55) and lin(100) == pytest.approx(0.1)
    assert LRSchedule(10, 2, "constant", 0.1, 0.0)(7) == 1.0


def test_weight_decay_only_on_matrices():
    decay, no_decay = decay_parameter_names(create("var_tiny"))
    assert "class_emb.weight" in decay and "blocks.0.attn.mat_qkv.weight" in decay and "head.weight" in decay
    for name in ("pos_1LC", "pos_start", "lvl_embed.weight", "head.bias", "blocks.0.attn.scale_mul_1H11",
                 "blocks.0.attn.q_bias"):
        assert name in no_decay
    assert all("bias" not in n for n in decay)


def test_no_decay_keywords_name_existing_parameters():
    """Every keyword of the no-decay list matches a parameter of some registered model (built on meta)."""
    from var.models import list_models
    from var.train.trainer import NO_DECAY_KEYWORDS
    names = set()
    with torch.device("meta"):
        for model_name in list_models():
            names |= {n for n, _ in create(model_name).named_parameters()}
        names |= {n for n, _ in Infinity(InfinityConfig(depth=2, width=64, num_heads=4)).named_parameters()}
    unused = [k for k in NO_DECAY_KEYWORDS if not any(k in n for n in names)]
    assert not unused, f"no-decay keywords matching no parameter: {unused}"


def test_infinity_matrices_without_decay_are_the_releases():
    """Infinity's release (nowd >= 1) keeps its null caption, start token, level embedding, AdaLN gains, attention
    scales and the text pool's query out of weight decay; so does the trainer."""
    with torch.device("meta"):
        model = Infinity(InfinityConfig(depth=2, width=64, num_heads=4))
    params = dict(model.named_parameters())
    _, no_decay = decay_parameter_names(model)
    assert sorted(n for n in no_decay if params[n].ndim >= 2) == sorted(
        ["cfg_uncond", "pos_start", "lvl_embed.weight", "text_proj_for_sos.ca.mat_q"]
        + [f"blocks.{i}.{p}" for i in range(2) for p in ("ada_gss", "sa.scale_mul_1H11")])


def test_precision_and_config_errors(tmp_path):
    assert not _trainer(tmp_path / "a", precision="bf16").scaler.is_enabled()
    assert _trainer(tmp_path / "b", precision="fp16").scaler.is_enabled()
    with pytest.raises(ConfigError):
        TrainConfig(precision="fp8")
    with pytest.raises(ConfigError):
        TrainConfig(schedule="step")


def test_bf16_steps_run_and_resume_rejects_other_world_size(tmp_path):
    t = _trainer(tmp_path, steps=2, precision="bf16", ckpt_every=2)
    t.fit()
    state = load_checkpoint(checkpoint_path(tmp_path, 2))
    state["world_size"] = 2
    with pytest.raises(CheckpointError, match="ranks"):
        _trainer(tmp_path, steps=2, resume="auto").load_state_dict(state)  # not a fresh run: the out-dir is used


def test_ema_tracks_weights():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, 0.5)
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model)
    target = torch.nn.Linear(2, 2)
    ema.copy_to(target)
    torch.testing.assert_close(target.weight, model.weight - 1.0)


def test_without_the_progress_bar_each_log_interval_is_one_log_line(tmp_path, caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="var.train.trainer"):
        _trainer(tmp_path / "run", steps=4, log_every=2).fit()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"]
    assert all("loss" in line and "s/step" in line and "eta" in line for line in lines)
