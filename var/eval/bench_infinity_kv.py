"""KV-cache compression on Infinity: PSNR vs the full cache, KV bytes and images/s per policy and budget.

``var-bench infinity-kv [--pixels 0.06M] [--num-images 8] [--budgets 0.5 0.1] [--device cpu]``

A small random Infinity (4 blocks, width 128, 4 heads, d = 16 bits) with a random BSQ VAE (stride 16) and random
128-d "text features" (no text encoder needed): every policy samples the same prompts with the same seed as the
full cache; PSNR compares its images with the full cache's (as ScaleKV's paper does), ``bits_agree`` is the
fraction of identical bits. The calibration profile (ScaleKV, HACK) comes from one full-cache run on other
prompts. Writes ``<out-dir>/infinity_kv_<device>.{json,md}`` with the machine named. Random weights: the numbers
measure the cache mechanics, not image quality.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from var.eval.bench_kv import psnr
from var.kernels import HACK, FullCache, ScaleKV, SnapKV
from var.models.infinity import Infinity, InfinityConfig
from var.samplers.infinity import calibrate_infinity, sample_infinity
from var.tokenizers.bsq_vae import BSQVAE
from var.tokenizers.scale_schedules import PIXEL_SCALES, dynamic_schedule
from var.utils.machine import machine_description

CFG = 3.0  # the release's default guidance: CFG rows live in the cache, as in real use


def random_text(n: int, seed: int, channels: int = 128, max_len: int = 12):
    """``(features [n, max_len, channels], mask [n, max_len])`` of random prompts of 3 .. max_len - 1 tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, max_len, (n,), generator=g)
    feats = torch.randn(n, max_len, channels, generator=g)
    mask = torch.arange(max_len) < lengths[:, None]
    return feats * mask[..., None], mask


def random_models(device, *, depth: int = 4, width: int = 128):
    """The benchmark's random Infinity and BSQ VAE (16 bits per token, stride 16)."""
    torch.manual_seed(0)
    model = Infinity(InfinityConfig(depth=depth, width=width, num_heads=4, codebook_dim=16, text_channels=128,
                                    text_maxlen=32, pool_heads=1, drop_path_rate=0.0)).eval().to(device)
    model.init_weights(init_adaln_gamma=0.5, init_head=1.0)  # a sharper random model: bits depend on the cache
    vae = BSQVAE(codebook_dim=16, ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1).eval().to(device)
    return model, vae


def policy_rows(model, vae, schedule, policies, prompts, device) -> list[dict]:
    """One row per ``(name, policy)``; the first policy is the reference of PSNR and bit agreement."""
    rows, ref = [], None
    num_images = prompts[0].shape[0]
    for name, policy in policies:
        kw = dict(schedule=schedule, cfg_list=CFG, cache=policy)
        warm_up = torch.Generator(device).manual_seed(9)
        sample_infinity(model, vae, random_text(1, 3), generator=warm_up, **kw)
        t0 = time.perf_counter()
        out = sample_infinity(model, vae, prompts, generator=torch.Generator(device).manual_seed(0), **kw)
        seconds = time.perf_counter() - t0
        if ref is None:
            ref = out
        agree = torch.cat([(a == b).flatten() for a, b in zip(out.tokens, ref.tokens)]).float().mean().item()
        rows.append({"policy": name, "psnr_vs_full_db": psnr(out.images, ref.images), "bits_agree": agree,
                     "peak_kv_live_mib": out.stats.peak_kv_live_bytes / 2 ** 20,
                     "peak_kv_alloc_mib": out.stats.peak_kv_cache_bytes / 2 ** 20,
                     "images_per_s": num_images / seconds})
    return rows


def markdown(report: dict) -> str:
    lines = [f"# KV-cache policies on a small random Infinity ({report['machine']})", "", report["setup"], "",
             "| policy | PSNR vs full (dB) | bits agree | peak live KV (MiB) | peak alloc KV (MiB) | images/s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['policy']} | {r['psnr_vs_full_db']:.2f} | {r['bits_agree']:.3f} | {r['peak_kv_live_mib']:.2f} "
              f"| {r['peak_kv_alloc_mib']:.2f} | {r['images_per_s']:.2f} |" for r in report["rows"]]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``var-bench infinity-kv``."""
    parser.add_argument("--pixels", default="0.06M", choices=tuple(PIXEL_SCALES), help="schedule size (default 0.06M)")
    parser.add_argument("--num-images", type=int, default=8, help="prompts sampled per policy (default 8)")
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.1], help="budgets (default 0.5 0.1)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--depth", type=int, default=4, help="blocks of the random Infinity (default 4)")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks"), help="folder of the report "
                                                                                 "(default benchmarks)")


@torch.no_grad()  # in-process callers (tests, var-bench) keep their grad mode
def run(args: argparse.Namespace) -> int:
    """``var-bench infinity-kv``: the table of ScaleKV, HACK and SnapKV against the full cache on Infinity."""
    model, vae = random_models(args.device, depth=args.depth)
    schedule = dynamic_schedule(1.0, args.pixels)
    profile = calibrate_infinity(model, vae, random_text(2, 2), schedule=schedule, cfg_list=CFG)
    policies = [("full", FullCache())]
    for b in args.budgets:
        policies += [(f"ScaleKV {b:.0%}", ScaleKV(b, profile=profile)), (f"HACK {b:.0%}", HACK(b, profile=profile)),
                     (f"SnapKV {b:.0%}", SnapKV(b))]
    rows = policy_rows(model, vae, schedule, policies, random_text(args.num_images, 1), args.device)
    report = {"machine": machine_description(args.device),
              "setup": f"random Infinity ({args.depth} blocks, width 128, 4 heads, d=16), random BSQ VAE (stride 16), "
                       f"schedule {args.pixels} 1:1 ({schedule.num_scales} scales, {schedule.seq_len} tokens), "
                       f"{args.num_images} prompts, cfg_list {CFG:g} (CFG rows in the cache)",
              "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"infinity_kv_{str(args.device).split(':')[0]}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0
