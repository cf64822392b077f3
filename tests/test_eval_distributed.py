"""Distributed evaluation sampling: 2 gloo ranks give disjoint, complete shards; a killed run resumes exactly."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from var.errors import ConfigError
from var.eval.distributed import SamplingPlan, finalize, generate_samples, missing_shards
from var.eval.export import list_pngs, load_images

ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_THREADS = 1
ENV = {**os.environ, "OMP_NUM_THREADS": str(SUBPROCESS_THREADS), "PYTHONPATH": str(ROOT)}


@pytest.fixture
def like_subprocess():
    """Run this process's sampling at the subprocesses' thread count: float reductions (and so the rounding of a
    pixel to uint8) depend on how many threads split them, and images are compared bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(SUBPROCESS_THREADS)
    yield
    torch.set_num_threads(before)


def tiny_sample_fn():
    """The same random-weight var_tiny/msvq_tiny that `var-eval sample --random-init --seed 0` builds."""
    from var.cli.eval import make_sample_fn
    from var.models import create
    from var.samplers.registry import SAMPLERS
    torch.manual_seed(0)
    tok, model = create("msvq_tiny").eval(), create("var_tiny").eval()
    return make_sample_fn(SAMPLERS["next_scale"], {"model": model, "tokenizer": tok}, {})


def shard_records(out_dir):
    return [json.loads(p.read_text()) for p in sorted((Path(out_dir) / "shards").glob("*.json"))]


def test_plan_shards_partition_indices_and_seeds():
    plan = SamplingPlan(num_images=23, num_classes=10, shard_size=5, seed=3)
    ranks = [plan.shards_of_rank(r, 3) for r in range(3)]
    assert sorted(s for r in ranks for s in r) == list(range(plan.num_shards))
    covered = [i for s in range(plan.num_shards) for i in plan.shard_indices(s)]
    assert covered == list(range(23))
    assert len({plan.shard_seed(s) for s in range(plan.num_shards)}) == plan.num_shards
    assert plan.labels(range(8, 13)).tolist() == [8, 9, 0, 1, 2]


def test_torchrun_two_gloo_ranks_disjoint_complete_and_rank_invariant(tmp_path, like_subprocess):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "var.cli.eval", "sample", "--random-init", "--out", str(out), "--per-class", "3", "--shard-size", "4",
           "--device", "cpu", "--seed", "0"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = shard_records(out)
    assert len(records) == 8  # ceil(30 / 4)
    assert {r["rank"] for r in records} == {0, 1}
    assert all(r["rank"] == r["shard"] % 2 and r["world_size"] == 2 for r in records)
    indices = [i for r in records for i in range(r["start"], r["stop"])]
    assert sorted(indices) == list(range(30)) and len(indices) == len(set(indices))
    arr = load_images(out / "images.npz")
    assert arr.shape == (30, 16, 16, 3) and arr.dtype == np.uint8
    # one process with the same plan produces the very same images
    plan = SamplingPlan(30, 10, 4, 0)
    generate_samples(tiny_sample_fn(), tmp_path / "one", plan, {"k": 1}, progress=False)
    np.testing.assert_array_equal(load_images(tmp_path / "one" / "images.npz"), arr)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import var.eval.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_eval_distributed import tiny_sample_fn
    real_write, calls = dist.write_pngs, []
    def write_then_die(images, directory, indices):
        calls.append(1)
        if len(calls) == 3:  # third shard: write half of its PNGs, then SIGKILL before the marker
            real_write(images[:2], directory, list(indices)[:2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(images, directory, indices)
    dist.write_pngs = write_then_die
    dist.generate_samples(tiny_sample_fn(), {out!r}, dist.SamplingPlan(22, 10, 4, 7), {{"k": 1}}, progress=False)
""")


def test_killed_run_resumes_without_duplicates(tmp_path, like_subprocess):
    out = tmp_path / "killed"
    script = KILLER.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-3000:]
    plan = SamplingPlan(22, 10, 4, 7)
    assert missing_shards(out, plan) == [2, 3, 4, 5]
    assert len(list_pngs(out / "images")) == 4 * 2 + 2  # two full shards + half of the third
    with pytest.raises(ConfigError):
        finalize(out, plan)  # incomplete sets are refused, never packed
    with pytest.raises(ConfigError):
        generate_samples(tiny_sample_fn(), out, plan, {"k": 2}, progress=False)  # other settings: refused

    summary = generate_samples(tiny_sample_fn(), out, plan, {"k": 1}, progress=False)
    assert summary["skipped"] == 2 and summary["sampled"] == 4
    assert [p.name for p in list_pngs(out / "images")] == [f"{i:06d}.png" for i in range(22)]
    assert not [p for p in (out / "images").iterdir() if p.name.startswith(".")]  # no temporaries left
    generate_samples(tiny_sample_fn(), tmp_path / "clean", plan, {"k": 1}, progress=False)
    np.testing.assert_array_equal(load_images(out / "images.npz"), load_images(tmp_path / "clean" / "images.npz"))
    again = generate_samples(tiny_sample_fn(), out, plan, {"k": 1}, progress=False)
    assert again["sampled"] == 0 and again["skipped"] == 6
