"""Benchmarks of the prepared GPU suite (``scripts/gpu_suite.sh``): VAR sampling eager vs compiled vs CUDA graphs (and
the original VAR sampler on the same weights), the next-token decode step likewise, the ragged kernel vs SDPA,
compressed caches (on VAR, and ScaleKV / HACK on Infinity-2B shapes at 1024 px), next-token pass cost, CoDe.

Every benchmark is a function returning rows (dicts); :func:`run_tier` runs a tier's sections fail-fast, each under
a wall-clock budget (a section past it records ``skipped: time budget`` rows and the tier moves on; ``--budget-s``
bounds the whole tier), and rewrites one combined ``<out>/<tier>-<gpu>.md`` + ``.json`` after every section (a killed
run keeps the finished tables), naming the GPU, torch, triton and CUDA versions; one short summary table is printed
last. ``--only`` reruns some sections, merged into an existing report. ``--dry-run`` runs the same code on the CPU with
the tiny presets and small shapes (compiled rows traced by dynamo with the ``eager`` backend), to check the suite's
setup without a GPU. Random weights throughout: speeds and memory only. Compiled rows report ``compile_s`` (the
warm-up's extra time), the compilations they triggered (``graphs``) and inductor's ``cudagraph_skips`` (0 when the
CUDA-graph rows really replay graphs).

    python -m var.eval.gpu_suite --tier quick|full [--dry-run] [--original third_party/VAR] [--out DIR]
                                 [--budget-s S] [--section-s S] [--only NAME,...]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import platform
import re
import signal
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

from var.kernels import HACK, ScaleKV
from var.kernels.compaction import segment_starts
from var.kernels.ragged_attention import gather_prefix, ragged_attention
from var.models import create
from var.models.compiled import CompileSpec, DecodeStep, decode_cache
from var.samplers import sample_next_scale
from var.samplers.collaborative import sample_collaborative
from var.utils.files import write_text_atomic
from var.utils.memory import PeakMemory

PAPER = dict(cfg=1.5, top_k=900, top_p=0.96)  # VAR's sampling settings
DATASHEET_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16 tensor-core peak (NVIDIA datasheet), the goal's roofline
SKIPPED = "skipped: time budget"


class SectionTimeout(BaseException):
    """A section ran past its hard deadline (a BaseException, so no ``except Exception`` inside torch swallows it)."""


@dataclass
class Setup:
    """Sizes of one run: the GPU's, or the dry run's tiny stand-ins on the CPU."""

    device: torch.device
    dry: bool
    var_small: str = "var_d16"
    var_large: str = "var_d30"
    tokenizer: str = "msvq_var"
    gpt_models: tuple = ("gpt_b", "gpt_l")
    batches: tuple = (1, 16, 64)
    quick_batches: tuple = (1, 64)
    big_batches: tuple = (64, 128, 256, 512)
    repeats: int = 3
    autocast: torch.dtype | None = torch.bfloat16
    # (label, CompileSpec) of the compiled rows next to eager. Inductor compiles one graph per VAR scale and batch
    # size (each some seconds), so the quick tier compiles CUDA graphs at batch 1 only (the launch-bound case);
    # the full tier adds compilation without CUDA graphs and with dynamic shapes (fewer compilations)
    quick_compile_modes: tuple = (("CUDA graphs", CompileSpec()),)
    compile_modes: tuple = (("compiled", CompileSpec(mode="default")), ("CUDA graphs", CompileSpec()),
                            ("CUDA graphs, dynamic shapes", CompileSpec(dynamic=None)))
    quick_compile_batches: tuple = (1,)
    original: Path | None = None
    notes: list = field(default_factory=list)
    # Infinity: InfinityConfig / BSQVAEConfig overrides ({} = Infinity-2B and the d32 VAE), pixels of the schedule
    infinity: dict = field(default_factory=dict)
    infinity_vae: dict = field(default_factory=dict)
    infinity_pixels: str = "1M"
    infinity_batches: tuple = (1, 4)
    matmul_size: int = 8192  # square bf16 matmul timed for the measured roofline
    # wall clock: a section starts no measurement after ``deadline`` (time.monotonic()), no compiled one with less
    # than ``compile_reserve_s`` left; ``rows`` holds the running section's rows (kept when it is interrupted)
    deadline: float = math.inf
    compile_reserve_s: float = 45.0
    rows: list = field(default_factory=list)

    def start_rows(self) -> list:
        """A fresh row list for the section that starts (run_tier keeps it if the section is cut short)."""
        self.rows = []
        return self.rows

    def out_of_time(self, row: dict, needs_s: float = 0.0) -> bool:
        """True, recording ``row`` as skipped, when the section's deadline leaves less than ``needs_s`` seconds."""
        if time.monotonic() + needs_s < self.deadline:
            return False
        self.rows.append({**row, "note": SKIPPED})
        return True

    @classmethod
    def for_run(cls, dry: bool, original: Path | None = None) -> "Setup":
        if not dry:
            return cls(torch.device("cuda"), False, original=original)
        return cls(torch.device("cpu"), True, var_small="var_tiny", var_large="var_tiny", tokenizer="msvq_tiny",
                   gpt_models=("gpt_tiny",), batches=(1, 2), quick_batches=(1, 2), big_batches=(2, 4), repeats=1,
                   autocast=None, quick_compile_modes=(("dynamo, eager backend", CompileSpec(backend="eager")),),
                   compile_modes=(("dynamo, eager backend", CompileSpec(backend="eager")),), original=original,
                   infinity=dict(depth=2, width=64, num_heads=4, codebook_dim=6, text_channels=16, text_maxlen=16,
                                 pool_heads=2),
                   infinity_vae=dict(codebook_dim=6, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4),
                   infinity_pixels="0.06M", infinity_batches=(1, 2), matmul_size=256, compile_reserve_s=0.0)


def environment(device: torch.device) -> dict:
    """GPU (or CPU), torch, triton, CUDA and Python versions."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - reported, not required
        triton_version = "not importable"
    gpu = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"none (CPU dry run: {platform.processor() or platform.machine()})")
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> tuple[float, int]:
    """(fastest seconds of ``repeats`` calls after one warm-up call, peak extra memory in bytes)."""
    fn()
    _sync(device)
    best = float("inf")
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - t0)
    return best, mem.peak_bytes


def _on_device(setup: Setup, preset: str):
    """``create(preset)`` built on the setup's device (initialising VAR-d30's 2B parameters on a CPU takes long)."""
    with setup.device:
        return create(preset).eval()


def _var_pair(setup: Setup, preset: str, seed: int = 0):
    torch.manual_seed(seed)
    model = _on_device(setup, preset)
    model.init_weights()
    return model, _on_device(setup, setup.tokenizer)


def _autocast(setup: Setup):
    return torch.autocast(setup.device.type, dtype=setup.autocast or torch.float32, enabled=setup.autocast is not None)


def _labels(batch, num_classes, device):
    return (torch.arange(batch, device=device) * 211) % num_classes


# ---- VAR sampling -----------------------------------------------------------------------------------------------
def compile_counters() -> tuple[int, int]:
    """(graphs compiled by dynamo so far, inductor's CUDA-graph skips so far)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]


def timed_compiled(fn, device, repeats: int) -> dict:
    """:func:`timed` plus ``compile_s`` (the warm-up call's time beyond one timed call: compilation, CUDA-graph
    recording) and the compile counters' increase."""
    graphs0, skips0 = compile_counters()
    t0 = time.perf_counter()
    seconds, peak = timed(fn, device, repeats)
    graphs1, skips1 = compile_counters()
    return dict(seconds=seconds, peak=peak, compile_s=max(0.0, time.perf_counter() - t0 - seconds * (repeats + 1)),
                graphs=graphs1 - graphs0, cudagraph_skips=skips1 - skips0)


def _time_next_scale(setup: Setup, model, tok, labels, spec, decode: bool = True) -> dict:
    """:func:`timed_compiled` of one :func:`sample_next_scale` batch at the paper's settings (seed 0 each run)."""
    gen = torch.Generator(setup.device)

    def run():
        gen.manual_seed(0)
        with _autocast(setup):
            return sample_next_scale(model, tok, labels, generator=gen, compile=spec, decode=decode, **PAPER)
    return timed_compiled(run, setup.device, setup.repeats)


@torch.no_grad()
def bench_var_sampling(setup: Setup, presets, batches, compile_modes, compile_batches=None) -> list[dict]:
    """Images/s of :func:`sample_next_scale` (paper settings, bf16 autocast, decode included) eager vs compiled scale
    steps (``compile=``: one static graph per scale; with CUDA graphs on CUDA); with ``setup.original`` also the
    original sampler on the same weights: ``ours_speedup`` = our best images/s over the original's (goal: >= 2 at
    batch 1 on VAR-d16). ``compile_batches``: the batch sizes that get the compiled rows (default: all)."""
    rows = setup.start_rows()
    for preset in presets:
        model, tok = _var_pair(setup, preset)
        original = load_original(setup.original, model, setup.device) if setup.original else None
        for batch in batches:
            labels = _labels(batch, model.config.num_classes, setup.device)
            results = {}
            compiled = compile_modes if compile_batches is None or batch in compile_batches else ()
            for mode, spec in [("eager", None), *compiled]:
                if setup.out_of_time(dict(model=preset, sampler=f"ours ({mode})", batch=batch),
                                     needs_s=setup.compile_reserve_s if spec is not None else 0.0):
                    continue
                r = _time_next_scale(setup, model, tok, labels, spec)
                results[mode] = r["seconds"]
                rows.append(dict(model=preset, sampler=f"ours ({mode})", batch=batch,
                                 images_per_s=batch / r["seconds"], s_per_batch=r["seconds"],
                                 peak_mem_mb=r["peak"] / 2 ** 20, compile_s=r["compile_s"], graphs=r["graphs"],
                                 cudagraph_skips=r["cudagraph_skips"],
                                 speedup_vs_eager=results["eager"] / r["seconds"] if "eager" in results else None))
            if original is not None and results and not setup.out_of_time(
                    dict(model=preset, sampler="original VAR", batch=batch)):
                def run_original():
                    with _autocast(setup):
                        # the release's top-k takes no more than V (the dry run's tiny vocabulary is smaller)
                        return original.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=0, **{
                            **PAPER, "top_k": min(PAPER["top_k"], model.config.vocab_size)})
                seconds, peak = timed(run_original, setup.device, setup.repeats)
                best_mode = min(results, key=results.get)
                rows.append(dict(model=preset, sampler="original VAR", batch=batch, images_per_s=batch / seconds,
                                 s_per_batch=seconds, peak_mem_mb=peak / 2 ** 20,
                                 ours_speedup=seconds / results[best_mode], ours_best=best_mode))
        del model, tok
    return rows


@torch.no_grad()
def bench_decode_step(setup: Setup, presets, compile_modes, batches=(1, 8), steps: int = 32) -> list[dict]:
    """Next-token decoding, ``steps`` one-token steps after a half-full cache (CFG rows): ``GPT.decode`` (eager, the
    cache length varies) vs the static-shape ``GPT.decode_step`` eager, compiled and as CUDA graphs."""
    rows = setup.start_rows()
    modes = [("eager decode", None), ("static step, eager", None), *compile_modes]
    for preset in presets:
        torch.manual_seed(0)
        gpt = _on_device(setup, preset)
        n = min(steps, gpt.seq_len // 2)
        filled = gpt.seq_len // 2 - n + 1  # tokens in the cache before the timed steps (class token included)
        for batch in batches:
            rows_in = batch * 2
            labels = torch.arange(rows_in, device=setup.device) % gpt.config.num_classes
            tokens = torch.randint(0, gpt.vocab_size, (rows_in, gpt.seq_len), device=setup.device)
            base_ms = None
            for mode, spec in modes:
                if setup.out_of_time(dict(model=preset, step=mode, batch=batch),
                                     needs_s=setup.compile_reserve_s if spec is not None else 0.0):
                    continue
                cache = decode_cache(gpt, rows_in, spec)
                with _autocast(setup):
                    gpt.prefill(labels, cache)
                    if filled > 1:
                        gpt.decode(tokens[:, :filled - 1], cache)
                base = cache.length

                def run():
                    cache.truncate(base)
                    with _autocast(setup):
                        if mode == "eager decode":
                            for i in range(n):
                                gpt.decode(tokens[:, i:i + 1], cache)
                        else:
                            step = DecodeStep(gpt, cache, spec)
                            for i in range(n):
                                step(tokens[:, i:i + 1])
                r = timed_compiled(run, setup.device, setup.repeats)
                ms = 1000 * r["seconds"] / n
                base_ms = base_ms or ms
                rows.append(dict(model=preset, step=mode, batch=batch, ms_per_step=ms, speedup_vs_eager=base_ms / ms,
                                 compile_s=r["compile_s"], graphs=r["graphs"], cudagraph_skips=r["cudagraph_skips"]))
        del gpt
    return rows


def load_original(repo: Path, ours, device: torch.device):
    """The original FoundationVision/VAR model from a checkout (its ``models`` package, git-ignored in
    ``third_party/``), built with our model's sizes and our weights loaded (identical state-dict keys)."""
    if importlib.util.find_spec("huggingface_hub") is None:  # only a mixin base of an unused subclass
        hub_mod = types.ModuleType("huggingface_hub")
        hub_mod.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = hub_mod
    sys.path.insert(0, str(Path(repo).resolve()))
    if importlib.util.find_spec("dist") is None:
        dist_mod = types.ModuleType("dist")
        dist_mod.get_device = lambda: device
        dist_mod.initialized = lambda: False
        sys.modules["dist"] = dist_mod
    import models as orig_models  # noqa: PLC0415  (the checkout's package)

    c = ours.config
    # the release's VAR class, not build_vae_var: that fixes width = 64 * depth and V = 4096 (the dry run's tiny
    # model has neither); its VQ-VAE (the release's 256 px one) only decodes the sampled tokens
    vae = orig_models.VQVAE(vocab_size=c.vocab_size, z_channels=c.latent_channels, ch=160, test_mode=True,
                            share_quant_resi=4, v_patch_nums=c.patch_nums)
    var = orig_models.VAR(vae_local=vae, num_classes=c.num_classes, depth=c.depth, embed_dim=c.width,
                          num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, norm_eps=c.norm_eps, shared_aln=c.shared_aln,
                          attn_l2_norm=c.attn_l2_norm, patch_nums=c.patch_nums,
                          flash_if_available=device.type == "cuda", fused_if_available=device.type == "cuda")
    var.load_state_dict(ours.state_dict(), strict=True)
    return var.eval().to(device)


# ---- the ragged kernel ------------------------------------------------------------------------------------------
def _kernel_case(setup: Setup, batch: int, budget: float, heads: int, head_dim: int, prefix: int, n: int, seed=0):
    g = torch.Generator(setup.device).manual_seed(seed)
    dt = setup.autocast or torch.float32
    kept = max(0, round(prefix * budget))
    lens = torch.full((batch * heads,), kept, dtype=torch.int32, device=setup.device)
    q, kc, vc = (torch.randn(batch, heads, n, head_dim, generator=g, device=setup.device, dtype=dt) for _ in range(3))
    kp, vp = (torch.randn(batch * heads * kept, head_dim, generator=g, device=setup.device, dtype=dt)
              for _ in range(2))
    return q, kp, vp, segment_starts(lens), lens, kc, vc


@torch.no_grad()
def bench_ragged_kernel(setup: Setup, budgets, batch: int | None = None) -> list[dict]:
    """VAR-d30's last scale (16x16 queries, 424 earlier tokens, 30 heads of dim 64, CFG rows): the Triton kernel
    over the kept tokens vs SDPA over the gathered kept tokens vs SDPA over the full cache; latency and peak extra
    memory. Goal columns: ``speedup_vs_full_sdpa`` (the full-cache SDPA's latency over this row's) and
    ``cached_kv_pct_of_full`` (K/V bytes of the earlier tokens the cache holds, as % of the full cache's; the current
    scale's own K/V, read by every method, are in ``kv_read_mb``)."""
    import torch.nn.functional as F

    heads, head_dim, prefix, n = (30, 64, 424, 256) if not setup.dry else (2, 16, 20, 9)
    batch = batch or (2 * 64 if not setup.dry else 4)
    rows = setup.start_rows()
    full = _kernel_case(setup, batch, 1.0, heads, head_dim, prefix, n)
    q, kp_full, vp_full, _, _, kc, vc = full
    k_full = torch.cat((kp_full.view(batch, heads, prefix, head_dim), kc), dim=2)
    v_full = torch.cat((vp_full.view(batch, heads, prefix, head_dim), vc), dim=2)
    full_s, peak = timed(lambda: F.scaled_dot_product_attention(q, k_full, v_full), setup.device, setup.repeats)
    mb = 2 ** 20
    full_cached = (kp_full.numel() + vp_full.numel()) * kp_full.element_size()
    current = (kc.numel() + vc.numel()) * kc.element_size()
    rows.append(dict(method="SDPA, full cache", budget=1.0, batch=batch, ms=1000 * full_s, peak_mem_mb=peak / mb,
                     speedup_vs_full_sdpa=1.0, cached_kv_mb=full_cached / mb, cached_kv_pct_of_full=100.0,
                     kv_read_mb=(full_cached + current) / mb))
    del full, kp_full, vp_full, k_full, v_full
    backend = "triton" if not setup.dry or _interpreter() else "torch"
    for budget in budgets:
        q, kp, vp, start, lens, kc, vc = _kernel_case(setup, batch, budget, heads, head_dim, prefix, n, seed=1)
        cached = (kp.numel() + vp.numel()) * kp.element_size()

        def gathered():
            k, v, _ = gather_prefix(kp, vp, start, lens, batch, heads)
            return F.scaled_dot_product_attention(q, torch.cat((k, kc), 2), torch.cat((v, vc), 2))
        for method, fn in ((f"ragged kernel ({backend})", lambda: ragged_attention(
                q, kp, vp, start, lens, kc, vc, scale=head_dim ** -0.5, backend=backend)),
                ("SDPA, gathered kept tokens", gathered)):
            if setup.out_of_time(dict(method=method, budget=budget, batch=batch)):
                continue
            seconds, peak = timed(fn, setup.device, setup.repeats)
            rows.append(dict(method=method, budget=budget, batch=batch, ms=1000 * seconds, peak_mem_mb=peak / mb,
                             speedup_vs_full_sdpa=full_s / seconds, cached_kv_mb=cached / mb,
                             cached_kv_pct_of_full=100 * cached / full_cached, kv_read_mb=(cached + current) / mb))
    return rows


def _interpreter() -> bool:
    from var.kernels._backend import triton_interpreted, triton_module
    return triton_interpreted() and triton_module() is not None


# ---- compressed caches ------------------------------------------------------------------------------------------
@torch.no_grad()
def bench_kv_policies(setup: Setup, preset: str, policies, budget: float, batches) -> list[dict]:
    """Images/s and peak memory of sampling with each cache policy at ``budget`` vs the full cache; a batch that
    does not fit is reported as such and ends the batch sweep of that policy."""
    model, tok = _var_pair(setup, preset)
    rows = setup.start_rows()
    for name, make in [("full cache", lambda: None)] + [(p.__name__, lambda p=p: p(budget=budget)) for p in policies]:
        for batch in batches:
            if setup.out_of_time(dict(model=preset, cache=name, budget=budget, batch=batch)):
                continue
            labels = _labels(batch, model.config.num_classes, setup.device)
            gen = torch.Generator(setup.device)
            out = {}

            def run():
                gen.manual_seed(0)
                with _autocast(setup):
                    out["o"] = sample_next_scale(model, tok, labels, generator=gen, cache=make(), decode=False,
                                                 **PAPER)
            try:
                seconds, peak = timed(run, setup.device, max(1, setup.repeats - 1))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append(dict(model=preset, cache=name, budget=budget, batch=batch, images_per_s=None,
                                 peak_mem_mb=None, kv_live_mb=None, note="out of memory"))
                break
            stats = out["o"].stats
            rows.append(dict(model=preset, cache=name, budget=1.0 if name == "full cache" else budget, batch=batch,
                             images_per_s=batch / seconds, peak_mem_mb=peak / 2 ** 20,
                             kv_live_mb=stats.peak_kv_live_bytes / 2 ** 20,
                             kv_allocated_mb=stats.peak_kv_cache_bytes / 2 ** 20))
    return rows


# ---- Infinity: ScaleKV and HACK on their home model -----------------------------------------------------------
def _infinity(setup: Setup):
    """A random-weight Infinity (2B shapes unless the setup shrinks them), its BSQ VAE and the 1:1 schedule."""
    from var.models.infinity import Infinity, InfinityConfig
    from var.tokenizers.bsq_vae import BSQVAE, BSQVAEConfig
    from var.tokenizers.scale_schedules import dynamic_schedule
    torch.manual_seed(0)
    with setup.device:  # built where it runs, as VAR-d30 (initialising 2B parameters on a CPU takes long)
        model = Infinity(InfinityConfig(**{**setup.infinity, "drop_path_rate": 0.0})).eval()
        model.init_weights(init_adaln_gamma=0.5, init_head=1.0)  # strong AdaLN/head: bits depend on the context
        vae = BSQVAE(BSQVAEConfig(**setup.infinity_vae)).eval()
    return model.to(setup.device), vae.to(setup.device), dynamic_schedule(1.0, setup.infinity_pixels)


def _random_prompts(batch: int, model, device, seed: int):
    """Random T5-like prompt features ``[B, N, C]`` (N = 32 or the model's text_maxlen) with N/4..N real tokens per
    row: no text encoder needed."""
    length, channels = min(32, model.config.text_maxlen), model.config.text_channels
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length) < torch.randint(length // 4, length + 1, (batch,), generator=g)[:, None]
    return (torch.randn(batch, length, channels, generator=g) * mask[..., None]).to(device), mask.to(device)


@torch.no_grad()
def bench_infinity_kv(setup: Setup, budgets=(0.1,), batches=None) -> list[dict]:
    """Infinity at 1024 px (13 scales, 10521 tokens; random weights): ScaleKV and HACK (calibrated on one
    full-cache run of other prompts) at each budget vs the full cache, cfg 3 (CFG rows in the cache): images/s,
    KV bytes allocated and live, PSNR of the decoded images vs the full cache's and the share of equal bits (the
    papers' comparison; random weights measure the cache mechanics, not image quality)."""
    from var.eval.bench_kv import psnr
    from var.kernels import FullCache
    from var.samplers.infinity import calibrate_infinity, sample_infinity
    model, vae, schedule = _infinity(setup)
    with _autocast(setup):
        profile = calibrate_infinity(model, vae, _random_prompts(1, model, setup.device, seed=1),
                                     schedule=schedule, cfg_list=3.0)
    shape = f"depth {model.config.depth}, width {model.config.width}, {schedule.seq_len} tokens"
    policies = [("full cache", None, FullCache)] + [
        (cls.__name__, b, lambda cls=cls, b=b: cls(b, profile=profile)) for b in budgets for cls in (ScaleKV, HACK)]
    rows = setup.start_rows()
    for batch in batches or setup.infinity_batches:
        prompts = _random_prompts(batch, model, setup.device, seed=0)
        ref = None
        for name, budget, make in policies:
            if setup.out_of_time(dict(model=shape, cache=name, budget=budget, batch=batch)):
                continue
            gen, out = torch.Generator(setup.device), {}

            def run():
                gen.manual_seed(0)
                with _autocast(setup):
                    out["o"] = sample_infinity(model, vae, prompts, schedule=schedule, cfg_list=3.0, tau_list=1.0,
                                               generator=gen, cache=make())
            try:
                seconds, peak = timed(run, setup.device, max(1, setup.repeats - 2))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append(dict(model=shape, cache=name, budget=budget, batch=batch, note="out of memory"))
                break
            o = out["o"]
            ref = ref or o
            bits = torch.cat([(a == b).flatten() for a, b in zip(o.tokens, ref.tokens)]).float().mean().item()
            rows.append(dict(model=shape, cache=name, budget=1.0 if budget is None else budget, batch=batch,
                             images_per_s=batch / seconds, peak_mem_mb=peak / 2 ** 20,
                             kv_live_mb=o.stats.peak_kv_live_bytes / 2 ** 20,
                             kv_allocated_mb=o.stats.peak_kv_cache_bytes / 2 ** 20,
                             psnr_vs_full_db=psnr(o.images, ref.images), bits_equal=bits))
    return rows


# ---- next-token pass cost -----------------------------------------------------------------------------------------
@torch.no_grad()
def bench_next_token_pass(setup: Setup, presets, tokens_per_row=(1, 16, 32), batches=(1, 8)) -> list[dict]:
    """Cost of one decode pass of ``l`` tokens per row after a half-full cache (what SJD trades acceptance against;
    acceptance rates are meaningless on random weights)."""
    rows = setup.start_rows()
    for preset in presets:
        torch.manual_seed(0)
        gpt = _on_device(setup, preset)
        for batch in batches:
            rows_in = batch * 2  # CFG rows
            labels = torch.arange(rows_in, device=setup.device) % gpt.config.num_classes
            for l in sorted({min(t, gpt.seq_len // 2) for t in tokens_per_row}):  # tiny dry-run grids are short
                if setup.out_of_time(dict(model=preset, batch=batch, tokens_per_row=l)):
                    continue
                cache = gpt.new_kv_cache(rows_in)
                with _autocast(setup):
                    gpt.prefill(labels, cache)
                    half = torch.randint(0, gpt.vocab_size, (rows_in, min(gpt.seq_len // 2, gpt.seq_len - l)),
                                         device=setup.device)
                    gpt.decode(half, cache)  # commits the tokens
                base = cache.length
                inp = torch.randint(0, gpt.vocab_size, (rows_in, l), device=setup.device)

                def one_pass():
                    cache.truncate(base)
                    with _autocast(setup):
                        gpt.decode(inp, cache)
                seconds, peak = timed(one_pass, setup.device, setup.repeats)
                rows.append(dict(model=preset, batch=batch, tokens_per_row=l, ms_per_pass=1000 * seconds,
                                 ms_per_token=1000 * seconds / l, peak_mem_mb=peak / 2 ** 20))
        del gpt
    return rows


@torch.no_grad()
def bench_next_token_sampling(setup: Setup, preset: str, batch: int, compile_modes, window: int = 16) -> list[dict]:
    """Images/s of plain next-token sampling and SJD (default guidance, random weights: SJD's acceptance is
    meaningless here, its pass cost is not), eager vs compiled decode steps / window passes."""
    from var.samplers import sample_next_token, sample_sjd

    torch.manual_seed(0)
    gpt = _on_device(setup, preset)
    labels = torch.arange(batch, device=setup.device) % gpt.config.num_classes
    rows = setup.start_rows()
    for name, sampler, kw in (("next_token", sample_next_token, {}), ("sjd", sample_sjd, dict(window=window))):
        base = None
        for mode, spec in [("eager", None), *compile_modes]:
            if setup.out_of_time(dict(model=preset, sampler=f"{name} ({mode})", batch=batch),
                                 needs_s=setup.compile_reserve_s if spec is not None else 0.0):
                continue
            gen = torch.Generator(setup.device)

            def run():
                gen.manual_seed(0)
                with _autocast(setup):
                    return sampler(gpt, None, labels, generator=gen, decode=False, compile=spec, **kw)
            r = timed_compiled(run, setup.device, setup.repeats)
            base = base or r["seconds"]
            rows.append(dict(model=preset, sampler=f"{name} ({mode})", batch=batch, images_per_s=batch / r["seconds"],
                             speedup_vs_eager=base / r["seconds"], compile_s=r["compile_s"], graphs=r["graphs"],
                             cudagraph_skips=r["cudagraph_skips"]))
    return rows


# ---- CoDe -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def bench_code(setup: Setup, batch: int, draft_steps: int = 8) -> list[dict]:
    """CoDe (large drafter for the first ``draft_steps`` scales, small refiner for the rest) vs the large alone."""
    drafter, tok = _var_pair(setup, setup.var_large)
    refiner, _ = _var_pair(setup, setup.var_small, seed=1)
    draft_steps = min(draft_steps, len(tok.patch_nums) - 1)
    labels = _labels(batch, drafter.config.num_classes, setup.device)
    rows = setup.start_rows()
    for name, fn in (("large alone", lambda g: sample_next_scale(drafter, tok, labels, generator=g, **PAPER)),
                     (f"CoDe (large drafts {draft_steps} scales)", lambda g: sample_collaborative(
                         drafter, refiner, tok, labels, draft_steps=draft_steps, generator=g, **PAPER))):
        if setup.out_of_time(dict(method=name, large=setup.var_large, small=setup.var_small, batch=batch)):
            continue
        gen = torch.Generator(setup.device)

        def run():
            gen.manual_seed(0)
            with _autocast(setup):
                fn(gen)
        seconds, peak = timed(run, setup.device, setup.repeats)
        rows.append(dict(method=name, large=setup.var_large, small=setup.var_small, batch=batch,
                         images_per_s=batch / seconds, peak_mem_mb=peak / 2 ** 20))
    return rows


# ---- VAR-d30 against the bf16 matrix roofline ------------------------------------------------------------------
def matmul_ceiling_tflops(setup: Setup) -> float:
    """Measured matrix throughput in TFLOP/s: square products of ``matmul_size`` in the run's dtype (bf16 on the
    GPU), ten per timed call, best of the repeats."""
    n, dtype = setup.matmul_size, setup.autocast or torch.float32
    a, b = (torch.randn(n, n, device=setup.device, dtype=dtype) for _ in range(2))

    def ten():
        for _ in range(10):
            a @ b
    seconds, _ = timed(ten, setup.device, max(3, setup.repeats))
    return 10 * 2 * n ** 3 / seconds / 1e12


def transformer_flops(setup: Setup, model, tok, labels) -> int:
    """FLOPs of the transformer in one sample (CFG rows included), counted by torch's FlopCounterMode over a run with
    SDPA's math path (attention counted as its two matmuls on every device); the tokenizer's convolutions excluded."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, _autocast(setup):
        sample_next_scale(model, tok, labels, generator=torch.Generator(setup.device).manual_seed(0), decode=False,
                          **PAPER)
    return sum(v for op, v in counter.get_flop_counts()["Global"].items() if "convolution" not in str(op))


@torch.no_grad()
def bench_var_roofline(setup: Setup, preset: str, batch: int, compile_modes) -> list[dict]:
    """Goal (b): VAR-d30 sampling at ``batch`` (bf16, paper settings, no decode) in TFLOP/s of its transformer (FLOPs
    counted, :func:`transformer_flops`) and as % of the bf16 matrix roofline: the matmul ceiling measured in the same
    run and the datasheet's 989 TFLOP/s. The whole sampling step is timed (draws included), so the % is a lower
    bound for the transformer alone."""
    rows = setup.start_rows()
    ceiling = matmul_ceiling_tflops(setup)
    rows.append(dict(model=f"matmul {setup.matmul_size}^3", mode="eager", batch=None, tflops_per_s=ceiling,
                     pct_of_measured_matmul=100.0, pct_of_datasheet_989=100 * ceiling / DATASHEET_BF16_TFLOPS))
    model, tok = _var_pair(setup, preset)
    labels = _labels(batch, model.config.num_classes, setup.device)
    flops = transformer_flops(setup, model, tok, labels)
    for mode, spec in [("eager", None), *compile_modes]:
        if setup.out_of_time(dict(model=preset, mode=mode, batch=batch),
                             needs_s=setup.compile_reserve_s if spec is not None else 0.0):
            continue
        r = _time_next_scale(setup, model, tok, labels, spec, decode=False)
        achieved = flops / r["seconds"] / 1e12
        rows.append(dict(model=preset, mode=mode, batch=batch, transformer_gflop=flops / 1e9,
                         s_per_batch=r["seconds"], images_per_s=batch / r["seconds"], tflops_per_s=achieved,
                         pct_of_measured_matmul=100 * achieved / ceiling,
                         pct_of_datasheet_989=100 * achieved / DATASHEET_BF16_TFLOPS,
                         compile_s=r["compile_s"], graphs=r["graphs"], cudagraph_skips=r["cudagraph_skips"]))
    return rows


# ---- tiers ------------------------------------------------------------------------------------------------------
def tier_benchmarks(setup: Setup, tier: str) -> list[tuple[str, float, object]]:
    """``(name, budget seconds on a GPU, thunk)`` per benchmark of a tier, in run order (cheap goal sections first;
    compilations, the slowest part, last)."""
    if tier == "quick":
        return [
            ("ragged_kernel_quick", 30, lambda: bench_ragged_kernel(setup, [0.1])),
            ("var_d30_roofline_quick", 60, lambda: bench_var_roofline(setup, setup.var_large, setup.batches[-1], ())),
            ("kv_policies_quick", 40, lambda: bench_kv_policies(setup, setup.var_small, [ScaleKV], 0.1,
                                                                setup.quick_batches[-1:])),
            ("var_sampling_quick", 150, lambda: bench_var_sampling(
                setup, [setup.var_small], setup.quick_batches, setup.quick_compile_modes, setup.quick_compile_batches)),
            ("decode_step_quick", 60, lambda: bench_decode_step(setup, setup.gpt_models[:1], setup.quick_compile_modes,
                                                                batches=(1,))),
        ]
    if tier == "full":
        return [
            ("ragged_kernel", 40, lambda: bench_ragged_kernel(setup, [1.0, 0.5, 0.1])),
            ("var_d30_roofline", 120, lambda: bench_var_roofline(setup, setup.var_large, setup.batches[-1],
                                                                 setup.quick_compile_modes)),
            ("kv_policies", 90, lambda: bench_kv_policies(setup, setup.var_large, [ScaleKV, HACK], 0.1,
                                                          setup.big_batches)),
            ("next_token_pass", 60, lambda: bench_next_token_pass(setup, setup.gpt_models)),
            ("code", 60, lambda: bench_code(setup, setup.quick_batches[-1])),
            ("infinity_kv", 120, lambda: bench_infinity_kv(setup, [0.1])),
            ("var_sampling", 240, lambda: bench_var_sampling(setup, [setup.var_small, setup.var_large], setup.batches,
                                                             setup.compile_modes)),
            ("decode_step", 120, lambda: bench_decode_step(setup, setup.gpt_models, setup.compile_modes)),
            ("next_token_sampling", 90, lambda: bench_next_token_sampling(setup, setup.gpt_models[0],
                                                                          setup.quick_batches[-1],
                                                                          setup.quick_compile_modes)),
        ]
    raise ValueError(f"unknown tier {tier!r} (quick or full)")


def markdown_table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# ---- reports ----------------------------------------------------------------------------------------------------
def report_paths(out_dir: Path, tier: str, env: dict) -> tuple[Path, Path]:
    """``<out>/<tier>-<gpu>.md`` and ``.json`` (names of letters, digits and ``.-`` only, e.g. quick-nvidia-h200)."""
    gpu = "cpu" if env["gpu"].startswith("none") else re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-")
    stem = f"{tier}-{gpu or 'gpu'}"
    return out_dir / f"{stem}.md", out_dir / f"{stem}.json"


def load_sections(json_path: Path, env: dict) -> dict:
    """The sections of an earlier report of the same environment (what ``--only`` merges into), else {}."""
    try:
        earlier = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return {}
    return earlier.get("sections", {}) if earlier.get("environment") == env else {}


def write_report(out_dir: Path, tier: str, env: dict, sections: dict) -> Path:
    """Rewrite the tier's combined report (every section so far); returns the .md path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = report_paths(out_dir, tier, env)
    parts = [f"# GPU suite, {tier} tier\n\nGPU: {env['gpu']}; torch {env['torch']}; triton {env['triton']}; "
             f"CUDA {env['cuda']}; Python {env['python']}. Random weights (speeds and memory only).\n",
             markdown_table([dict(section=name, status=sec["status"], seconds=sec["seconds"],
                                  budget_s=sec["budget_s"], rows=len(sec["rows"])) for name, sec in sections.items()])]
    for name, sec in sections.items():
        parts.append(f"\n## {name}\n\n{sec['status']}; {sec['seconds']:.0f} s of a {sec['budget_s']:.0f} s "
                     f"budget.\n\n" + (markdown_table(sec["rows"]) if sec["rows"] else "(no rows)"))
    write_text_atomic(md_path, "\n".join(parts) + "\n")
    write_text_atomic(json_path, json.dumps(dict(tier=tier, environment=env, sections=sections), indent=2,
                                            default=str))
    return md_path


@contextlib.contextmanager
def hard_deadline(deadline: float):
    """Raise :class:`SectionTimeout` in the block at ``deadline`` (time.monotonic()); a no-op outside the main thread
    or for an infinite deadline."""
    if not math.isfinite(deadline) or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise SectionTimeout()
    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, deadline - time.monotonic()))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _recover(setup: Setup) -> None:
    """After a section was stopped mid-way: drop compiled graphs and free what it held."""
    import gc
    if "torch._dynamo" in sys.modules:  # something was compiled (importing dynamo just to reset it takes seconds)
        torch._dynamo.reset()
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
        torch.cuda.empty_cache()


def run_tier(setup: Setup, tier: str, out_dir: Path, budget_s: float | None = None, section_s: float | None = None,
             only: list[str] | None = None, grace_s: float = 20.0) -> list[dict]:
    """Run a tier's sections (``only``: those, merged into the existing report) and rewrite the combined report
    after each. A section gets its budget (``section_s`` overrides the GPU budgets), cut to the tier's remaining
    ``budget_s``: past its deadline it starts no new measurement (rows ``skipped: time budget``), and ``grace_s``
    later it is stopped. Fail-fast: the first exception (or Ctrl-C) ends the tier after its partial rows are written
    and the summary is printed, then propagates. Returns the summary rows."""
    env = environment(setup.device)
    benches = tier_benchmarks(setup, tier)
    names = [name for name, _, _ in benches]
    if only and set(only) - set(names):
        raise ValueError(f"unknown section(s) {sorted(set(only) - set(names))} of the {tier} tier: {names}")
    sections = load_sections(report_paths(out_dir, tier, env)[1], env) if only else {}
    tier_end = time.monotonic() + (budget_s if budget_s is not None else math.inf)
    summary, error = [], None
    for name, budget, thunk in benches:
        if only and name not in only:
            continue
        t0 = time.monotonic()
        allowed = min(section_s or budget, tier_end - t0)
        setup.deadline, setup.rows = t0 + allowed, []
        if allowed <= 0:
            rows, status = [dict(note=SKIPPED)], SKIPPED
        else:
            try:
                with hard_deadline(setup.deadline + grace_s):
                    rows = thunk()
                status = "partial: time budget" if any(r.get("note") == SKIPPED for r in rows) else "ok"
            except SectionTimeout:
                rows = setup.rows + [dict(note=f"{SKIPPED} (stopped {grace_s:.0f} s past the deadline)")]
                status = "partial: time budget"
                _recover(setup)
            except BaseException as err:  # noqa: BLE001 - recorded with the partial rows, then re-raised
                rows, error = list(setup.rows), err
                status = f"FAILED: {type(err).__name__}: {err}"[:160]
        sections[name] = dict(status=status, seconds=time.monotonic() - t0, budget_s=max(0.0, allowed), rows=rows)
        path = write_report(out_dir, tier, env, sections)
        print(f"\n## {name}: {status}\n{markdown_table(rows)}", flush=True)
        summary.append(dict(benchmark=name, status=status, seconds=sections[name]["seconds"], rows=len(rows),
                            report=str(path)))
        if error is not None:
            break
    print(f"\n{tier} benchmarks on {env['gpu']} (torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']})")
    print(markdown_table(summary), flush=True)
    if error is not None:
        raise error
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tier", choices=("quick", "full"), default="quick")
    p.add_argument("--dry-run", action="store_true", help="tiny presets on the CPU, no compilation")
    p.add_argument("--original", type=Path, default=None, help="checkout of the original VAR code")
    p.add_argument("--out", type=Path, default=Path("benchmarks/gpu"),
                   help="folder of the combined report <tier>-<gpu>.md + .json (e.g. \"$OUT\" on the device tool)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of the whole tier (default: none)")
    p.add_argument("--section-s", type=float, default=None, help="budget of every section (default: its own)")
    p.add_argument("--only", default=None,
                   help="comma-separated sections to (re)run, merged into the report already in --out")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    if args.original is not None and not (args.original / "models").is_dir():
        print(f"error: --original {args.original} has no models/ package (a checkout of the original VAR)",
              file=sys.stderr)
        return 2
    setup = Setup.for_run(args.dry_run, args.original)
    only = [name for name in args.only.split(",") if name] if args.only else None
    known = [name for name, _, _ in tier_benchmarks(setup, args.tier)]
    if only and set(only) - set(known):
        print(f"error: --only {args.only}: the {args.tier} tier's sections are {', '.join(known)}", file=sys.stderr)
        return 2
    run_tier(setup, args.tier, args.out, budget_s=args.budget_s, section_s=args.section_s, only=only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
