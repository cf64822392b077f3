"""Speed of VAR sampling: no cache (recompute the prefix) vs the preallocated KV cache vs a compiled step vs the
cached sampler under bf16 autocast.

Prints a markdown table and writes ``benchmarks/bench_var.{md,json}``. Random weights (the original
initialisation); sampler settings of the paper (cfg 1.5, top-k 900, top-p 0.96). The fp32 modes must produce
identical tokens for the same seed; the bf16 row reports the fraction of tokens that agree with the first mode.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from var.models import create
from var.samplers import sample_next_scale
from var.samplers.stats import SampleOutput
from var.utils.machine import machine_description
from var.utils.memory import PeakMemory

log = logging.getLogger("var.eval.bench_var")


class RecomputeCache:
    """'No cache' baseline: keeps the scale inputs only; every step re-runs the whole prefix (block-causal)."""

    def __init__(self):
        self.inputs = []  # per scale: x_BlC

    def nbytes(self) -> int:
        return 0  # no K/V is kept

    peak_nbytes = live_nbytes = peak_live_nbytes = nbytes  # the byte counters every cache reports (SamplerStats)


class _Recompute:
    """Cache policy handing out :class:`RecomputeCache` objects."""

    def new_cache(self, model, batch_size, **_):
        return RecomputeCache()


def _patch_forward_scale_for_recompute(model):
    """Wrap ``forward_scale`` so that a :class:`RecomputeCache` triggers a full masked forward of the prefix."""
    original = model.forward_scale

    def forward_scale(x_BlC, cond_BD, kv_cache):
        if not isinstance(kv_cache, RecomputeCache):
            return original(x_BlC, cond_BD, kv_cache)
        kv_cache.inputs.append(x_BlC)
        x = torch.cat(kv_cache.inputs, dim=1)
        L = x.shape[1]
        h = model.forward_blocks(x, cond_BD, attn_bias=model.attn_bias_for_masking[:, :, :L, :L])
        return model.logits(h[:, L - x_BlC.shape[1]:], cond_BD)

    model.forward_scale = forward_scale


MODES = ("recompute", "cached", "compiled", "bf16")


def run_once(model, tok, labels, seed, cache, device, decode=True,
             autocast: torch.dtype | None = None, compile: bool = False) -> tuple[SampleOutput, float, int]:
    g = torch.Generator(device=device).manual_seed(seed)
    with PeakMemory(device) as mem, torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = sample_next_scale(model, tok, labels, cfg=1.5, top_k=900, top_p=0.96, generator=g, cache=cache,
                                decode=decode, compile=compile)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return out, seconds, mem.peak_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``var-bench var-speed``."""
    p.add_argument("--model", default="var_d16", help="VAR preset, random weights (default var_d16)")
    p.add_argument("--tokenizer", default="msvq_var", help="tokenizer preset (default msvq_var)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help=f"modes (default all: {', '.join(MODES)}); bf16 = cached under torch.autocast(bfloat16)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per setting after one warm-up (default 2)")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default_device, help=f"torch device (default {default_device})")
    p.add_argument("--out", default="benchmarks/bench_var", help="report prefix (default benchmarks/bench_var)")


def run(args: argparse.Namespace) -> int:
    """``var-bench var-speed``: VAR sampling with no cache, the KV cache, a compiled step and bf16."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    tok = create(args.tokenizer).eval().to(device)
    model = create(args.model).eval()
    model.init_weights()
    model.to(device)
    _patch_forward_scale_for_recompute(model)
    rows, reference = [], {}
    for bs in args.batch_sizes:
        labels = torch.arange(bs, device=device) % model.config.num_classes
        for mode in args.modes:
            cache = _Recompute() if mode == "recompute" else None
            autocast = torch.bfloat16 if mode == "bf16" else None
            compile = mode == "compiled"  # sample_next_scale(compile=True): one graph per scale, CUDA graphs on CUDA
            t_warm = time.perf_counter()
            run_once(model, tok, labels, 0, cache, device, autocast=autocast, compile=compile)  # warm-up, compile
            warm = time.perf_counter() - t_warm
            times, peak = [], 0
            for r in range(args.repeats):
                out, seconds, mem = run_once(model, tok, labels, r, cache, device, autocast=autocast,
                                             compile=compile)
                times.append(seconds)
                peak = max(peak, mem)
            tokens = [t.cpu() for t in out.tokens]
            ref = reference.setdefault(bs, tokens)
            agreement = sum((a == b).sum().item() for a, b in zip(ref, tokens)) / sum(a.numel() for a in ref)
            best = min(times)
            rows.append(dict(model=args.model, mode=mode, batch=bs, images_per_s=bs / best,
                             ms_per_image=1000 * best / bs, seconds_per_batch=best, warmup_s=warm,
                             peak_mem_mb=peak / 2 ** 20, kv_cache_mb=out.stats.peak_kv_cache_bytes / 2 ** 20,
                             same_tokens_as_first_mode=agreement == 1.0, token_agreement=agreement))
            log.info("%s", rows[-1])
    write_report(rows, args, machine_description(with_load=True))
    return 0


def _same_tokens_cell(row: dict) -> str:
    return "yes" if row["same_tokens_as_first_mode"] else f"no ({row['token_agreement']:.1%} agree)"


def write_report(rows, args, machine) -> None:
    header = ("| model | mode | batch | images/s | ms/image | s/batch | peak mem (MB) | KV cache (MB) | "
              "same tokens as the first mode |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['model']} | {r['mode']} | {r['batch']} | {r['images_per_s']:.3f} | {r['ms_per_image']:.0f} | "
             f"{r['seconds_per_batch']:.2f} | {r['peak_mem_mb']:.0f} | {r['kv_cache_mb']:.0f} | "
             f"{_same_tokens_cell(r)} |"
             for r in rows]
    md = (f"# VAR sampling speed ({args.model}, random weights, fp32 except the bf16 mode, cfg 1.5, top-k 900, "
          f"top-p 0.96, decode included)\n\nMachine: {machine}; best of {args.repeats} after a warm-up.\n\n"
          + header + "\n".join(lines) + "\n")
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "torch": torch.__version__,
                                                    "rows": rows}, indent=2))

