"""The prepared GPU suite (scripts/gpu_suite.sh, var.eval.gpu_suite) checked on the CPU: its dry run, fail-fast
tiers with the summary printed last, the reports, and the --original plumbing on a stand-in checkout."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from var.eval import gpu_suite

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHON=sys.executable)  # the suite's interpreter
    env.pop("TRITON_INTERPRET", None)
    return env


def test_dry_run_checks_the_suite_on_the_cpu():
    proc = subprocess.run(["bash", "scripts/gpu_suite.sh", "--dry-run"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    table = out[out.rindex("| gpu_suite step | result |"):]  # the one short table comes last
    for step in ("gpu tests (bodies on the CPU) | ok", "benchmarks quick (tiny, CPU) | ok", "var_sampling_quick.md",
                 "ragged_kernel_quick.md", "kv_policies_quick.md"):
        assert step in table, out


def test_a_failing_benchmark_stops_the_tier_after_the_summary(tmp_path, monkeypatch, capsys):
    setup = gpu_suite.Setup.for_run(dry=True)

    def broken():
        raise RuntimeError("boom")
    monkeypatch.setattr(gpu_suite, "tier_benchmarks", lambda s, t: [("first", lambda: [dict(a=1.5, b="x")]),
                                                                    ("second", broken), ("third", lambda: [])])
    with pytest.raises(RuntimeError, match="boom"):
        gpu_suite.run_tier(setup, "quick", tmp_path)
    printed = capsys.readouterr().out
    assert "| first | ok |" in printed and "FAILED: RuntimeError: boom" in printed and "third" not in printed
    report = json.loads((tmp_path / "first.json").read_text())
    assert report["rows"] == [dict(a=1.5, b="x")] and {"gpu", "torch", "triton", "cuda"} <= set(report["environment"])
    assert "GPU: none (CPU dry run" in (tmp_path / "first.md").read_text()
    assert not (tmp_path / "third.md").exists()


def test_cli_refuses_a_real_run_without_cuda_and_a_bad_original(tmp_path, capsys):
    import torch

    if not torch.cuda.is_available():
        assert gpu_suite.main(["--tier", "quick"]) == 2
    assert gpu_suite.main(["--dry-run", "--original", str(tmp_path)]) == 2
    assert "no models/ package" in capsys.readouterr().err


def test_original_sampler_is_timed_on_the_same_weights(tmp_path):
    """A stand-in for the original checkout (``models.build_vae_var`` and ``autoregressive_infer_cfg``): the suite
    imports it, loads our weights into it strictly and reports its speed as a ratio."""
    repo = tmp_path / "VAR"
    (repo / "models").mkdir(parents=True)
    (repo / "models" / "__init__.py").write_text(textwrap.dedent('''
        import torch
        from var.models import create
        from var.samplers import sample_next_scale

        class OriginalVAR(type(create("var_tiny"))):
            def autoregressive_infer_cfg(self, B, label_B, g_seed, cfg, top_k, top_p):
                tok = create("msvq_tiny").eval()
                out = sample_next_scale(self, tok, label_B, cfg=cfg, top_k=top_k, top_p=top_p,
                                        generator=torch.Generator().manual_seed(g_seed))
                return out.images

        def build_vae_var(device, depth, shared_aln, flash_if_available, fused_if_available):
            ref = create("var_tiny")
            assert depth == ref.config.depth
            return None, OriginalVAR(ref.config).to(device)
        '''))
    out_dir = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "var.eval.gpu_suite", "--dry-run", "--original", str(repo),
                           "--out", str(out_dir)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((out_dir / "var_sampling_quick.json").read_text())["rows"]
    original = [r for r in rows if r["sampler"] == "original VAR"]
    assert len(original) == 2 and all(r["ours_speedup"] > 0 for r in original)


def test_full_tier_has_scalekv_and_hack_on_infinity_2b_shapes(monkeypatch):
    """The --full tier's Infinity benchmark: 2B shapes on the GPU (checked on the meta device here), its body on the
    CPU with the dry run's tiny Infinity: a full-cache row, then ScaleKV and HACK at 10 % with PSNR vs the full cache
    and less live KV."""
    import torch

    from var.models.infinity import Infinity, InfinityConfig
    gpu = gpu_suite.Setup.for_run(dry=False)
    assert "infinity_kv" in [name for name, _ in gpu_suite.tier_benchmarks(gpu, "full")]
    with torch.device("meta"):
        model = Infinity(InfinityConfig(**gpu.infinity))
    assert (model.config.depth, model.config.width, model.config.num_heads) == (32, 2048, 16)  # Infinity-2B
    assert gpu.infinity_pixels == "1M"
    monkeypatch.setenv("VAR_KERNELS", "torch")  # the interpreted Triton selection is minutes here (tested elsewhere)
    rows = gpu_suite.bench_infinity_kv(gpu_suite.Setup.for_run(dry=True), [0.1], batches=(2,))
    assert [(r["cache"], r["budget"]) for r in rows] == [("full cache", 1.0), ("ScaleKV", 0.1), ("HACK", 0.1)]
    full, *compressed = rows
    assert full["psnr_vs_full_db"] == float("inf") and full["bits_equal"] == 1.0
    for r in compressed:
        assert r["kv_live_mb"] < full["kv_live_mb"] and 0 < r["psnr_vs_full_db"] < float("inf")
        assert 0 < r["bits_equal"] < 1 and r["images_per_s"] > 0
