"""The trainer: one loop for tokenizers, VAR and AR models, launched with ``torchrun`` or as a single process.

    torchrun --nproc_per_node=8 -m var.cli.train var --data /imagenet/train ...   # DDP (NCCL on GPU, gloo on CPU)
    var-train var --data shapes ...                                               # one process

Reads ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` (set by torchrun). Features: DDP or FSDP2 (``fully_shard``,
per transformer block), fp32 / bf16 / fp16 autocast (GradScaler only for fp16), gradient accumulation and
clipping, linear warm-up then cosine / linear decay, weight decay only on weight matrices, EMA, per-rank seeds,
tqdm + CSV/JSONL (+ TensorBoard when installed) metrics on rank 0, periodic and final atomic checkpoints, and
``resume`` that restores model, optimizer, scheduler, scaler, EMA, data position and every rank's RNGs so the
resumed run continues exactly as the uninterrupted one.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from var.errors import CheckpointError, ConfigError
from var.train.checkpoint import (checkpoint_path, latest_valid_checkpoint, load_checkpoint, prune_checkpoints,
                                  save_checkpoint)
from var.train.data import ResumableBatchSampler
from var.train.objectives import Objective
from var.utils.devices import check_device
from var.utils.checks import (AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY_BELOW_ONE,
                              check_fields)
from var.utils.files import write_text_atomic

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# matrices never decayed (vectors and biases never are), as in the VAR and Infinity releases: learned positions,
# start tokens, level embedding, shared AdaLN gains, attention scales, Infinity's null caption and text-pool query;
# each names a parameter of VAR or Infinity (tested)
NO_DECAY_KEYWORDS = ("pos_1LC", "pos_start", "lvl_embed", "ada_gss", "scale_mul", "cfg_uncond",
                     "text_proj_for_sos.ca.mat_q")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of one run (model/data settings live in the CLI configs)."""

    out_dir: str = "runs/train"
    steps: int = 1000                  # optimizer steps
    batch_size: int = 32               # per rank and micro-step; global batch = batch_size * grad_accum * world
    grad_accum: int = 1
    lr: float = 3e-4                   # peak learning rate
    warmup_steps: int = 0
    warmup_start_ratio: float = 0.005  # warm-up starts at this fraction of lr (VAR: wp0 = 0.005)
    schedule: str = "cosine"           # after warm-up: cosine | linear | constant
    end_lr_ratio: float = 0.01         # final lr = end_lr_ratio * lr
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    clip_grad: float = 2.0             # max global grad norm (0: no clipping, norm still logged)
    precision: str = "fp32"            # fp32 | bf16 | fp16 (fp16 uses a GradScaler)
    ema_decay: float = 0.0             # 0: no EMA
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    resume: str = ""                   # "" | "auto" (newest valid checkpoint in out_dir) | a checkpoint path
    overwrite: bool = False            # a fresh run may replace the run files of an earlier run in out_dir
    fsdp: bool = False
    find_unused_parameters: bool = False  # DDP: some parameters get no gradient (e.g. unused phi convolutions)
    device: str = "auto"               # auto: cuda:LOCAL_RANK when CUDA is available, else cpu
    num_workers: int = 0
    progress: bool = True

    # fields a resume may change, applied as given: bookkeeping, and steps (the schedule is stretched to the new
    # length); every other field shapes the trajectory and the saved optimizer/scheduler state, so a resume that
    # changes it is refused instead of half-applied
    RESUMABLE_CHANGES = ("steps", "out_dir", "resume", "overwrite", "log_every", "ckpt_every", "keep_checkpoints", "progress",
                         "num_workers", "device")

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("steps, batch_size and grad_accum must be >= 1")
        check_fields(self, {"lr": POSITIVE, "warmup_steps": NON_NEGATIVE, "warmup_start_ratio": FRACTION,
                            "end_lr_ratio": FRACTION, "weight_decay": NON_NEGATIVE,
                            "betas": PROBABILITY_BELOW_ONE, "clip_grad": NON_NEGATIVE,
                            "ema_decay": PROBABILITY_BELOW_ONE, "ckpt_every": AT_LEAST_ONE,
                            "keep_checkpoints": NON_NEGATIVE, "log_every": AT_LEAST_ONE, "num_workers": NON_NEGATIVE})
        if self.device != "auto":
            check_device(self.device)
        if len(self.betas) != 2:
            raise ConfigError(f"betas must be two numbers, got {self.betas}")


# ---- distributed environment ----------------------------------------------------------------------------------
@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "DistEnv":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(env: DistEnv, device: torch.device) -> None:
    """Start the process group (NCCL on CUDA, gloo on CPU) when launched with more than one rank."""
    if env.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)
        log.info("rank %d/%d joined the %s process group", env.rank, env.world_size, backend)


def resolve_device(name: str, env: DistEnv) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{env.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{env.local_rank}")
    return device


# ---- optimisation pieces --------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float, no_decay_keywords=NO_DECAY_KEYWORDS) -> list[dict]:
    """Two AdamW groups: decay for weight matrices (ndim >= 2), none for vectors, biases, positions, levels."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith("bias") or any(k in name for k in no_decay_keywords):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "group": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"}]


def decay_parameter_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names in the decay / no-decay groups (for logging and tests)."""
    groups = param_groups(model, 1.0)
    ids = {id(p) for p in groups[0]["params"]}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    return [n for n in names if id(params[n]) in ids], [n for n in names if id(params[n]) not in ids]


class LRSchedule:
    """Multiplier of the peak lr: linear warm-up from ``start_ratio`` to 1, then cosine or linear decay to
    ``end_ratio`` at ``total`` (or constant). A plain object so ``LambdaLR.state_dict`` can save it."""

    def __init__(self, total: int, warmup: int, kind: str, start_ratio: float, end_ratio: float):
        self.total, self.warmup, self.kind = total, warmup, kind
        self.start_ratio, self.end_ratio = start_ratio, end_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.start_ratio + (1 - self.start_ratio) * step / self.warmup
        if self.kind == "constant":
            return 1.0
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 0.5 * (1 + math.cos(math.pi * t)) if self.kind == "cosine" else 1 - t
        return self.end_ratio + (1 - self.end_ratio) * shape


class EMA:
    """Exponential moving average of a model's floating-point parameters (fp32 shadow copies)."""

    # Not torch.optim.swa_utils.AveragedModel: its first update copies the weights instead of averaging from the
    # initial ones, its state dict ("module.*", "n_averaged") cannot read the {"decay", "shadow"} checkpoints
    # already written, and it deep-copies the (possibly FSDP-sharded) module in the model's dtype; resumes of
    # existing runs would then not reproduce them bit for bit.

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {n: _full(t) for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise CheckpointError("the checkpoint's EMA does not match the model's parameters")
        for n, t in state["shadow"].items():
            _copy_into(self.shadow[n], t)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                _copy_into(p.data, self.shadow[n])


def _flat_diff(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, old, new)`` of every entry that differs between two nested JSON dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _flat_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((f"{prefix}{k}", a, b))
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full CPU copy of a (possibly FSDP-sharded DTensor) tensor."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    if hasattr(dst, "to_local") and not hasattr(src, "to_local"):  # full tensor -> local shard of a DTensor
        from torch.distributed.tensor import distribute_tensor
        src = distribute_tensor(src.to(dst.device, dst.dtype), dst.device_mesh, dst.placements)
    dst.copy_(src.to(device=dst.device, dtype=dst.dtype))


def rng_state() -> dict:
    """Global RNG states as tensors/tuples only (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_rank(seed: int, rank: int) -> int:
    """Seed every global RNG with a rank-specific value (dropout/drop-path differ across ranks)."""
    s = seed * 1000 + rank
    torch.manual_seed(s)
    np.random.seed(s % 2 ** 32)
    random.seed(s)
    return s


# ---- metrics --------------------------------------------------------------------------------------------------
class MetricsLogger:
    """Rank-0 metrics: ``metrics.jsonl`` (every key), ``metrics.csv`` (the first row's keys) and TensorBoard
    event files when ``tensorboard`` is installed. Appends on resume, after :meth:`drop_after` has removed the
    rows of steps the resumed run will redo."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled, self.out_dir = enabled, out_dir
        self._csv_keys: list[str] | None = None
        self._tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        csv_path = out_dir / "metrics.csv"
        if csv_path.exists() and csv_path.stat().st_size:
            with open(csv_path) as f:
                self._csv_keys = next(csv.reader(f), None)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(out_dir / "tb"))
        except Exception:  # tensorboard not installed
            self._tb = None

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        new = self._csv_keys is None
        if new:
            self._csv_keys = list(row)
        with open(self.out_dir / "metrics.csv", "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._csv_keys, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, row["step"])

    def drop_after(self, step: int) -> None:
        """Remove the rows logged after ``step`` (a run killed after its last checkpoint logged them; the
        resumed run logs those steps again), so every step appears once in the files. A last line cut short by
        the kill (no newline) goes too."""
        if not self.enabled:
            return
        for name in ("metrics.jsonl", "metrics.csv"):
            path = self.out_dir / name
            if not path.exists():
                continue
            lines = path.read_text().splitlines(keepends=True)
            rows = [ln for ln in lines if ln.endswith("\n")]
            if name.endswith(".jsonl"):
                kept = [ln for ln in rows if ln.strip() and json.loads(ln)["step"] <= step]
            else:
                kept = rows[:1] + [ln for ln in rows[1:] if int(next(csv.reader([ln]))[0]) <= step]
            if len(kept) != len(lines):
                write_text_atomic(path, "".join(kept))
        if self._tb is not None:  # TensorBoard hides the events after purge_step when the writer reopens
            from torch.utils.tensorboard import SummaryWriter
            self._tb.close()
            self._tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=step + 1)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


# ---- the output folder ----------------------------------------------------------------------------------------
RUN_FILES = ("metrics.jsonl", "metrics.csv", "tb", "train_config.json", "run_config.json", "model")


def prepare_out_dir(config: TrainConfig, is_main: bool = True) -> None:
    """A fresh run (no ``resume``) needs an empty or missing ``out_dir``: in a used one it would append to the old
    metrics and its checkpoint pruning (by step number) would delete its own newer files. ``overwrite`` deletes
    the earlier run's files (checkpoints, metrics, TensorBoard events, configs, exported model) first (rank 0)."""
    out = Path(config.out_dir)
    if config.resume or not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not config.overwrite:
        raise ConfigError(f"--out-dir {out} is not empty ({', '.join(entries[:5])}"
                          f"{' ...' if len(entries) > 5 else ''}): give --resume auto to continue that run, "
                          f"--overwrite to replace it, or another --out-dir")
    if is_main:
        import shutil
        for path in list(out.glob("ckpt_*.pt")) + list(out.glob("ckpt_*.pt.tmp")) + [out / n for n in RUN_FILES]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        log.info("--overwrite: removed the earlier run's files from %s", out)


# ---- the trainer ----------------------------------------------------------------------------------------------
class Trainer:
    """Owns the loop. ``model`` is the bare module (built identically on every rank); ``objective`` computes
    ``(loss, metrics)`` from ``(model, batch)``; ``dataset`` yields ``(input, label)`` for ``(index, aug_seed)``.
    """

    def __init__(self, model: nn.Module, objective: Objective, dataset, config: TrainConfig,
                 env: DistEnv | None = None, run_settings: dict | None = None):
        """``run_settings``: JSON-able settings outside :class:`TrainConfig` that a resume must not change (the
        CLI passes its data and model sections, with the tokenizer's content hash); saved in every checkpoint."""
        self.config, self.env = config, env or DistEnv.from_env()
        self.run_settings = json.loads(json.dumps(run_settings or {}, default=str))
        prepare_out_dir(config, self.env.is_main)  # before the process group: no rank has written anything yet
        self.device = resolve_device(config.device, self.env)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        init_distributed(self.env, self.device)
        self.out_dir = Path(config.out_dir)
        self.model = model.to(self.device)
        self.objective = objective.to(self.device)
        self.dataset = dataset
        groups = param_groups(self.model, config.weight_decay)
        self.wrapped = self._wrap(self.model)
        if config.fsdp:  # fully_shard replaced the parameters with DTensors: rebuild the groups
            groups = param_groups(self.model, config.weight_decay)
        fused = self.device.type == "cuda" and not config.fsdp
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, LRSchedule(config.steps, config.warmup_steps, config.schedule,
                                       config.warmup_start_ratio, config.end_lr_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.ema = EMA(self.model, config.ema_decay) if config.ema_decay > 0 else None
        self.sampler = ResumableBatchSampler(len(dataset), config.batch_size, seed=config.seed,
                                             rank=self.env.rank, world_size=self.env.world_size)
        self.step = 0
        self.metrics = MetricsLogger(self.out_dir, self.env.is_main)

    # -- setup --
    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.env.distributed:
            return model
        if self.config.fsdp:
            from torch.distributed.fsdp import fully_shard
            for block in getattr(model, "blocks", []):
                fully_shard(block)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=self.config.find_unused_parameters)

    def _autocast(self):
        dtype = PRECISIONS[self.config.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    # -- state --
    def _model_state(self) -> dict:
        if self.config.fsdp and self.env.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def _optim_state(self) -> dict:
        if self.config.fsdp and self.env.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _gather(self, obj) -> list:
        if not self.env.distributed:
            return [obj]
        out = [None] * self.env.world_size
        dist.all_gather_object(out, obj)
        return out

    def state_dict(self) -> dict:
        """Full training state (collective under DDP/FSDP: every rank must call it)."""
        per_rank = {"rng": rng_state(), "objective": self.objective.extra_state()}
        ranks = self._gather(per_rank)
        return {"step": self.step, "model": self._model_state(), "optimizer": self._optim_state(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None, "data": self.sampler.state_dict(),
                "ranks": ranks, "world_size": self.env.world_size, "config": asdict(self.config),
                "run_settings": self.run_settings}

    def check_resume_settings(self, state: dict, path) -> None:
        """Refuse a checkpoint written with other optimisation, data or model settings (named in the error)."""
        saved = json.loads(json.dumps({k: v for k, v in state["config"].items()
                                       if k not in TrainConfig.RESUMABLE_CHANGES}, default=str))
        now = json.loads(json.dumps({k: v for k, v in asdict(self.config).items()
                                     if k not in TrainConfig.RESUMABLE_CHANGES}, default=str))
        diff = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
                if saved.get(k) != now.get(k)]
        old_run = state.get("run_settings")
        if old_run is not None:  # checkpoints written before run settings were recorded have none
            diff += [f"{k}: {a!r} -> {b!r}" for k, a, b in _flat_diff(old_run, self.run_settings)]
        if diff:
            raise ConfigError(f"cannot resume from {path}: it was written with other settings ({'; '.join(diff)}). "
                              f"Only {', '.join(TrainConfig.RESUMABLE_CHANGES)} may change on a resume; use the "
                              f"original settings, or start a new run in another --out-dir")

    def check_finite_state(self, state: dict, path) -> None:
        """Refuse a checkpoint whose model, optimizer or EMA state holds NaN or infinite values (training on from
        it would only produce NaNs): :class:`NonFiniteWeightsError` naming the file and each tensor."""
        from var.hub.io import non_finite_tensors, raise_non_finite
        bad = [f"model.{entry}" for entry in non_finite_tensors(
            state["model"], {name for name, _ in self.model.named_buffers()})]
        ordered = [p for group in self.optimizer.param_groups for p in group["params"]]
        names = {id(p): n for n, p in self.model.named_parameters()}
        param_names = {i: names.get(id(p), str(i)) for i, p in enumerate(ordered)}
        for key, slots in state["optimizer"].get("state", {}).items():  # keyed by index, or by name under FSDP
            name = key if isinstance(key, str) else param_names.get(key, str(key))
            bad += [f"optimizer.{name}.{entry}" for entry in non_finite_tensors(slots)]
        if state.get("ema"):
            bad += [f"ema.{entry}" for entry in non_finite_tensors(state["ema"]["shadow"])]
        raise_non_finite(bad, f"training checkpoint {path}")

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.env.world_size:
            raise CheckpointError(f"checkpoint was written by {state['world_size']} ranks; this run has "
                                  f"{self.env.world_size} (exact resume needs the same world size)")
        from var.hub import load_strict
        if self.config.fsdp and self.env.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        else:
            load_strict(self.model, state["model"], f"the model being trained ({type(self.model).__name__})")
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state["ema"] is None:
                raise CheckpointError("this run uses EMA but the checkpoint has none")
            self.ema.load_state_dict(state["ema"])
        self.sampler.load_state_dict(state["data"])
        mine = state["ranks"][self.env.rank]
        set_rng_state(mine["rng"])
        self.objective.load_extra_state(mine["objective"])
        self.step = int(state["step"])

    def save(self) -> Path | None:
        state = self.state_dict()
        path = None
        if self.env.is_main:
            path = save_checkpoint(state, checkpoint_path(self.out_dir, self.step))
            prune_checkpoints(self.out_dir, self.config.keep_checkpoints)
            log.info("saved %s", path)
        if self.env.distributed:
            dist.barrier()
        return path

    def maybe_resume(self) -> bool:
        """Restore from ``config.resume``; returns whether a checkpoint was loaded."""
        resume = self.config.resume
        if not resume:
            return False
        if resume == "auto":
            found = latest_valid_checkpoint(self.out_dir)
            if found is None:
                log.info("no usable checkpoint in %s: starting from scratch", self.out_dir)
                self.metrics.drop_after(0)  # rows of an earlier attempt would be logged a second time
                return False
            path, state = found
        else:
            path, state = Path(resume), load_checkpoint(resume)
        self.check_finite_state(state, path)
        self.check_resume_settings(state, path)
        self.load_state_dict(state)
        self._apply_schedule_length()
        self.metrics.drop_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def _apply_schedule_length(self) -> None:
        """The restored schedule keeps the checkpoint's length; a resume with another ``steps`` gets its own (and
        the learning rate of the current step from it), so the recorded ``steps`` is the one applied."""
        schedule = self.scheduler.lr_lambdas[0]
        if schedule.total != self.config.steps:
            log.info("resume: learning-rate schedule length %d -> %d steps", schedule.total, self.config.steps)
            schedule.total = self.config.steps
            for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base_lr * schedule(self.scheduler.last_epoch)
            self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    # -- loop --
    def _loader(self):
        def collate(items):
            return torch.utils.data.default_collate(items)
        # a private generator: creating the iterator must not draw from the global RNG (it would shift the
        # drop-path stream of a resumed run); augmentation seeds come from the sampler, not from workers
        gen = torch.Generator().manual_seed(self.config.seed * 1000 + self.env.rank)
        return iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=self.sampler,
                                                num_workers=self.config.num_workers, collate_fn=collate,
                                                generator=gen, persistent_workers=False))

    def _to_device(self, batch):
        return [b.to(self.device, non_blocking=True) if torch.is_tensor(b) else b for b in batch]

    def _reduce_metrics(self, sums: dict[str, float], count: int) -> dict[str, float]:
        keys = sorted(sums)
        vals = torch.tensor([sums[k] / max(count, 1) for k in keys], dtype=torch.float64)
        if self.env.distributed:
            dist.all_reduce(vals)
            vals /= self.env.world_size
        return dict(zip(keys, vals.tolist()))

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns this rank's mean metrics."""
        config = self.config
        self.wrapped.train()
        sums: dict[str, float] = {}
        for micro, batch in enumerate(batches):
            last = micro == len(batches) - 1
            sync = contextlib.nullcontext()
            if not last and hasattr(self.wrapped, "no_sync"):
                sync = self.wrapped.no_sync()
            elif not last and config.fsdp and hasattr(self.wrapped, "set_requires_gradient_sync"):
                self.wrapped.set_requires_gradient_sync(False)
            if last and config.fsdp and hasattr(self.wrapped, "set_requires_gradient_sync"):
                self.wrapped.set_requires_gradient_sync(True)
            with sync:
                with self._autocast():
                    loss, metrics = self.objective(self.wrapped, self._to_device(batch))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.step}")
                self.scaler.scale(loss / len(batches)).backward()
            sums["loss"] = sums.get("loss", 0.0) + loss.item() / len(batches)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / len(batches)
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip_grad if config.clip_grad > 0 else float("inf"))
        grad_norm = float(_full(grad_norm)) if torch.is_tensor(grad_norm) else float(grad_norm)
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():  # (fp16: the scaler skips the step)
            # the optimizer step would write NaN into the weights and the next checkpoint would keep them
            raise FloatingPointError(f"non-finite gradient norm {grad_norm} at step {self.step}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        sums.update(self.objective.after_step(self.step))
        sums["grad_norm"] = grad_norm
        self.step += 1
        return sums

    def fit(self) -> nn.Module:
        """Train to ``config.steps`` (resuming first when asked); returns the bare model."""
        config = self.config
        if not self.maybe_resume():
            seed_rank(config.seed, self.env.rank)
            self.objective.reseed(config.seed * 1000 + self.env.rank + 7919)
        if self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "train_config.json").write_text(json.dumps(asdict(config), indent=2))
        from tqdm.auto import tqdm
        bar = tqdm(total=config.steps, initial=self.step, disable=not (config.progress and self.env.is_main),
                   desc=f"train {type(self.model).__name__}", unit="step", dynamic_ncols=True)
        it = self._loader()
        window: dict[str, float] = {}
        count, t0, started, first_step = 0, time.time(), time.time(), self.step
        log_lines = self.env.is_main and not config.progress  # without the bar: one log line per interval
        while self.step < config.steps:
            batches = []
            for _ in range(config.grad_accum):
                batches.append(next(it))
                self.sampler.advance()
            metrics = self.train_step(batches)
            for k, v in metrics.items():
                window[k] = window.get(k, 0.0) + v
            count += 1
            bar.update(1)
            if self.step % config.log_every == 0 or self.step == config.steps:
                row = self._reduce_metrics(window, count)
                row = {"step": self.step, "lr": self.scheduler.get_last_lr()[0],
                       "sec_per_step": (time.time() - t0) / count, **row}
                shown = {k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "acc", "psnr", "grad_norm")}
                bar.set_postfix(shown)
                if log_lines:
                    eta = (time.time() - started) / (self.step - first_step) * (config.steps - self.step)
                    log.info("step %d/%d %s lr %.3g %.3g s/step eta %s", self.step, config.steps,
                             " ".join(f"{k} {v}" for k, v in shown.items()), row["lr"], row["sec_per_step"],
                             time.strftime("%H:%M:%S", time.gmtime(eta)))
                self.metrics.log(row)
                window, count, t0 = {}, 0, time.time()
            if self.step % config.ckpt_every == 0 or self.step == config.steps:
                self.save()
        bar.close()
        self.metrics.close()
        return self.model

    def export_model(self) -> nn.Module:
        """The bare model with EMA weights copied in when EMA is on (modifies ``self.model`` in place)."""
        if self.ema is not None:
            self.ema.copy_to(self.model)
        return self.model

    def close(self) -> None:
        if self.env.distributed and dist.is_initialized():
            dist.destroy_process_group()
