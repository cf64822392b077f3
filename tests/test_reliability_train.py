"""Issue 13: training runs that silently lost work or silently ran with other settings than they recorded
(see docs/reliability.md)."""
import pytest
import torch

from var.errors import ConfigError
from var.models import create
from var.train.data import ProceduralShapes
from var.train.objectives import VARObjective
from var.train.trainer import TrainConfig, Trainer


def _trainer(out_dir, steps=4, resume="", run_settings=None, **overrides):
    torch.manual_seed(0)
    tok = create("msvq_tiny").eval()
    model = create("var_tiny")
    dataset = ProceduralShapes(16, image_size=16, seed=0)
    cfg = dict(out_dir=str(out_dir), steps=steps, batch_size=4, lr=3e-3, ckpt_every=2, log_every=1,
               progress=False, resume=resume, seed=5)
    cfg.update(overrides)
    kwargs = {} if run_settings is None else {"run_settings": run_settings}
    return Trainer(model, VARObjective(tok, seed=0), dataset, TrainConfig(**cfg), **kwargs)


@pytest.mark.parametrize("change", [dict(lr=1e-3), dict(weight_decay=0.1), dict(schedule="linear"),
                                    dict(grad_accum=2), dict(warmup_steps=1), dict(ema_decay=0.5)])
def test_resume_with_changed_optimisation_settings_is_refused(tmp_path, change):
    _trainer(tmp_path, steps=2).fit()
    resumed = _trainer(tmp_path, **{"steps": 2, "resume": "auto", **change})
    with pytest.raises(ConfigError, match=next(iter(change))):
        resumed.fit()


def test_resume_with_more_steps_applies_the_longer_schedule(tmp_path):
    _trainer(tmp_path, steps=2, warmup_steps=0).fit()
    resumed = _trainer(tmp_path, steps=4, resume="auto", warmup_steps=0)
    resumed.maybe_resume()
    schedule = resumed.scheduler.lr_lambdas[0]
    assert resumed.step == 2 and schedule.total == 4  # not the checkpoint's 2: the cosine now ends at step 4
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 * schedule(2))
    resumed.fit()
    assert resumed.step == 4


def test_resume_may_change_bookkeeping(tmp_path):
    _trainer(tmp_path, steps=2).fit()
    resumed = _trainer(tmp_path, steps=2, resume="auto", log_every=2, ckpt_every=1, keep_checkpoints=5)
    resumed.fit()
    assert resumed.step == 2


def test_resume_with_other_data_or_tokenizer_is_refused(tmp_path):
    settings = {"data": {"data_seed": 0}, "model": {"tokenizer": "a", "tokenizer_sha256": "1"}}
    _trainer(tmp_path, steps=2, run_settings=settings).fit()
    for key, changed in (("data_seed", {**settings, "data": {"data_seed": 1}}),
                         ("tokenizer_sha256", {**settings, "model": {"tokenizer": "a", "tokenizer_sha256": "2"}})):
        with pytest.raises(ConfigError, match=key):
            _trainer(tmp_path, steps=2, resume="auto", run_settings=changed).fit()


def test_hidden_and_empty_folders_are_not_classes(tmp_path):
    import numpy as np
    from PIL import Image
    from var.train.data import ImageFolderDataset
    for name in ("cat", "dog", ".ipynb_checkpoints", "empty"):
        (tmp_path / name).mkdir()
    for name in ("cat", "dog", ".ipynb_checkpoints"):
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(tmp_path / name / "a.png")
    ds = ImageFolderDataset(tmp_path, image_size=8)
    assert ds.classes == ["cat", "dog"] and [label for _, label in ds.samples] == [0, 1]


def test_16_bit_pngs_load_with_their_brightness(tmp_path):
    import numpy as np
    from PIL import Image
    from var.train.data import ImageFolderDataset
    (tmp_path / "a").mkdir()
    grey16 = np.full((8, 8), 32768, np.uint16)  # mid grey in 16 bits
    Image.fromarray(grey16).save(tmp_path / "a" / "g.png")
    x, _ = ImageFolderDataset(tmp_path, image_size=8, train=False)[0]
    assert x.shape == (3, 8, 8) and torch.allclose(x, torch.zeros_like(x), atol=0.02)  # ~0 in [-1, 1]


@pytest.mark.parametrize("field,value", [("ema_decay", 1.5), ("ema_decay", -0.1), ("lr", -1.0), ("lr", float("nan")),
                                         ("lr", float("inf")), ("weight_decay", -0.1), ("ckpt_every", 0),
                                         ("log_every", 0), ("warmup_steps", -1), ("clip_grad", -1.0),
                                         ("keep_checkpoints", -1), ("betas", (1.5, 0.9)),
                                         ("warmup_start_ratio", 2.0), ("end_lr_ratio", -0.5), ("num_workers", -1)])
def test_out_of_range_train_options_are_named_errors(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("flag,value", [("--ema-decay", "1.5"), ("--cond-drop-rate", "1.5"), ("--image-size", "0"),
                                        ("--num-images", "0"), ("--drop-path-rate", "-0.1"),
                                        ("--label-smoothing", "1.0"), ("--mlp-ratio", "inf"), ("--depth", "0")])
def test_var_train_range_checks_every_numeric_option_before_training(tmp_path, flag, value):
    from var.cli.train import main
    with pytest.raises(ConfigError, match=flag.lstrip("-").replace("-", "_")):
        main(["var", "--tokenizer", str(tmp_path / "none"), "--out-dir", str(tmp_path / "o"), flag, value])


def test_a_fresh_run_in_a_used_out_dir_is_refused_unless_overwrite(tmp_path):
    import json
    from var.train.checkpoint import list_checkpoints
    _trainer(tmp_path, steps=4).fit()
    with pytest.raises(ConfigError, match="--overwrite"):
        _trainer(tmp_path, steps=2)  # used to append to the old metrics, then prune its own new checkpoints
    fresh = _trainer(tmp_path, steps=2, overwrite=True)
    fresh.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000002.pt"]
    steps = [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_resume_auto_without_a_usable_checkpoint_does_not_duplicate_metric_rows(tmp_path):
    import json
    from var.train.checkpoint import list_checkpoints
    _trainer(tmp_path, steps=2).fit()
    for path in list_checkpoints(tmp_path):
        path.write_bytes(b"VARCKPT1" + b"0" * 40)  # every checkpoint fails verification
    _trainer(tmp_path, steps=2, resume="auto").fit()
    steps = [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2]


@pytest.mark.parametrize("where", ["model", "optimizer"])
@pytest.mark.parametrize("resume", ["auto", "path"])
def test_resume_refuses_a_checkpoint_with_non_finite_tensors(tmp_path, where, resume):
    from var.errors import NonFiniteWeightsError
    from var.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
    _trainer(tmp_path, steps=2).fit()
    path = list_checkpoints(tmp_path)[0]
    state = load_checkpoint(path)
    if where == "model":
        name = "head.weight"
        state["model"][name][0, 0] = float("nan")
    else:  # AdamW's second moment of the first parameter of the first group
        index = state["optimizer"]["param_groups"][0]["params"][0]
        state["optimizer"]["state"][index]["exp_avg_sq"][..., 0] = float("inf")
        trainer = _trainer(tmp_path / "names")
        name = next(n for n, p in trainer.model.named_parameters()
                    if p is trainer.optimizer.param_groups[0]["params"][0]) + ".exp_avg_sq"
    save_checkpoint(state, path)
    resumed = _trainer(tmp_path, steps=4, resume="auto" if resume == "auto" else str(path))
    with pytest.raises(NonFiniteWeightsError, match=rf"{path.name}.*{where}\.{name}"):
        resumed.fit()
    assert resumed.step == 0 and list_checkpoints(tmp_path) == [path]  # nothing trained, nothing written


def test_var_train_resume_of_a_non_finite_checkpoint_exits_2_naming_file_and_tensor(tmp_path, capsys):
    from var.cli.train import cli
    from var.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
    args = ["tokenizer-ms", "--image-size", "16", "--num-images", "16", "--vocab-size", "16", "--z-channels", "4",
            "--ch", "8", "--ch-mult", "1", "2", "--norm-groups", "4", "--patch-nums", "1", "8", "--batch-size", "4",
            "--no-progress", "--out-dir", str(tmp_path)]
    assert cli([*args, "--steps", "1"]) == 0
    path = list_checkpoints(tmp_path)[0]
    state = load_checkpoint(path)
    slots = next(iter(state["optimizer"]["state"].values()))
    slots["exp_avg"].view(-1)[0] = float("nan")
    save_checkpoint(state, path)
    assert cli([*args, "--steps", "2", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "optimizer." in err and ".exp_avg (1 NaN" in err
    assert list_checkpoints(tmp_path) == [path]


def test_a_diverged_step_stops_training_before_a_non_finite_checkpoint_is_written(tmp_path):
    """A finite loss with NaN gradients (here: d sqrt(x)/dx at 0) would put NaN into every weight; the run stops
    at that step, so the last checkpoint is finite and a resume continues from it."""
    from var.train.checkpoint import list_checkpoints, load_checkpoint
    trainer = _trainer(tmp_path, steps=4, ckpt_every=1, keep_checkpoints=5)
    objective_forward = trainer.objective.forward

    def poisoned(model, batch):
        loss, metrics = objective_forward(model, batch)
        if trainer.step == 2:
            first = next(p for p in model.parameters() if p.requires_grad)
            loss = loss + (first * 0).sum().sqrt()  # value 0, gradient 0 * inf = NaN
        return loss, metrics
    trainer.objective.forward = poisoned
    with pytest.raises(FloatingPointError, match="step 2"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000002.pt", "ckpt_00000001.pt"]
    state = load_checkpoint(list_checkpoints(tmp_path)[0])
    assert all(torch.isfinite(state["model"][name]).all() for name, _ in trainer.model.named_parameters())
    resumed = _trainer(tmp_path, steps=4, ckpt_every=1, keep_checkpoints=5, resume="auto")
    resumed.fit()
    assert resumed.step == 4 and all(torch.isfinite(p).all() for p in resumed.model.parameters())


def _folder_with_a_truncated_png(root):
    import numpy as np
    from PIL import Image
    (root / "a").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 50 * i, np.uint8)).save(root / "a" / f"{i}.png")
    data = (root / "a" / "1.png").read_bytes()
    (root / "a" / "1.png").write_bytes(data[: len(data) // 2])
    return root / "a" / "1.png"


def test_a_corrupt_image_is_skipped_and_logged_by_name_not_a_crash_at_every_resume(tmp_path, caplog):
    from var.train.data import ImageFolderDataset
    bad = _folder_with_a_truncated_png(tmp_path)
    ds = ImageFolderDataset(tmp_path, image_size=8, train=False)
    index = [p for p, _ in ds.samples].index(bad)
    x, label = ds[index]
    assert x.shape == (3, 8, 8) and label == 0
    assert ds.skipped == [str(bad)] and str(bad) in caplog.text
    assert torch.equal(x, ds[index][0])  # the substitute is deterministic (resumes stay exact)


def test_reading_a_truncated_png_for_metrics_names_the_file(tmp_path):
    from var.eval.export import load_images
    bad = _folder_with_a_truncated_png(tmp_path)
    with pytest.raises(ConfigError, match="1.png"):
        load_images(bad.parent)


def _disk_full_on_png_save(monkeypatch):
    import errno
    from PIL import Image

    def save(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG")  # a few bytes, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", save)


@pytest.mark.parametrize("writer", ["grid", "pngs", "eval_pngs"])
def test_a_full_disk_leaves_no_partial_png_under_its_final_name(tmp_path, monkeypatch, writer):
    from var.eval.export import write_pngs
    from var.utils.images import save_image_grid, save_images
    images = torch.rand(2, 3, 8, 8)
    _disk_full_on_png_save(monkeypatch)
    with pytest.raises(OSError):
        {"grid": lambda: save_image_grid(images, tmp_path / "grid.png"),
         "pngs": lambda: save_images(images, tmp_path),
         "eval_pngs": lambda: write_pngs(images, tmp_path, [0, 1])}[writer]()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither a 0-byte PNG nor a temporary


def test_a_full_disk_during_a_checkpoint_write_leaves_no_tmp_file(tmp_path, monkeypatch):
    import errno
    import os
    from var.train.checkpoint import checkpoint_path, save_checkpoint

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", fsync)
    state = {k: 0 for k in ("step", "model", "optimizer", "scheduler", "data", "ranks", "config")}
    with pytest.raises(OSError):
        save_checkpoint(state, checkpoint_path(tmp_path, 1))
    assert list(tmp_path.iterdir()) == []


def test_reference_statistics_are_written_atomically(tmp_path, monkeypatch):
    import errno
    import numpy as np
    from var.eval.metrics import save_reference_statistics

    def savez(file, **arrays):  # like np.savez: a name or a file object
        if hasattr(file, "write"):
            file.write(b"PK")
        else:
            with open(file, "wb") as f:
                f.write(b"PK")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(OSError):
        save_reference_statistics(np.random.default_rng(0).normal(size=(10, 3)), tmp_path / "ref.npz", "x")
    assert list(tmp_path.iterdir()) == []
