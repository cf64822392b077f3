"""KV-cache compression on Infinity: PSNR vs the full cache, KV bytes and images/s per policy and budget.

Usage::

    python scripts/bench_infinity_kv.py [--pixels 0.06M] [--num-images 8] [--budgets 0.5 0.1] [--device cpu]

A small random Infinity (4 blocks, width 128, 4 heads, d = 16 bits) with a random BSQ VAE (stride 16) and random
128-d "text features" (no text encoder needed): every policy samples the same prompts with the same seed as the
full cache; PSNR compares its images with the full cache's (as ScaleKV's paper does), ``bits_agree`` is the
fraction of identical bits. The calibration profile (ScaleKV, HACK) comes from one full-cache run on other
prompts. Writes ``benchmarks/infinity_kv_<device>.{json,md}`` with the machine named. Random weights: the numbers
measure the cache mechanics, not image quality.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from var.kernels import HACK, FullCache, ScaleKV, SnapKV  # noqa: E402
from var.models.infinity import Infinity, InfinityConfig  # noqa: E402
from var.samplers.infinity import calibrate_infinity, sample_infinity  # noqa: E402
from var.tokenizers.bsq_vae import BSQVAE  # noqa: E402
from var.tokenizers.scale_schedules import dynamic_schedule  # noqa: E402
from var.utils.machine import cpu_model  # noqa: E402


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.float() - b.float()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def text(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=g)
    feats = torch.randn(n, 12, 128, generator=g)
    mask = torch.arange(12) < lengths[:, None]
    return feats * mask[..., None], mask


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pixels", default="0.06M")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.1])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    model = Infinity(InfinityConfig(depth=4, width=128, num_heads=4, codebook_dim=16, text_channels=128,
                                    text_maxlen=32, pool_heads=1, drop_path_rate=0.0)).eval().to(args.device)
    model.init_weights(init_adaln_gamma=0.5, init_head=1.0)
    vae = BSQVAE(codebook_dim=16, ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1).eval().to(args.device)
    schedule = dynamic_schedule(1.0, args.pixels)
    prompts = text(args.num_images, 1)
    profile = calibrate_infinity(model, vae, text(2, 2), schedule=schedule, cfg_list=3.0)
    policies = [("full", FullCache())]
    for b in args.budgets:
        policies += [(f"ScaleKV {b:.0%}", ScaleKV(b, profile=profile)), (f"HACK {b:.0%}", HACK(b, profile=profile)),
                     (f"SnapKV {b:.0%}", SnapKV(b))]
    rows, ref = [], None
    for name, policy in policies:
        kw = dict(schedule=schedule, cfg_list=3.0, tau_list=1.0, generator=torch.Generator(args.device).manual_seed(0),
                  cache=policy)
        sample_infinity(model, vae, text(1, 3), **{**kw, "generator": torch.Generator(args.device).manual_seed(9)})
        t0 = time.perf_counter()
        out = sample_infinity(model, vae, prompts, **kw)
        seconds = time.perf_counter() - t0
        if ref is None:
            ref = out
        agree = torch.cat([(a == b).flatten() for a, b in zip(out.tokens, ref.tokens)]).float().mean().item()
        rows.append({"policy": name, "psnr_vs_full_db": psnr(out.images, ref.images), "bits_agree": agree,
                     "peak_kv_live_mib": out.stats.peak_kv_live_bytes / 2 ** 20,
                     "peak_kv_alloc_mib": out.stats.peak_kv_cache_bytes / 2 ** 20,
                     "images_per_s": args.num_images / seconds})
    report = {"machine": f"{cpu_model() if args.device == 'cpu' else torch.cuda.get_device_name()}, {args.device}",
              "setup": f"random Infinity (4 blocks, width 128, 4 heads, d=16), random BSQ VAE (stride 16), "
                       f"schedule {args.pixels} 1:1 ({schedule.num_scales} scales, {schedule.seq_len} tokens), "
                       f"{args.num_images} prompts, cfg 3 (CFG rows in the cache), torch {torch.__version__}",
              "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"infinity_kv_{args.device.split(':')[0]}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# KV-cache policies on a small random Infinity ({report['machine']})", "", report["setup"], "",
             "| policy | PSNR vs full (dB) | bits agree | peak live KV (MiB) | peak alloc KV (MiB) | images/s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['policy']} | {r['psnr_vs_full_db']:.2f} | {r['bits_agree']:.3f} | {r['peak_kv_live_mib']:.2f} "
              f"| {r['peak_kv_alloc_mib']:.2f} | {r['images_per_s']:.2f} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
