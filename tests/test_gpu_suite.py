"""The prepared GPU suite (scripts/gpu_suite.sh, var.eval.gpu_suite) checked on the CPU: its dry run, fail-fast
tiers with the summary printed last, time budgets, the combined reports written after every section (what the device
tool can bring back: at most 8 files, plain names), reruns of some sections, the goal columns, and the --original
plumbing on a stand-in checkout."""
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from var.eval import gpu_suite

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHON=sys.executable)  # the suite's interpreter
    env.pop("TRITON_INTERPRET", None)
    return env


def _numbers(row, *cols):
    return all(isinstance(row.get(c), (int, float)) and math.isfinite(row[c]) and row[c] > 0 for c in cols)


def test_dry_run_checks_the_suite_on_the_cpu(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu_suite.sh", "--dry-run", "--out", str(tmp_path)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    table = out[out.rindex("| gpu_suite step | result |"):]  # the one short table comes last
    for step in ("gpu tests (bodies on the CPU) | ok", "benchmarks quick (tiny, CPU) | ok", "quick-cpu.md",
                 "quick-cpu.json", "gpu_suite-quick.log"):
        assert step in table, out
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())  # what the device tool brings back from $OUT
    assert files == ["gpu_suite-quick.log", "quick-cpu.json", "quick-cpu.md"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    assert "| gpu_suite step | result |" in (tmp_path / "gpu_suite-quick.log").read_text()
    sections = json.loads((tmp_path / "quick-cpu.json").read_text())["sections"]
    assert list(sections) == [name for name, _, _ in gpu_suite.tier_benchmarks(gpu_suite.Setup.for_run(True), "quick")]
    assert all(s["status"] == "ok" for s in sections.values()), sections
    # the goals' numbers are computed in the tables: (c) the kernel at 10 % vs SDPA over the full cache and its KV share
    kernel = next(r for r in sections["ragged_kernel_quick"]["rows"] if r["method"].startswith("ragged kernel"))
    assert kernel["budget"] == 0.1 and _numbers(kernel, "speedup_vs_full_sdpa", "ms")
    assert abs(kernel["cached_kv_pct_of_full"] - 10) < 1
    # (b) the large VAR's transformer FLOPs and % of the measured matmul ceiling and of the datasheet's 989 TFLOP/s
    ceiling, eager = sections["var_d30_roofline_quick"]["rows"]
    assert _numbers(ceiling, "tflops_per_s") and ceiling["pct_of_measured_matmul"] == 100
    assert _numbers(eager, "transformer_gflop", "tflops_per_s", "pct_of_measured_matmul", "pct_of_datasheet_989")
    assert eager["pct_of_measured_matmul"] == pytest.approx(100 * eager["tflops_per_s"] / ceiling["tflops_per_s"])
    # compile time in its own column; goal (a), the ratio to the original: the --original test below
    compiled = [r for r in sections["var_sampling_quick"]["rows"] if r["sampler"] != "ours (eager)"]
    assert compiled and all(_numbers(r, "compile_s", "graphs") for r in compiled)


def test_transformer_flops_are_counted_with_attention():
    """The FLOP count of goal (b) includes attention (SDPA's math path) and no tokenizer convolution: on the tiny VAR
    with CFG rows it equals the count by hand."""
    import torch

    setup = gpu_suite.Setup.for_run(dry=True)
    model, tok = gpu_suite._var_pair(setup, "var_tiny")
    c, labels = model.config, 2
    rows = 2 * labels  # CFG doubles the rows
    lens = [pn * pn for pn in tok.patch_nums]
    seen = [sum(lens[:i + 1]) for i in range(len(lens))]
    C, V, hidden = c.width, c.vocab_size, int(c.mlp_ratio * c.width)
    per_token = c.depth * 2 * (3 * C * C + C * C + 2 * hidden * C) + 2 * C * V  # qkv, proj, fc1, fc2; the head
    tokens = sum(rows * n * per_token for n in lens)
    attention = sum(rows * c.depth * 4 * n * s * C for n, s in zip(lens, seen))  # q k^T and p v
    adaln = len(lens) * rows * (c.depth * 2 * C * 6 * C + 2 * C * 2 * C)  # per scale and row: blocks' and head's
    word_embed = labels * sum(lens[1:]) * 2 * c.latent_channels * C  # the next scale's input, before the CFG copy
    assert gpu_suite.transformer_flops(setup, model, tok, torch.tensor([1, 2])) == tokens + attention + adaln + \
        word_embed


def test_a_failing_benchmark_stops_the_tier_after_the_summary(tmp_path, monkeypatch, capsys):
    setup = gpu_suite.Setup.for_run(dry=True)

    def broken():
        setup.start_rows().append(dict(a=2.0))  # a row measured before the failure is kept
        assert (tmp_path / "quick-cpu.md").exists(), "the first section's report is written before the next starts"
        raise RuntimeError("boom")
    monkeypatch.setattr(gpu_suite, "tier_benchmarks", lambda s, t: [("first", 10, lambda: [dict(a=1.5, b="x")]),
                                                                    ("second", 10, broken), ("third", 10, lambda: [])])
    with pytest.raises(RuntimeError, match="boom"):
        gpu_suite.run_tier(setup, "quick", tmp_path)
    printed = capsys.readouterr().out
    assert "| first | ok |" in printed and "FAILED: RuntimeError: boom" in printed and "third" not in printed
    report = json.loads((tmp_path / "quick-cpu.json").read_text())
    assert {"gpu", "torch", "triton", "cuda"} <= set(report["environment"]) and list(report["sections"]) == [
        "first", "second"]
    assert report["sections"]["first"]["rows"] == [dict(a=1.5, b="x")]
    assert report["sections"]["second"]["rows"] == [dict(a=2.0)]
    assert report["sections"]["second"]["status"].startswith("FAILED: RuntimeError: boom")
    assert "GPU: none (CPU dry run" in (tmp_path / "quick-cpu.md").read_text()


def test_sections_run_under_time_budgets(tmp_path, monkeypatch):
    """Past its deadline a section starts no new measurement (``skipped: time budget`` rows); one still running
    ``grace_s`` later is stopped with its rows kept; the tier moves on, and a spent tier budget skips the rest."""
    setup = gpu_suite.Setup.for_run(dry=True)

    def polite():  # checks the budget before each measurement
        rows = setup.start_rows()
        for i in range(100):
            if setup.out_of_time(dict(i=i)):
                break
            time.sleep(0.05)
            rows.append(dict(i=i, s=0.05))
        return rows

    def stuck():  # a measurement that never ends (a compilation, say)
        setup.start_rows().append(dict(i=0, s=0.0))
        time.sleep(30)
    def rest():  # uses up the tier's budget (its own deadline is the tier's end) without checking it
        time.sleep(max(0.0, setup.deadline - time.monotonic()) + 0.05)
        return [dict(ok=1)]
    monkeypatch.setattr(gpu_suite, "tier_benchmarks", lambda s, t: [
        ("polite", 0.2, polite), ("stuck", 0.2, stuck), ("after", 60, rest), ("late", 60, lambda: [dict(ok=2)])])
    t0 = time.monotonic()
    summary = gpu_suite.run_tier(setup, "quick", tmp_path, budget_s=3.0, grace_s=0.3)
    assert time.monotonic() - t0 < 6
    sections = json.loads((tmp_path / "quick-cpu.json").read_text())["sections"]
    assert sections["polite"]["status"] == "partial: time budget"
    assert sections["polite"]["rows"][-1]["note"] == gpu_suite.SKIPPED and 1 <= len(sections["polite"]["rows"]) < 10
    assert sections["stuck"]["status"] == "partial: time budget" and sections["stuck"]["rows"][0] == dict(i=0, s=0.0)
    assert sections["stuck"]["rows"][-1]["note"].startswith(gpu_suite.SKIPPED)
    assert sections["after"]["status"] == "ok"
    assert sections["late"]["status"] == gpu_suite.SKIPPED and [s["benchmark"] for s in summary][-1] == "late"


def test_only_reruns_sections_into_the_existing_report(tmp_path):
    """``--only`` (what a second device call runs after a failure) replaces those sections in the report already in
    --out and keeps the others; an unknown section name is refused."""
    assert gpu_suite.main(["--dry-run", "--out", str(tmp_path), "--only", "ragged_kernel_quick,kv_policies_quick"]) == 0
    path = tmp_path / "quick-cpu.json"
    first = json.loads(path.read_text())["sections"]
    assert list(first) == ["ragged_kernel_quick", "kv_policies_quick"]
    assert gpu_suite.main(["--dry-run", "--out", str(tmp_path), "--only", "ragged_kernel_quick"]) == 0
    again = json.loads(path.read_text())["sections"]
    assert again["kv_policies_quick"] == first["kv_policies_quick"]
    assert again["ragged_kernel_quick"]["seconds"] != first["ragged_kernel_quick"]["seconds"]
    assert gpu_suite.main(["--dry-run", "--out", str(tmp_path), "--only", "nope"]) == 2


def test_shell_reruns_one_section_without_the_test_tier(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu_suite.sh", "--dry-run", "--no-tests", "--only", "ragged_kernel_quick",
                           "--out", str(tmp_path), "--budget-s", "120"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "gpu tests" not in out[out.rindex("| gpu_suite step | result |"):], out
    assert list(json.loads((tmp_path / "quick-cpu.json").read_text())["sections"]) == ["ragged_kernel_quick"]


def test_cli_refuses_a_real_run_without_cuda_and_a_bad_original(tmp_path, capsys):
    import torch

    if not torch.cuda.is_available():
        assert gpu_suite.main(["--tier", "quick"]) == 2
    assert gpu_suite.main(["--dry-run", "--original", str(tmp_path)]) == 2
    assert "no models/ package" in capsys.readouterr().err


def test_original_sampler_is_timed_on_the_same_weights(tmp_path):
    """A stand-in for the original checkout with the release's constructor signatures (``models.VQVAE``,
    ``models.VAR``; ``build_vae_var`` would fix width = 64 * depth and V = 4096, which the tiny model lacks) and
    ``autoregressive_infer_cfg``, whose top-k fails above V as the release's does: the suite builds it with our
    sizes, loads our weights into it strictly and reports its speed as a ratio."""
    repo = tmp_path / "VAR"
    (repo / "models").mkdir(parents=True)
    (repo / "models" / "__init__.py").write_text(textwrap.dedent('''
        import torch
        from var.models import create
        from var.samplers import sample_next_scale

        class VQVAE:
            def __init__(self, vocab_size=4096, z_channels=32, ch=128, dropout=0.0, beta=0.25, using_znorm=False,
                         quant_conv_ks=3, quant_resi=0.5, share_quant_resi=4, default_qresi_counts=0,
                         v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), test_mode=True):
                self.vocab_size, self.Cvae, self.patch_nums = vocab_size, z_channels, v_patch_nums

        class VAR(type(create("var_tiny"))):
            def __init__(self, vae_local, num_classes=1000, depth=16, embed_dim=1024, num_heads=16, mlp_ratio=4.,
                         drop_rate=0., attn_drop_rate=0., drop_path_rate=0., norm_eps=1e-6, shared_aln=False,
                         cond_drop_rate=0.1, attn_l2_norm=False, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                         flash_if_available=True, fused_if_available=True):
                ref = create("var_tiny").config
                assert (vae_local.vocab_size, vae_local.Cvae, depth, embed_dim, num_heads, num_classes,
                        tuple(patch_nums)) == (ref.vocab_size, ref.latent_channels, ref.depth, ref.width,
                                               ref.num_heads, ref.num_classes, tuple(ref.patch_nums))
                super().__init__(ref)

            def autoregressive_infer_cfg(self, B, label_B, g_seed, cfg, top_k, top_p):
                assert top_k <= self.config.vocab_size, "selected index k out of range"
                tok = create("msvq_tiny").eval()
                out = sample_next_scale(self, tok, label_B, cfg=cfg, top_k=top_k, top_p=top_p,
                                        generator=torch.Generator().manual_seed(g_seed))
                return out.images
        '''))
    out_dir = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "var.eval.gpu_suite", "--dry-run", "--original", str(repo),
                           "--out", str(out_dir)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((out_dir / "quick-cpu.json").read_text())["sections"]["var_sampling_quick"]["rows"]
    original = [r for r in rows if r["sampler"] == "original VAR"]
    assert len(original) == 2 and all(r["ours_speedup"] > 0 for r in original)
    ours = {(r["sampler"], r["batch"]): r["s_per_batch"] for r in rows if r["sampler"] != "original VAR"}
    for r in original:  # the ratio is the original's time over our best mode's at that batch size
        assert r["ours_speedup"] == pytest.approx(r["s_per_batch"] / ours[(f"ours ({r['ours_best']})", r["batch"])])


def test_full_tier_has_scalekv_and_hack_on_infinity_2b_shapes(monkeypatch):
    """The --full tier's Infinity benchmark: 2B shapes on the GPU (checked on the meta device here), its body on the
    CPU with the dry run's tiny Infinity: a full-cache row, then ScaleKV and HACK at 10 % with PSNR vs the full cache
    and less live KV."""
    import torch

    from var.models.infinity import Infinity, InfinityConfig
    gpu = gpu_suite.Setup.for_run(dry=False)
    assert "infinity_kv" in [name for name, _, _ in gpu_suite.tier_benchmarks(gpu, "full")]
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
