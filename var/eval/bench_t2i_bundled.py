"""Attribute classifier and prompt accuracy of the bundled text-to-image model (seen vs held-out colour-shape pairs).

    # 1. the judge: a colour / shape / texture classifier trained on real renders of every combination
    OMP_NUM_THREADS=1 var-bench t2i-bundled --train-classifier
    # 2. per-prompt accuracy of samples, seen vs held-out pairs, over seeds (next-token sampler)
    OMP_NUM_THREADS=1 var-bench t2i-bundled --accuracy --seeds 0 1 2 --per-prompt 4
    # 3. every next-token sampler on the text model: passes per image, images/s, accuracy
    OMP_NUM_THREADS=1 var-bench t2i-bundled --samplers

A sample of a prompt is right when the attribute classifier finds both the colour and the shape the prompt names
(texture is reported separately). Prompts: the 32 held-out ones (8 pairs x 4 textures) and 32 seen ones drawn once
with a fixed seed. Outputs go to ``<out-dir>/t2i_*.json`` / ``.md`` (default ``benchmarks/``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from var.assets import ASSETS_DIR, bundled_ar_dir, bundled_t2i_dir
from var.errors import ConfigError
from var.eval.attributes import (attribute_targets, load_attribute_classifier, predict_attributes, save_classifier,
                                 train_attribute_classifier)
from var.hub import load_llamagen_vq, load_t2i_bundle
from var.samplers.registry import get_sampler
from var.train.data import Attributes, CompositionalShapes, all_attributes
from var.utils.machine import machine_description

AR_SAMPLERS = ("next_token", "sjd", "mcsjd", "lantern", "gsd", "zipar")


def evaluation_prompts(num_seen: int = 32, max_prompts: int | None = None) -> tuple[list[Attributes],
                                                                                     list[Attributes]]:
    """(seen, held-out) prompt attributes: every held-out one, ``num_seen`` trained ones drawn with seed 0; the
    first ``max_prompts`` of each (all when None)."""
    seen = all_attributes(held_out=False)
    pick = np.random.default_rng(0).choice(len(seen), size=num_seen, replace=False)
    return [seen[i] for i in sorted(pick)][:max_prompts], all_attributes(held_out=True)[:max_prompts]


def scores(pred_B3: torch.Tensor, attrs: list[Attributes]) -> dict:
    t = attribute_targets(attrs)
    ok = pred_B3 == t
    return dict(colour=ok[:, 0].float().mean().item(), shape=ok[:, 1].float().mean().item(),
                texture=ok[:, 2].float().mean().item(), colour_and_shape=(ok[:, 0] & ok[:, 1]).float().mean().item())


def train_classifier(args) -> None:
    t0 = time.perf_counter()
    clf = train_attribute_classifier(CompositionalShapes(args.classifier_images, seed=1, held_out=None),
                                     steps=args.classifier_steps)
    save_classifier(clf, ASSETS_DIR / "attribute_classifier")
    train_s = time.perf_counter() - t0
    vq = load_llamagen_vq(bundled_ar_dir() / "tokenizer")
    report = {"machine": machine_description(with_load=True), "train_seconds": round(train_s), "train_images": args.classifier_images,
              "steps": args.classifier_steps, "test_images_per_split": args.test_images}
    for split, held in (("seen pairs", False), ("held-out pairs", True)):
        images, attrs = CompositionalShapes(args.test_images, seed=2, held_out=held).tensors()
        report[f"real renders, {split}"] = scores(predict_attributes(clf, images), attrs)
        with torch.no_grad():
            recon = vq.decode(vq.encode(images)).clamp(-1, 1)
        report[f"tokenizer reconstructions, {split}"] = scores(predict_attributes(clf, recon), attrs)
    text = json.dumps(report, indent=2)
    print(text)
    (args.out_dir / "t2i_attribute_classifier.json").write_text(text + "\n")


@torch.no_grad()
def sample_prompts(vq, gpt, enc, prompts: list[str], *, sampler: str, seed: int, cfg_scale: float, batch: int):
    images, passes, seconds = [], 0, 0.0
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(prompts), batch):
        cond = enc.condition(prompts[i:i + batch], gpt.config.caption_len)
        t0 = time.perf_counter()
        knobs = {"k": 64} if sampler == "lantern" else {}
        out = get_sampler(sampler)({"model": gpt, "tokenizer": vq}, cond, cfg_scale=cfg_scale, generator=gen, **knobs)
        seconds += time.perf_counter() - t0
        images.append(out.images.mul(2).sub(1))
        passes += out.stats.forward_passes
    return torch.cat(images), passes, seconds


def accuracy(args) -> None:
    vq, gpt, enc = load_t2i_bundle(args.bundle or bundled_t2i_dir())
    clf = load_attribute_classifier()
    seen, held = evaluation_prompts(max_prompts=args.max_prompts)
    attrs = seen + held
    prompts = [a.caption for a in attrs for _ in range(args.per_prompt)]
    per_seed, per_prompt = [], {a.caption: [] for a in attrs}
    for seed in args.seeds:
        images, _, seconds = sample_prompts(vq, gpt, enc, prompts, sampler="next_token", seed=seed,
                                            cfg_scale=args.cfg_scale, batch=args.batch)
        pred = predict_attributes(clf, images)
        want = attribute_targets([a for a in attrs for _ in range(args.per_prompt)])
        right = ((pred[:, 0] == want[:, 0]) & (pred[:, 1] == want[:, 1])).view(len(attrs), args.per_prompt)
        acc = right.float().mean(1)
        for a, v in zip(attrs, acc.tolist()):
            per_prompt[a.caption].append(v)
        per_seed.append(dict(seed=seed, seconds=round(seconds, 1),
                             seen=acc[:len(seen)].mean().item(), held_out=acc[len(seen):].mean().item(),
                             seen_colour=(pred[:, 0] == want[:, 0])[:len(seen) * args.per_prompt].float().mean().item(),
                             held_colour=(pred[:, 0] == want[:, 0])[len(seen) * args.per_prompt:].float().mean().item(),
                             seen_shape=(pred[:, 1] == want[:, 1])[:len(seen) * args.per_prompt].float().mean().item(),
                             held_shape=(pred[:, 1] == want[:, 1])[len(seen) * args.per_prompt:].float().mean().item()))
        if seed == args.seeds[0]:
            from var.utils.images import save_image_grid
            grid = images.add(1).div(2)[:: args.per_prompt]
            save_image_grid(grid, args.grid, nrow=8)
    summary = {k: (float(np.mean([r[k] for r in per_seed])), float(np.std([r[k] for r in per_seed])))
               for k in ("seen", "held_out", "seen_colour", "held_colour", "seen_shape", "held_shape")}
    report = {"machine": machine_description(with_load=True), "sampler": "next_token", "cfg_scale": args.cfg_scale, "images_per_prompt_per_seed":
              args.per_prompt, "seeds": args.seeds, "num_seen_prompts": len(seen), "num_held_out_prompts": len(held),
              "summary_mean_std_over_seeds": summary, "per_seed": per_seed,
              "per_prompt_mean_over_seeds": {p: float(np.mean(v)) for p, v in per_prompt.items()},
              "held_out_prompts": [a.caption for a in held]}
    (args.out_dir / "t2i_bundled_accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Bundled text-to-image model: prompt accuracy, seen vs held-out colour-shape pairs", "",
             f"Machine: {report['machine']}. Sampler next_token, cfg_scale {args.cfg_scale}, {args.per_prompt} images "
             f"per prompt per seed, seeds {args.seeds}. Right = the attribute classifier finds both the colour and "
             "the shape.",
             "", "| prompts | colour and shape right | colour right | shape right |", "|---|---|---|---|"]
    for name, k, c, s in ((f"seen pairs ({len(seen)} prompts)", "seen", "seen_colour", "seen_shape"),
                          (f"held-out pairs ({len(held)} prompts)", "held_out", "held_colour", "held_shape")):
        lines.append(f"| {name} | {summary[k][0]:.3f} ± {summary[k][1]:.3f} | {summary[c][0]:.3f} ± "
                     f"{summary[c][1]:.3f} | {summary[s][0]:.3f} ± {summary[s][1]:.3f} |")
    lines += ["", "Mean ± std over seeds. Per-prompt numbers: `t2i_bundled_accuracy.json`."]
    (args.out_dir / "t2i_bundled_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def samplers(args) -> None:
    vq, gpt, enc = load_t2i_bundle(args.bundle or bundled_t2i_dir())
    clf = load_attribute_classifier()
    seen, held = evaluation_prompts(max_prompts=args.max_prompts)
    attrs = seen + held
    prompts = [a.caption for a in attrs]
    rows = []
    for name in args.only or AR_SAMPLERS:
        images, passes, seconds = sample_prompts(vq, gpt, enc, prompts, sampler=name, seed=0,
                                                 cfg_scale=args.cfg_scale, batch=args.batch)
        s_seen = scores(predict_attributes(clf, images[:len(seen)]), seen)
        s_held = scores(predict_attributes(clf, images[len(seen):]), held)
        batches = -(-len(prompts) // args.batch)
        rows.append(dict(sampler=name, passes_per_batch=passes / batches, images_per_s=len(prompts) / seconds,
                         seen=s_seen["colour_and_shape"], held_out=s_held["colour_and_shape"]))
    report = {"machine": machine_description(with_load=True), "cfg_scale": args.cfg_scale, "prompts": len(prompts), "batch": args.batch,
              "rows": rows}
    (args.out_dir / "t2i_bundled_samplers.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Next-token samplers on the bundled text-to-image model", "",
             f"Machine: {report['machine']}. One image per prompt ({len(seen)} seen + {len(held)} held-out prompts), "
             f"batch {args.batch}, cfg_scale {args.cfg_scale}, seed 0, each sampler's registry defaults (LANTERN "
             f"k = 64).", "",
             "| sampler | passes per batch | images/s | seen right | held-out right |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['passes_per_batch']:.1f} | {r['images_per_s']:.2f} | {r['seen']:.3f} | "
                     f"{r['held_out']:.3f} |")
    (args.out_dir / "t2i_bundled_samplers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``var-bench t2i-bundled``."""
    parser.add_argument("--train-classifier", action="store_true",
                        help="train the attribute classifier and save it into var/assets/attribute_classifier")
    parser.add_argument("--accuracy", action="store_true", help="prompt accuracy of next_token samples over seeds")
    parser.add_argument("--samplers", action="store_true", help="every next-token sampler: passes, speed, accuracy")
    parser.add_argument("--bundle", type=Path, help="a t2i bundle directory (default var/assets/t2i_bundled)")
    parser.add_argument("--classifier-images", type=int, default=6000, help="training renders (default 6000)")
    parser.add_argument("--classifier-steps", type=int, default=600, help="training steps (default 600)")
    parser.add_argument("--test-images", type=int, default=512, help="test renders per split (default 512)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--accuracy seeds (default 0 1 2)")
    parser.add_argument("--per-prompt", type=int, default=4, help="--accuracy images per prompt and seed (default 4)")
    parser.add_argument("--max-prompts", type=int, default=None,
                        help="only the first N seen and N held-out prompts (default: all 32 + 32)")
    parser.add_argument("--only", nargs="+", choices=AR_SAMPLERS, default=None,
                        help="--samplers: only these (default: all)")
    parser.add_argument("--cfg-scale", type=float, default=3.0, help="LlamaGen guidance, 1 = none (default 3)")
    parser.add_argument("--batch", type=int, default=64, help="prompts per sampler call (default 64)")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks"), help="folder of the reports "
                                                                                "(default benchmarks)")
    parser.add_argument("--grid", type=Path, default=Path("docs/img/t2i_bundled_samples.png"),
                        help="--accuracy: one sample per prompt of the first seed (default docs/img/...)")


def run(args: argparse.Namespace) -> int:
    """``var-bench t2i-bundled``: the steps chosen by --train-classifier / --accuracy / --samplers, in that order."""
    if not (args.train_classifier or args.accuracy or args.samplers):
        raise ConfigError("give --train-classifier, --accuracy and/or --samplers")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.train_classifier:
        train_classifier(args)
    with torch.no_grad():
        if args.accuracy:
            accuracy(args)
        if args.samplers:
            samplers(args)
    return 0
