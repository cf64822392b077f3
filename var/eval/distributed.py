"""Distributed, resumable generation of evaluation samples (``torchrun --nproc_per_node=N``, or one process).

The N images (default 50 per class) are cut into fixed shards of ``shard_size`` consecutive indices; image ``i``
has class ``i % num_classes``. Shard ``s`` goes to rank ``s % world_size`` and is sampled with its own generator
seeded ``seed * num_shards + s`` -- DiT's per-rank rule (``global_seed * world_size + rank``) applied per shard,
so the images depend on neither the number of ranks nor on where an earlier run was killed.

Layout of ``out_dir``::

    sampling.json         model, sampler, settings, seed, plan (written once; a resume with other settings fails)
    images/000000.png...  one lossless PNG per index (atomic writes)
    shards/00012.json     written after every PNG of shard 12 is on disk (its completion marker)
    images.npz            ``arr_0`` uint8 [N, H, W, 3] for the ADM evaluator (after the last shard)
    .lock                 flock'ed by the running run's rank 0: a second run on the folder stops

A rerun skips shards whose marker exists and whose PNGs are all present; an unfinished shard is sampled again
from its seed and its PNGs are overwritten under the same names, so a kill never duplicates an image.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

try:
    import fcntl
except ImportError:  # not POSIX: no lock (Windows)
    fcntl = None

from var.errors import ConfigError
from var.eval.export import PNG_NAME, list_pngs, pack_npz, write_pngs
from var.utils.files import write_text_atomic

log = logging.getLogger(__name__)

SETTINGS_NAME, IMAGES_DIR, SHARDS_DIR, LOCK_NAME = "sampling.json", "images", "shards", ".lock"
# sample_fn(labels_B, generator) -> (images [B, 3, H, W] in [0, 1], stats dict or None)
SampleFn = Callable[[torch.Tensor, torch.Generator], tuple]


@dataclass(frozen=True)
class SamplingPlan:
    """Which indices, labels and seeds make up the evaluation set."""

    num_images: int
    num_classes: int
    shard_size: int
    seed: int = 0

    def __post_init__(self):
        if self.num_images < 1 or self.num_classes < 1 or self.shard_size < 1:
            raise ConfigError(f"num_images, num_classes and shard_size must be >= 1: {self}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_indices(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_images))

    def labels(self, indices) -> torch.Tensor:
        return torch.as_tensor([i % self.num_classes for i in indices], dtype=torch.long)

    def shard_seed(self, shard: int) -> int:
        return self.seed * self.num_shards + shard

    def shards_of_rank(self, rank: int, world_size: int) -> list[int]:
        return list(range(rank, self.num_shards, world_size))


# ---- process group ------------------------------------------------------------------------------------------
@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    def barrier(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def close(self) -> None:
        if self.initialised_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_distributed(device: str = "cpu") -> DistEnv:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun, accelerate) and join the process group
    (NCCL on CUDA, gloo otherwise); one process when they are absent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    env = DistEnv(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend)
        env.initialised_here = True
    return env


# ---- files --------------------------------------------------------------------------------------------------
def _write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def _differing_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two JSON records (nested dicts compared per key)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def _check_settings(out_dir: Path, record: dict, rank: int) -> None:
    """Rank 0 writes ``sampling.json``; a resume must use identical settings (else a mixed set would result)."""
    path = out_dir / SETTINGS_NAME
    if path.exists():
        old = json.loads(path.read_text())
        old_cmp = {k: v for k, v in old.items() if k != "created"}
        new_cmp = json.loads(json.dumps({k: v for k, v in record.items() if k != "created"}, sort_keys=True, default=str))
        if old_cmp != new_cmp:
            diff = _differing_keys(old_cmp, new_cmp)
            changed = (" (a weight file's content changed since: resuming would mix images of two models)"
                       if any("checkpoint_sha256" in k for k in diff) else "")
            raise ConfigError(f"{path} was written with other settings (differs in {diff}){changed}; "
                              f"use a new output folder or the same settings")
    elif rank == 0:
        _write_json_atomic(path, record)


def shard_done(out_dir: Path, plan: SamplingPlan, shard: int) -> bool:
    marker = out_dir / SHARDS_DIR / f"{shard:05d}.json"
    if not marker.exists():
        return False
    images = out_dir / IMAGES_DIR
    return all((images / PNG_NAME.format(i)).exists() for i in plan.shard_indices(shard))


def missing_shards(out_dir: str | os.PathLike, plan: SamplingPlan) -> list[int]:
    return [s for s in range(plan.num_shards) if not shard_done(Path(out_dir), plan, s)]


# ---- the loop -----------------------------------------------------------------------------------------------
def generate_samples(sample_fn: SampleFn, out_dir: str | os.PathLike, plan: SamplingPlan, settings: dict, *,
                     env: DistEnv | None = None, device="cpu", pack: bool = True, progress: bool = True) -> dict:
    """Sample this rank's unfinished shards into ``out_dir``; rank 0 then checks completeness and packs the npz.

    ``settings`` (model, sampler and its knobs, cache policy, dtype...) is recorded with the plan in
    ``sampling.json``. Returns a summary (shards sampled / skipped by this rank, forward passes, seconds).
    """
    env = env or DistEnv()
    out_dir = Path(out_dir)
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(out_dir, env.rank):
        return _generate_locked(sample_fn, out_dir, plan, settings, env, device, pack, progress)


@contextlib.contextmanager
def _exclusive_lock(out_dir: Path, rank: int):
    """Rank 0 holds an exclusive ``flock`` on ``out_dir/.lock`` for the whole run: a second run on the same folder
    stops with a ConfigError instead of sampling the same shards alongside the first. The kernel drops the lock
    when the holder dies, so a killed run never leaves a stale lock."""
    if rank != 0 or fcntl is None:
        yield
        return
    with open(out_dir / LOCK_NAME, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise ConfigError(f"another var-eval sample run is writing to {out_dir} (it holds {out_dir / LOCK_NAME}); "
                              f"wait for it to finish or use another --out") from e
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _generate_locked(sample_fn, out_dir: Path, plan: SamplingPlan, settings: dict, env: DistEnv, device, pack: bool,
                     progress: bool) -> dict:
    record = {"plan": asdict(plan), "settings": settings, "label_rule": "index % num_classes",
              "seed_rule": "shard s uses torch.Generator seeded seed * num_shards + s",
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if env.rank == 0:
        _check_settings(out_dir, record, env.rank)
    env.barrier()
    if env.rank != 0:
        _check_settings(out_dir, record, env.rank)

    mine = plan.shards_of_rank(env.rank, env.world_size)
    todo = [s for s in mine if not shard_done(out_dir, plan, s)]
    summary = {"rank": env.rank, "shards": len(mine), "skipped": len(mine) - len(todo), "sampled": 0,
               "forward_passes": 0, "seconds": 0.0}
    bar = None
    if progress and env.rank == 0 and todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc=f"sampling (rank 0 of {env.world_size})", unit="shard")
    for shard in todo:
        indices = plan.shard_indices(shard)
        gen = torch.Generator(device=device).manual_seed(plan.shard_seed(shard))
        t0 = time.perf_counter()
        images, stats = sample_fn(plan.labels(indices).to(device), gen)
        seconds = time.perf_counter() - t0
        write_pngs(images, out_dir / IMAGES_DIR, indices)
        passes = int((stats or {}).get("forward_passes", 0))
        _write_json_atomic(out_dir / SHARDS_DIR / f"{shard:05d}.json",
                           {"shard": shard, "rank": env.rank, "world_size": env.world_size,
                            "start": indices.start, "stop": indices.stop, "seed": plan.shard_seed(shard),
                            "seconds": seconds, "stats": stats or {}})
        summary["sampled"] += 1
        summary["forward_passes"] += passes
        summary["seconds"] += seconds
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    env.barrier()
    if env.rank == 0:
        summary.update(finalize(out_dir, plan, pack=pack))
    return summary


def finalize(out_dir: str | os.PathLike, plan: SamplingPlan, pack: bool = True) -> dict:
    """Check that every shard is complete and no stray image exists; pack ``images.npz`` (ADM layout)."""
    out_dir = Path(out_dir)
    missing = missing_shards(out_dir, plan)
    if missing:
        raise ConfigError(f"{len(missing)} shards are unfinished (first: {missing[:5]}); rerun to resume")
    pngs = list_pngs(out_dir / IMAGES_DIR)
    expected = {PNG_NAME.format(i) for i in range(plan.num_images)}
    stray = sorted(p.name for p in pngs if p.name not in expected)
    if stray or len(pngs) != plan.num_images:
        raise ConfigError(f"{out_dir / IMAGES_DIR} holds {len(pngs)} PNGs for {plan.num_images} indices "
                          f"(unexpected: {stray[:5]})")
    for tmp in (out_dir / IMAGES_DIR).glob(".*.tmp"):  # left by a writer killed mid-PNG
        tmp.unlink(missing_ok=True)
    result = {"num_images": len(pngs)}
    if pack:
        result["npz"] = str(pack_npz(out_dir / IMAGES_DIR, out_dir / "images.npz", expected_count=plan.num_images))
        log.info("packed %d images into %s", len(pngs), result["npz"])
    return result
