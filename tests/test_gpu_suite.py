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
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
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
