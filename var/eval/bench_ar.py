"""Benchmark the next-token samplers: forward passes per image, accepted tokens per pass, images/s, quality proxies.

    var-bench ar                                   # bundled AR model (else random tiny GPT)
    var-bench ar --vq vq_ds16_c2i.pt --gpt c2i_B_256.pt --device cuda --num-images 32
    var-bench ar --preset gpt_b --device cuda     # random GPT-B: speed only

Quality proxies, reported relative to plain next-token sampling on the same labels and seed:
``nll`` = mean per-token negative log-likelihood of the sampled tokens under the model's own processed
distribution (CFG + top-k/top-p + temperature, teacher forced): exact samplers must match it within noise, lossy
ones drift; ``class_acc`` = accuracy of the bundled shapes classifier on the decoded images (only when the model
has its 10 classes). With random weights the acceptance rates (and so every speed-up) are meaningless.
Prints a markdown table and writes JSON to ``benchmarks/``.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from var.utils.machine import machine_description
from var.assets import bundled_ar_dir
from var.hub import load_llamagen
from var.models import create
from var.samplers.logits import processed_logits
from var.samplers.registry import get_sampler

log = logging.getLogger("var.eval.bench_ar")

# (label, sampler, knobs): the grid of sampler settings benchmarked by default
SETTINGS = [
    ("next_token", "next_token", {}),
    ("sjd L=16", "sjd", dict(window=16)),
    ("sjd L=16 horizon", "sjd", dict(window=16, init="repeat_horizon")),
    ("mcsjd max L=16", "mcsjd", dict(window=16, coupling="maximal")),
    ("mcsjd max L=32", "mcsjd", dict(window=32, coupling="maximal")),
    ("mcsjd gumbel L=32", "mcsjd", dict(window=32, coupling="gumbel")),
    ("lantern d=0.05", "lantern", dict(window=16, delta=0.05)),
    ("lantern d=0.1", "lantern", dict(window=16, delta=0.1)),
    ("lantern d=0.2", "lantern", dict(window=16, delta=0.2)),
    ("gsd G=3", "gsd", dict(window=16, group_size=3)),
    ("gsd G=10", "gsd", dict(window=16, group_size=10)),
    ("zipar s=W/2", "zipar", dict(window="half")),
    ("zipar s=W/4", "zipar", dict(window="quarter")),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``var-bench ar``."""
    p.add_argument("--vq", help="tokenizer: vq_ds16_c2i.pt or saved directory (with --gpt)")
    p.add_argument("--gpt", help="transformer: c2i_*.pt or saved directory (with --vq)")
    p.add_argument("--preset", help="random-weight GPT preset instead (gpt_tiny, gpt_b, ...): speed only")
    p.add_argument("--image-size", type=int, default=None, help="image size of --vq/--gpt (default: the VQ's)")
    p.add_argument("--num-images", type=int, default=16, help="images per setting (default 16)")
    p.add_argument("--batch-size", type=int, default=8, help="images per sampler call (default 8)")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="LlamaGen guidance scale, 1 = none (default 2.0)")
    p.add_argument("--top-k", type=int, default=0, help="top-k filtering, 0 = off (default 0)")
    p.add_argument("--top-p", type=float, default=0.0, help="top-p filtering, 0 = off (default 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the labels and draws (default 0)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs per setting (same seed); the fastest counts (default 2)")
    p.add_argument("--only", nargs="*", help="run only the settings whose label starts with one of these "
                                             f"({', '.join(label for label, _, _ in SETTINGS)})")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default_device, help=f"torch device (default {default_device})")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/ar_samplers_<model>_<device>.json)")


def load(args):
    """(vq or None, gpt, model description, trained?)"""
    if args.vq or args.gpt:
        vq, gpt = load_llamagen(args.vq, args.gpt, image_size=args.image_size, device=args.device)
        return vq, gpt, Path(args.gpt).name, True
    bundled = bundled_ar_dir()
    if bundled is not None and not args.preset:
        vq, gpt = load_llamagen(bundled / "tokenizer", bundled / "transformer", device=args.device)
        return vq, gpt, "ar_bundled", True
    name = args.preset or "gpt_tiny"
    torch.manual_seed(args.seed)
    gpt = create(name).eval()
    torch.nn.init.normal_(gpt.output.weight, std=gpt.config.dim ** -0.5)  # zero-init head would give uniform p
    vq = create("vq_tiny").eval() if name == "gpt_tiny" else None
    return vq, gpt.to(args.device), f"{name}_random", False


@torch.no_grad()
def token_nll(gpt, cond, tokens, *, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
              top_p: float = 0.0) -> float:
    """Mean per-token NLL of ``tokens [B, L]`` under the processed (CFG, top-k/p, temperature) distribution;
    ``cond``: class ids or a :class:`~var.models.conditioning.CaptionCondition` (CFG against the null class or
    caption, as the samplers)."""
    tokens = tokens.reshape(tokens.shape[0], -1).to(gpt.output.weight.device)
    guided = cfg_scale > 1
    logits = gpt(gpt.condition_rows(cond, guided), torch.cat((tokens, tokens)) if guided else tokens)
    if guided:
        c, u = logits.chunk(2)
        logits = cfg_scale * c - (cfg_scale - 1) * u
    logp = processed_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    logp = logp.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    return float(-logp.clamp_min(-1e4).mean())


def classifier_accuracy(images, labels, num_classes: int):
    """Bundled shapes-classifier accuracy on images in [0, 1] (None without a classifier for these classes)."""
    from var.eval.classifier import accuracy, bundled_classifier_dir, load_classifier
    if bundled_classifier_dir() is None or images is None:
        return None
    clf = load_classifier(device=images.device)
    if clf.config.num_classes != num_classes:
        return None
    return accuracy(clf, images * 2 - 1, labels)


def run_setting(gpt, vq, labels, sampler, knobs, args):
    knobs = dict(knobs)
    width = gpt.config.grid_size
    if knobs.get("window") in ("half", "quarter"):
        knobs["window"] = max(1, width // (2 if knobs["window"] == "half" else 4))
    if "delta" in knobs:
        knobs["k"] = min(1000, gpt.vocab_size - 1)
    if vq is None and sampler == "lantern":
        return None
    passes, tokens, elapsed, nll, images, accepted = 0, [], 0.0, [], [], []
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    for start in range(0, len(labels), args.batch_size):
        batch = labels[start:start + args.batch_size]
        state, best = gen.get_state(), float("inf")
        for _ in range(max(args.repeats, 1)):  # identical draws each time: only the timing differs
            gen.set_state(state)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = get_sampler(sampler)({"model": gpt, "tokenizer": vq}, batch, cfg_scale=args.cfg_scale,
                                       top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                                       generator=gen, decode=vq is not None, **knobs)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        elapsed += best
        passes += out.stats.forward_passes
        tokens.append(out.tokens)
        nll.append(token_nll(gpt, batch, out.tokens, cfg_scale=args.cfg_scale, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p) * len(batch))
        if out.images is not None:
            images.append(out.images)
        if "mean_accepted_per_iteration" in out.stats.extra:
            accepted.append(out.stats.extra["mean_accepted_per_iteration"])
    n_batches = -(-len(labels) // args.batch_size)
    imgs = torch.cat(images) if images else None
    return {
        "sampler": sampler, "knobs": knobs,
        "forward_passes_per_batch": passes / n_batches,
        "tokens_per_pass": gpt.seq_len / (passes / n_batches),
        "mean_accepted_per_iteration_per_sample": sum(accepted) / len(accepted) if accepted else None,
        "images_per_s": len(labels) / elapsed, "wall_s": elapsed,
        "nll": sum(nll) / len(labels), "class_acc": classifier_accuracy(imgs, labels, gpt.config.num_classes),
    }


def run(args: argparse.Namespace) -> int:
    """``var-bench ar``: the next-token samplers' passes, speed and quality proxies on one GPT."""
    vq, gpt, desc, trained = load(args)
    if not trained:
        log.warning("RANDOM weights: acceptance rates and speed-ups below are meaningless (only costs are real)")
    g = torch.Generator().manual_seed(args.seed)
    labels = torch.randint(0, gpt.config.num_classes, (args.num_images,), generator=g).to(args.device)
    results, base = {}, None
    get_sampler("next_token")({"model": gpt, "tokenizer": vq}, labels[:args.batch_size], cfg_scale=args.cfg_scale,
                              decode=vq is not None)  # warm-up
    for label, sampler, knobs in SETTINGS:
        if args.only and not any(label.startswith(o) for o in args.only):
            continue
        res = run_setting(gpt, vq, labels, sampler, knobs, args)
        if res is None:
            continue
        base = base or res
        res["speedup_passes"] = base["forward_passes_per_batch"] / res["forward_passes_per_batch"]
        res["speedup_time"] = res["images_per_s"] / base["images_per_s"]
        res["nll_rel_change"] = res["nll"] / base["nll"] - 1
        results[label] = res
        log.info("%-18s passes/batch %7.1f  tok/pass %5.2f  img/s %8.2f  nll %.4f", label,
                 res["forward_passes_per_batch"], res["tokens_per_pass"], res["images_per_s"], res["nll"])
    meta = {"model": desc, "trained_weights": trained, "machine": machine_description(), "device": args.device,
            "torch": torch.__version__, "grid": gpt.config.grid_size, "vocab": gpt.vocab_size,
            "num_images": args.num_images, "batch_size": args.batch_size, "repeats": args.repeats,
            "cfg_scale": args.cfg_scale, "top_k": args.top_k, "top_p": args.top_p, "temperature": args.temperature,
            "seed": args.seed,
            "note": None if trained else "random weights: acceptance rates and speed-ups are meaningless"}
    print(f"\n{desc} on {meta['machine']} ({args.num_images} images, batch {args.batch_size}, "
          f"cfg_scale {args.cfg_scale}, top-k {args.top_k})"
          f"{'' if trained else '  -- RANDOM WEIGHTS: acceptance is meaningless'}\n")
    print("| setting | passes/batch | tokens/pass | speed-up (passes) | images/s | speed-up (time) | NLL (rel.) "
          "| class acc |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        acc = "-" if r["class_acc"] is None else f"{r['class_acc']:.3f}"
        print(f"| {label} | {r['forward_passes_per_batch']:.1f} | {r['tokens_per_pass']:.2f} | "
              f"{r['speedup_passes']:.2f}x | {r['images_per_s']:.2f} | {r['speedup_time']:.2f}x | "
              f"{r['nll']:.4f} ({100 * r['nll_rel_change']:+.1f}%) | {acc} |")
    out = Path(args.out or f"benchmarks/ar_samplers_{desc.replace('.', '_')}_{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {out}")
    return 0

