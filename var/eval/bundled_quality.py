"""Quality evidence of the bundled models (not a test): class accuracy of their samples under the shapes
classifier trained on the real offline data, and reconstruction PSNR of their tokenizers.

    var-bench bundled                       # writes benchmarks/bundled_quality.{json,md} + docs/img grids
    var-bench bundled --train-classifier    # (re)train var/assets/classifier first (~5 min CPU)

Held-out images come from ``ProceduralShapes(seed=1)`` (the models were trained on seed 0).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from var.eval.class_accuracy import class_accuracy_report, corner_colours, sample_per_class
from var.eval.classifier import accuracy, load_classifier, save_classifier, train_classifier
from var.samplers.registry import get_sampler
from var.train.data import ProceduralShapes
from var.utils.images import save_image_grid
from var.utils.machine import machine_description

log = logging.getLogger("var.eval.bundled_quality")


def psnr_01(a_B3HW: torch.Tensor, b_B3HW: torch.Tensor) -> float:
    """PSNR (dB) of images in [0, 1], averaged over images."""
    mse = (a_B3HW - b_B3HW).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()


@torch.no_grad()
def tokenizer_quality(tok, images_B3HW: torch.Tensor, labels_B: torch.Tensor, clf, batch: int = 200) -> dict:
    """PSNR, code usage and the classifier's accuracy on the reconstructions (an upper bound for the samples)."""
    recon, used = [], set()
    for i in range(0, len(images_B3HW), batch):
        idx = tok.encode(images_B3HW[i:i + batch])
        for t in idx:
            used.update(t.unique().tolist())
        recon.append(tok.decode(idx))
    recon = torch.cat(recon)
    return {"psnr_db": round(psnr_01((recon + 1) / 2, (images_B3HW + 1) / 2), 2),
            "recon_class_accuracy": round(accuracy(clf, recon, labels_B), 4),
            "codes_used": len(used), "vocab_size": tok.vocab_size, "num_images": len(images_B3HW)}


@torch.no_grad()
def sample_accuracy(sample_fn, clf, num_classes: int, per_class: int, batch: int, seed: int, desc: str):
    """Sample ``per_class`` images of every class; returns (metrics with per-class class / shape / texture accuracy
    (:mod:`var.eval.class_accuracy`), first images of each class)."""
    t0 = time.time()
    log.info("%s: sampling %d images", desc, num_classes * per_class)
    images, labels = sample_per_class(sample_fn, num_classes=num_classes, per_class=per_class, batch_size=batch,
                                      seed=seed)  # images in [-1, 1]
    seconds = time.time() - t0
    rep = class_accuracy_report(images, labels, classifier=clf, num_classes=num_classes)
    metrics = {"class_accuracy": rep.overall["class"], "shape_accuracy": rep.overall["shape"],
               "texture_accuracy": rep.overall["texture"], "per_class_accuracy": rep.class_accuracy,
               "per_class_shape_accuracy": rep.shape_accuracy, "per_class_texture_accuracy": rep.texture_accuracy,
               "top_right_pixel_rgb": corner_colours(images)["top_right"], "num_samples": len(labels),
               "seconds": round(seconds, 1)}
    grid = torch.stack([images[labels == c][:8] for c in range(num_classes)], 1).flatten(0, 1)  # 8 rows x classes
    return metrics, (grid + 1) / 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``var-bench bundled``."""
    p.add_argument("--train-classifier", action="store_true",
                   help="(re)train the bundled shapes classifier (var/assets/classifier) first")
    p.add_argument("--per-class", type=int, default=50, help="samples per class (default 50)")
    p.add_argument("--batch", type=int, default=50, help="images per sampler call (default 50)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--recon-images", type=int, default=1000, help="held-out images reconstructed (default 1000)")
    p.add_argument("--out", default="benchmarks/bundled_quality",
                   help="report path without suffix (default benchmarks/bundled_quality)")
    p.add_argument("--img-dir", default="docs/img", help="folder of the sample grids (default docs/img)")
    p.add_argument("--skip-ar", action="store_true", help="only the bundled VAR model")


def run(args: argparse.Namespace) -> int:
    """``var-bench bundled``: class accuracy of the bundled models' samples, PSNR of their tokenizers."""
    from var import hub
    from var.assets import ASSETS_DIR, bundled_var_dir

    heldout = ProceduralShapes(max(args.recon_images, 1000), seed=1)
    x_real, y_real = heldout.tensors()
    if args.train_classifier:
        t0 = time.time()
        clf = train_classifier(ProceduralShapes(10000, seed=0), steps=400, batch_size=64, seed=0)
        save_classifier(clf, ASSETS_DIR / "classifier")
        log.info("classifier trained in %.0f s", time.time() - t0)
    clf = load_classifier()
    report = {"machine": machine_description("cpu"), "classifier": {"real_heldout_accuracy": round(accuracy(clf, x_real, y_real), 4),
                                                   "num_images": len(x_real)}}
    x_rec, y_rec = x_real[:args.recon_images], y_real[:args.recon_images]

    var_dir = bundled_var_dir()
    if var_dir is None:
        log.warning("no bundled VAR model in %s", ASSETS_DIR / "var_bundled")
    else:
        tok, model = hub.load_var(var_dir / "tokenizer", var_dir / "transformer")
        report["var"] = {"tokenizer": tokenizer_quality(tok, x_rec, y_rec, clf)}
        spec = get_sampler("next_scale")
        settings = {k: v for k, v in spec.defaults().items() if k in ("cfg", "top_k", "top_p")}  # var-sample's
        for name, kw in (("var_sample_defaults", settings), ("no_guidance", {**settings, "cfg": 0.0})):
            metrics, grid = sample_accuracy(
                lambda lab, g: spec({"model": model, "tokenizer": tok}, lab, generator=g, **kw).images, clf,
                model.config.num_classes, args.per_class, args.batch, args.seed, f"VAR {name}")
            report["var"][name] = {"settings": kw, **metrics}
            if name == "var_sample_defaults":
                save_image_grid(grid, Path(args.img_dir) / "bundled_var_samples.png", nrow=model.config.num_classes)

    from var.assets import bundled_ar_dir
    from var.hub import load_llamagen
    ar_dir = None if args.skip_ar else bundled_ar_dir()
    if ar_dir is not None:
        vq, gpt = load_llamagen(ar_dir / "tokenizer", ar_dir / "transformer")
        report["ar"] = {"tokenizer": tokenizer_quality(vq, x_rec, y_rec, clf)}
        spec = get_sampler("next_token")
        settings = {k: v for k, v in spec.defaults().items() if k in ("cfg_scale", "top_k", "top_p")}
        metrics, grid = sample_accuracy(
            lambda lab, g: spec({"model": gpt, "tokenizer": vq}, lab, generator=g, **settings).images, clf,
            gpt.config.num_classes, args.per_class, args.batch, args.seed, "AR")
        report["ar"]["next_token_cfg2"] = {"settings": settings, **metrics}
        save_image_grid(grid, Path(args.img_dir) / "bundled_ar_samples.png", nrow=gpt.config.num_classes)

    sizes = {str(f.relative_to(ASSETS_DIR)): f.stat().st_size for f in sorted(ASSETS_DIR.rglob("*"))
             if f.is_file() and f.suffix in (".safetensors", ".json")}
    report["asset_bytes"] = {"total": sum(sizes.values()), "files": sizes}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(to_markdown(report, out.parent / "bundled_training.json"))
    log.info("wrote %s.{json,md}", out)
    print(json.dumps({k: v for k, v in report.items() if k != "asset_bytes"}, indent=1))
    return 0


def to_markdown(r: dict, training: Path) -> str:
    """The report as Markdown; ``training`` (a JSON of how the bundled models were trained) is added when present."""
    lines = ["# Bundled model quality", "", f"Machine: {r['machine']}. Written by `var-bench bundled`.",
             "", f"Shapes classifier accuracy on held-out real images (seed 1): "
             f"{r['classifier']['real_heldout_accuracy']:.2%} ({r['classifier']['num_images']} images).", "",
             "Shape and texture: the bundled attribute classifier's heads (`var-eval accuracy` prints them per class).",
             "", "| model | setting | class accuracy of samples | shape / texture accuracy | samples | sampling s |",
             "|---|---|---|---|---|---|"]
    for fam in ("var", "ar"):
        for name, m in r.get(fam, {}).items():
            if name != "tokenizer":
                s = ", ".join(f"{k}={v}" for k, v in m["settings"].items())
                attrs = (f"{m['shape_accuracy']:.1%} / {m['texture_accuracy']:.1%}" if "shape_accuracy" in m
                         else "-")
                lines.append(f"| {fam} | {name} ({s}) | {m['class_accuracy']:.2%} | {attrs} | {m['num_samples']} | "
                             f"{m['seconds']} |")
    lines += ["", "| tokenizer | reconstruction PSNR (dB, held-out) | class accuracy of reconstructions | "
              "codes used / vocab |", "|---|---|---|---|"]
    for fam in ("var", "ar"):
        if fam in r:
            t = r[fam]["tokenizer"]
            lines.append(f"| {fam} | {t['psnr_db']} | {t['recon_class_accuracy']:.2%} | "
                         f"{t['codes_used']} / {t['vocab_size']} |")
    lines += ["", f"Bundled files: {r['asset_bytes']['total'] / 2**20:.2f} MiB in total.", ""]
    if training.exists():
        t = json.loads(training.read_text())
        lines += ["## How they were trained", "", f"Machine: {t['machine']}", "",
                  "| model | wall time | command |", "|---|---|---|"]
        for row in t["runs"]:
            lines.append(f"| {row['model']} | {row['wall_time']} | `{row['command']}` |")
        lines += ["", t.get("note", ""), ""]
        if "ar_ablation" in t:
            a = t["ar_ablation"]
            lines += ["## " + a["note"], "", "| single-scale tokenizer | recon PSNR (dB) | recon class accuracy | GPT | "
                      "sample class accuracy |", "|---|---|---|---|---|"]
            lines += [f"| {r['tokenizer']} | {r['recon_psnr_db']} | {r['recon_class_accuracy']:.1%} | {r['gpt']} | "
                      f"{r['sample_class_accuracy']:.1%} |" for r in a["rows"]]
            lines.append("")
    return "\n".join(lines)

