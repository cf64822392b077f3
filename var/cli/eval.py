"""``var-eval``: sample evaluation sets (distributed, resumable) and compute FID / IS / KID / precision / recall.

Examples::

    # 50 images per class with VAR-d16 and the README settings, on 8 GPUs, into samples/d16/ (+ images.npz)
    torchrun --standalone --nproc_per_node=8 -m var.cli.eval sample --vae vae_ch160v4096z32.pth \\
        --var var_d16.pth --out samples/d16 --cfg 1.5 --top-k 900 --top-p 0.96 --device cuda --dtype bf16
    # another sampler (any of var-sample's, with the same setting flags) / a cache policy
    var-eval sample --out samples/x --sampler collaborative --refiner small_var/ --draft-steps 8
    var-eval sample --out samples/y --cache ScaleKV --budget 0.1      # the bundled VAR's shipped profile
    # a ScaleKV/HACK calibration profile for your own VAR checkpoint, then sampling with it
    var-eval calibrate --vae vae_ch160v4096z32.pth --var var_d16.pth --out d16_profile.json --device cuda
    var-eval sample --vae ... --var ... --out samples/z --cache ScaleKV --budget 0.1 --kv-profile d16_profile.json
    # Inception metrics through torch-fidelity (offline with a local weights file)
    var-eval metrics samples/d16/images --ref imagenet_val_folder/ --evaluator torch-fidelity \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth
    # FID-style numbers with the offline extractor, against the offline procedural dataset
    var-eval metrics samples/bundled/images.npz --ref procedural --evaluator offline
    # per-class accuracy (class, shape, texture) of your own model trained on the procedural dataset
    var-eval accuracy --vae runs/msvq/export --var runs/var/export/transformer --per-class 50 --json acc.json

Published VAR numbers come from OpenAI's ADM evaluator run on ``images.npz`` against
``VIRTUAL_imagenet256_labeled.npz``; every number printed here names the evaluator that produced it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from var.cli import command_line
from var.cli.sample import read_prompts
from var.cli.sampling import (CALIBRATION_CLASSES, CLI_SAMPLERS, DTYPES, add_cache_arguments, add_model_arguments,
                              add_sampler_arguments, autocast, calibrate_text_model, check_cache_arguments,
                              effective_settings, load_sampler_models, load_var_models, make_cache_from_arguments,
                              num_classes_of, resolve_sampler, sampler_settings)
from var.errors import ConfigError
from var.samplers.registry import SAMPLERS

log = logging.getLogger("var.cli.eval")
# var-eval samples class-conditional models and, from a prompts file, Infinity
EVAL_SAMPLERS = {**CLI_SAMPLERS, "infinity": SAMPLERS["infinity"]}


# ---- argument parsing ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="var-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="generate an evaluation set (PNG folder + ADM .npz), torchrun-distributed",
                       description="Sample an evaluation set with any registered sampler (the same sampler and "
                                   "setting flags as var-sample).")
    add_model_arguments(s, "models (default: the bundled model of the sampler's family; --random-init: tiny random "
                           "presets)")
    t = s.add_argument_group("text-to-image (--sampler infinity, --vae is then its BSQ VAE; or a next-token sampler "
                                         "with --prompts-file: a text-to-image GPT)")
    t.add_argument("--model", help="Infinity transformer: infinity_2b_reg.pth, .safetensors or saved directory")
    t.add_argument("--text-encoder", help="T5 encoder: google/flan-t5-xl or a local directory")
    t.add_argument("--embedding-cache", help="folder of precomputed prompt embeddings (--sampler infinity): read, and "
                                             "written for prompts not in it (the encoder is loaded only then)")
    t.add_argument("--prompts-file", help="one prompt per line; image i uses prompt i %% P (the prompts play the "
                                          "classes: --per-class is images per prompt). With a next-token sampler: "
                                          "the text-to-image GPT (--vq/--gpt/--text-encoder, default the bundled "
                                          "one)")
    add_sampler_arguments(s, sampler_default_help="default: next_scale", samplers=EVAL_SAMPLERS)
    add_cache_arguments(s)
    o = s.add_argument_group("set and output")
    o.add_argument("--out", required=True, help="output folder (images/, shards/, sampling.json, images.npz)")
    o.add_argument("--per-class", type=int, default=50, help="images per class: N = per_class x classes (default 50)")
    o.add_argument("--num-images", type=int, default=None, help="N itself, instead of --per-class (default: none)")
    o.add_argument("--shard-size", type=int, default=25, help="images per shard (= per sampler call) (default 25)")
    o.add_argument("--seed", type=int, default=0, help="seed of the labels and of each shard's sampler (default 0)")
    o.add_argument("--no-pack", action="store_true", help="do not write images.npz")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    o.add_argument("--device", default=default_device, help=f"torch device (default {default_device})")
    o.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="autocast dtype of the transformer (default fp32)")

    a = sub.add_parser("accuracy", help="per-class accuracy of a model trained on the procedural shapes dataset",
                       description="Sample --per-class images of every class and judge them per class: the "
                                   "bundled shapes classifier (class) and the bundled attribute classifier's "
                                   "shape and texture heads (var.eval.class_accuracy). For models trained with "
                                   "`var-train ... --data shapes`; the bundled model by default.")
    add_model_arguments(a, "models (default: the bundled model of the sampler's family; --random-init: tiny random "
                           "presets)")
    add_sampler_arguments(a, sampler_default_help="default: next_scale")
    add_cache_arguments(a)
    a.add_argument("--per-class", type=int, default=50, help="samples per class (default 50)")
    a.add_argument("--batch", type=int, default=50, help="images per sampler call (default 50)")
    a.add_argument("--seed", type=int, default=0, help="seed of the one generator of the whole set (default 0)")
    a.add_argument("--classifier-dir", help="saved shapes classifier (default: the bundled one)")
    a.add_argument("--attribute-classifier-dir", help="saved attribute classifier (default: the bundled one)")
    a.add_argument("--no-attributes", action="store_true", help="class accuracy only (no shape / texture)")
    a.add_argument("--json", help="also write the report to this JSON file (default: none)")
    a.add_argument("--device", default=default_device, help=f"torch device (default {default_device})")
    a.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="autocast dtype of the transformer (default fp32)")

    k = sub.add_parser("calibrate", help="write the ScaleKV/HACK calibration profile of a VAR model",
                       description="One full-cache next-scale sampling run over a few classes; its attention "
                                   "statistics become the profile that --kv-profile takes.")
    k.add_argument("--vae", help="VAR multi-scale tokenizer (default: the bundled VAR's)")
    k.add_argument("--var", help="VAR transformer (default: the bundled VAR)")
    k.add_argument("--random-init", action="store_true", help="random weights of the tiny presets (a smoke test)")
    k.add_argument("--out", required=True, help="profile JSON to write")
    k.add_argument("--classes", type=int, nargs="+", default=None,
                   help=f"class ids of the calibration run (default: the first {CALIBRATION_CLASSES})")
    k.add_argument("--cfg", type=float, default=1.5, help="VAR guidance of the calibration run (default 1.5)")
    k.add_argument("--seed", type=int, default=0, help="seed of the calibration run (default 0)")
    k.add_argument("--device", default=default_device, help=f"torch device (default {default_device})")

    q = sub.add_parser("metrics", help="FID / IS / KID / precision / recall of a sample set",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("samples", help="PNG folder or .npz (arr_0)")
    q.add_argument("--ref", help="reference PNG folder / .npz, or 'procedural' (the offline dataset)")
    q.add_argument("--ref-stats", help="precomputed mu/sigma .npz (ADM reference batch or --save-ref-stats file)")
    q.add_argument("--save-ref-stats", help="write the reference's mu/sigma to this .npz")
    q.add_argument("--evaluator", choices=("auto", "torch-fidelity", "offline"), default="auto",
                   help="auto: torch-fidelity when it imports and Inception weights are given or cached, else offline")
    q.add_argument("--inception-weights", help="local Inception weights (.pth) for torch-fidelity (no download)")
    q.add_argument("--extractor", choices=("auto", "classifier", "random-conv"), default="auto",
                   help="offline feature extractor")
    q.add_argument("--classifier-dir", help="saved offline classifier (default: the bundled one)")
    q.add_argument("--ref-count", type=int, default=None, help="images of the 'procedural' reference (default: N)")
    q.add_argument("--limit", type=int, default=None, help="use only the first LIMIT samples")
    q.add_argument("--json", help="also write the results to this JSON file")
    q.add_argument("--device", default=default_device, help="torch device of the feature extractor")
    return p


# ---- sample -------------------------------------------------------------------------------------------------
def _weight_digests(args, desc: str) -> dict:
    """Content hash of every weight file used, so a resume refuses weights replaced under the same path."""
    from var.hub import RELEASED_LLAMAGEN, RELEASED_VAR, resolve_checkpoint
    from var.utils.files import content_digest
    paths = [p for p in (args.vae, args.var, args.refiner, args.vq, args.gpt, args.stage2, args.model) if p]
    if args.text_encoder and Path(args.text_encoder).exists():  # a local encoder (not a hub name) is weights too
        paths.append(args.text_encoder)
    if not paths and desc.startswith("bundled"):
        from var.assets import bundled_ar_dir, bundled_t2i_dir, bundled_var_dir
        bundled = bundled_t2i_dir() if "text-to-image" in desc else bundled_ar_dir() if "AR" in desc else \
            bundled_var_dir()
        paths = [p for p in (bundled,) if p is not None]
    released = {**RELEASED_VAR, **RELEASED_LLAMAGEN}  # a released file name resolves to its cached download
    return {str(p): content_digest(resolve_checkpoint(p, released)) for p in paths}


def make_sample_fn(spec, models: dict, settings: dict, *, cache=None, dtype: str = "fp32", device="cpu"):
    """``fn(labels_B, generator) -> (images [B,3,H,W] in [0,1] on CPU, stats dict)`` for :mod:`var.eval.distributed`:
    the registered sampler ``spec`` on ``models`` with ``settings``."""
    def fn(labels_B, generator):
        with autocast(device, dtype):
            out = spec(models, labels_B, generator=generator, cache=cache, **settings)
        return out.images.float().cpu(), out.stats.as_dict()
    return fn


def run_sample(args) -> int:
    from var.eval.distributed import SamplingPlan, generate_samples, init_distributed
    spec = resolve_sampler(args.sampler, allowed=EVAL_SAMPLERS)
    settings = sampler_settings(spec, args)  # bad flags fail before any model is loaded or file written
    check_cache_arguments(spec, args)  # before any model is loaded or file written
    if args.num_images is not None and args.num_images < 1:
        raise ConfigError(f"--num-images must be >= 1, got {args.num_images}")
    env = init_distributed(args.device)
    if args.device.startswith("cuda") and env.world_size > 1:
        args.device = f"cuda:{env.local_rank}"
        torch.cuda.set_device(env.local_rank)
    if spec.condition == "text":
        return _run_sample_text(args, spec, settings, env)
    if args.embedding_cache:
        raise ConfigError(f"--embedding-cache is for --sampler infinity (T5 prompt features), not {spec.name}")
    if args.prompts_file and spec.family == "next_token":
        return _run_sample_captions(args, spec, settings, env)
    if args.model or args.text_encoder or args.prompts_file:
        raise ConfigError(f"--model is for --sampler infinity; --text-encoder and --prompts-file for infinity and "
                          f"the next-token samplers (a text-to-image GPT), not {spec.name}")
    models, desc = load_sampler_models(spec, args)
    if models.get("tokenizer") is None:
        raise ConfigError("give --vq: the tokenizer that decodes the sampled tokens")
    cache = make_cache_from_arguments(spec, args, models, desc)
    num_classes = num_classes_of(models)
    plan = SamplingPlan(args.num_images or args.per_class * num_classes, num_classes, args.shard_size, args.seed)
    record = {"model": desc, "sampler": spec.name, **effective_settings(spec, settings),
              "cache": repr(cache) if cache is not None else "full", "dtype": args.dtype,
              "checkpoint_sha256": _weight_digests(args, desc)}
    fn = make_sample_fn(spec, models, settings, cache=cache, dtype=args.dtype, device=args.device)
    try:
        summary = generate_samples(fn, args.out, plan, record, env=env, device=args.device, pack=not args.no_pack)
    finally:
        env.close()
    if env.rank == 0:
        log.info("rank 0: sampled %d shards, skipped %d finished ones; %s", summary["sampled"], summary["skipped"],
                 f"npz: {summary['npz']}" if "npz" in summary else "no npz")
    return 0


def _run_sample_text(args, spec, settings: dict, env) -> int:
    """``--sampler infinity``: the prompts of ``--prompts-file`` play the classes (image i uses prompt i % P)."""
    from var.cli.infinity import check_text_encoder, check_text_source, load_infinity_models, load_text_source
    class_flags = [f for f in ("var", "refiner", "vq", "gpt", "stage2", "image_size") if getattr(args, f) is not None]
    if class_flags or args.random_init:
        raise ConfigError(f"--{(class_flags or ['random_init'])[0].replace('_', '-')} is not used by sampler "
                          f"{spec.name} (give --vae, --model, --text-encoder, --prompts-file)")
    if not args.prompts_file:
        raise ConfigError(f"--sampler {spec.name} needs --prompts-file (one prompt per line)")
    prompts = read_prompts(args)
    check_text_source(args)
    vae, model, desc = load_infinity_models(args)  # a wrong file fails before the (large) text encoder loads
    encode = load_text_source(args, args.device)
    models = {"model": model, "vae": vae}
    spec.check_models(models)
    embeddings = encode(prompts)
    check_text_encoder(model, embeddings)
    cache = make_cache_from_arguments(spec, args, models, desc, calibrate_on=lambda: calibrate_text_model(
        models, embeddings.select(list(range(min(CALIBRATION_CLASSES, len(prompts))))), settings, args.seed))

    def fn(labels_B, generator):
        with autocast(args.device, args.dtype):
            out = spec(models, embeddings.select(labels_B.tolist()), generator=generator, cache=cache, **settings)
        return out.images.float().cpu(), out.stats.as_dict()

    return _sample_prompts(args, spec, settings, cache, env, fn, prompts, desc)


def _run_sample_captions(args, spec, settings: dict, env) -> int:
    """A next-token sampler with ``--prompts-file``: the text-to-image GPT (``--vq/--gpt/--text-encoder``, default
    the bundled one) loaded and conditioned as ``var-sample --prompt`` does; image i uses prompt i % P."""
    from var.cli.sample import load_t2i_models
    if args.model:
        raise ConfigError(f"--model is for --sampler infinity, not {spec.name} (give --vq and --gpt)")
    prompts = read_prompts(args)
    vq, gpt, encoder, desc = load_t2i_models(args)
    models = {"model": gpt, "tokenizer": vq}
    spec.check_models(models)
    caption_len = gpt.config.caption_len
    encoder.condition(prompts, caption_len)  # bad prompts fail before any sampling
    cache = make_cache_from_arguments(spec, args, models, desc)

    def fn(labels_B, generator):
        cond = encoder.condition([prompts[i] for i in labels_B.tolist()], caption_len)
        with autocast(args.device, args.dtype):
            out = spec(models, cond, generator=generator, cache=cache, **settings)
        return out.images.float().cpu(), out.stats.as_dict()

    return _sample_prompts(args, spec, settings, cache, env, fn, prompts, desc)


def _sample_prompts(args, spec, settings: dict, cache, env, fn, prompts: list[str], desc: str) -> int:
    """Sample the plan of a prompts file (the prompts play the classes) with ``fn(prompt ids, generator)``."""
    from var.eval.distributed import SamplingPlan, generate_samples
    plan = SamplingPlan(args.num_images or args.per_class * len(prompts), len(prompts), args.shard_size, args.seed)
    record = {"model": desc, "sampler": spec.name, **effective_settings(spec, settings), "prompts": prompts,
              "cache": repr(cache) if cache is not None else "full", "dtype": args.dtype,
              "checkpoint_sha256": _weight_digests(args, desc)}
    try:
        summary = generate_samples(fn, args.out, plan, record, env=env, device=args.device, pack=not args.no_pack)
    finally:
        env.close()
    log.info("sampled %d shards of %s images (%s)", summary["sampled"], spec.name, desc)
    return 0


# ---- calibrate ----------------------------------------------------------------------------------------------
def run_calibrate(args) -> int:
    from var.samplers.calibration import calibrate
    tokenizer, model, desc = load_var_models(args)
    labels = torch.tensor(args.classes if args.classes is not None
                          else list(range(min(CALIBRATION_CLASSES, model.config.num_classes))), device=args.device)
    model.check_labels(labels)
    profile = calibrate(model, tokenizer, labels, cfg=args.cfg, seed=args.seed)
    profile.meta["checkpoint"] = desc
    log.info("wrote the calibration profile of %s (classes %s) to %s", desc, labels.tolist(), profile.save(args.out))
    return 0


# ---- metrics ------------------------------------------------------------------------------------------------
def _procedural_reference(count: int, size: int) -> np.ndarray:
    try:
        from var.train.data import ProceduralShapes
    except ImportError as e:
        raise ConfigError("the offline procedural dataset (var.train.data) is not available") from e
    data = ProceduralShapes(count, image_size=size, seed=1)  # seed 1: held out from the seed-0 training set
    return np.stack([data.image_uint8(i) for i in range(count)])


def run_metrics(args) -> int:
    from var.eval import metrics
    # auto: torch-fidelity only when it imports and Inception weights are at hand, else offline (one line says why)
    evaluator = metrics.choose_evaluator(args.evaluator, args.inception_weights)
    if not (args.ref or args.ref_stats) and evaluator == "offline":
        raise ConfigError("the offline evaluator needs --ref or --ref-stats")
    folders_only = (evaluator == "torch-fidelity" and not args.ref_stats and args.limit is None
                    and Path(args.samples).is_dir() and (args.ref is None or Path(args.ref).is_dir()))
    if folders_only:  # torch-fidelity streams folders itself: do not load 50k images here
        result = metrics.fidelity_metrics(args.samples, args.ref, weights_path=args.inception_weights,
                                          cuda=args.device.startswith("cuda"))
    else:
        result = _metrics_in_memory(args, evaluator)
    result["samples"] = str(args.samples)
    result["reference"] = str(args.ref_stats or args.ref)
    print(metrics.format_metrics(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _metrics_in_memory(args, evaluator: str) -> dict:
    """Metrics of arrays: ``.npz`` inputs, the procedural reference, statistics files, the offline evaluator."""
    from var.eval import metrics
    from var.eval.export import load_images
    samples = load_images(args.samples, limit=args.limit)
    ref = None
    if args.ref == "procedural":
        ref = _procedural_reference(args.ref_count or len(samples), samples.shape[1])
    elif args.ref:
        ref = load_images(args.ref)
    if evaluator == "torch-fidelity":
        if args.ref_stats:
            feats = metrics.inception_features(samples, weights_path=args.inception_weights, device=args.device)
            return {"fid": metrics.fid_against_statistics(feats, args.ref_stats),
                    "evaluator": "torch-fidelity inception-v3-compat pool3"}
        with _as_folders(args.samples, samples, ref, args.ref) as (in1, in2):
            return metrics.fidelity_metrics(in1, in2, weights_path=args.inception_weights,
                                            cuda=args.device.startswith("cuda"))
    from var.eval.features import extract_features, load_offline_extractor
    ext = load_offline_extractor(args.extractor, device=args.device, classifier_dir=args.classifier_dir)
    name = f"offline:{ext.name}"
    feats = extract_features(ext, samples)
    if args.ref_stats:
        return {f"fd_{metrics.extractor_key(ext.name)}": metrics.fid_against_statistics(feats, args.ref_stats,
                                                                                          evaluator=name),
                "evaluator": name}
    ref_feats = extract_features(ext, ref)
    if args.save_ref_stats:
        metrics.save_reference_statistics(ref_feats, args.save_ref_stats, name)
    return metrics.offline_metrics(feats, ref_feats, extractor=ext)


@contextlib.contextmanager
def _as_folders(samples_path, samples, ref, ref_path):
    """torch-fidelity reads folders: unpack ``.npz`` / procedural inputs into temporary PNG folders."""
    import tempfile
    from var.eval.export import write_pngs
    with tempfile.TemporaryDirectory() as tmp:
        def folder(path, arr, name):
            if path is not None and Path(path).is_dir():
                return str(path)
            if arr is None:
                return None
            target = Path(tmp) / name
            write_pngs(arr, target, range(len(arr)))
            return str(target)
        yield folder(samples_path, samples, "samples"), folder(ref_path if ref_path != "procedural" else None,
                                                               ref, "ref")


# ---- accuracy -----------------------------------------------------------------------------------------------
def run_accuracy(args) -> int:
    from var.eval.class_accuracy import class_accuracy_report, corner_colours, sample_per_class
    from var.eval.classifier import load_classifier
    spec = resolve_sampler(args.sampler)
    settings = sampler_settings(spec, args)  # bad flags fail before any model is loaded
    check_cache_arguments(spec, args)
    classifier = load_classifier(args.classifier_dir, device=args.device)
    judge = None
    if not args.no_attributes:
        from var.eval.attributes import load_attribute_classifier
        judge = load_attribute_classifier(args.attribute_classifier_dir, device=args.device)
    models, desc = load_sampler_models(spec, args)
    if models.get("tokenizer") is None:
        raise ConfigError("give --vq: the tokenizer that decodes the sampled tokens")
    num_classes = num_classes_of(models)
    if num_classes > classifier.config.num_classes:
        raise ConfigError(f"{desc} has {num_classes} classes; the procedural shapes dataset (and its classifier) "
                          f"has {classifier.config.num_classes}: accuracy is only defined for models trained on it")
    cache = make_cache_from_arguments(spec, args, models, desc)
    fn = make_sample_fn(spec, models, settings, cache=cache, dtype=args.dtype, device=args.device)
    images, labels = sample_per_class(lambda labels_B, gen: fn(labels_B, gen)[0], num_classes=num_classes,
                                      per_class=args.per_class, batch_size=args.batch, seed=args.seed)
    report = class_accuracy_report(images.to(args.device), labels, classifier=classifier, attribute_classifier=judge,
                                   attributes=not args.no_attributes, num_classes=num_classes)
    print(f"{desc}, sampler {spec.name} {effective_settings(spec, settings)}, {args.per_class} per class, "
          f"seed {args.seed}")
    print(report.to_markdown())
    if args.json:
        record = {"model": desc, "sampler": spec.name, "settings": effective_settings(spec, settings),
                  "cache": repr(cache) if cache is not None else "full", "per_class": args.per_class,
                  "seed": args.seed, "report": report.to_dict(), "corner_colours": corner_colours(images)}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2, default=str))
        log.info("wrote %s", args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    from var.utils.devices import check_device
    check_device(args.device)
    return {"sample": run_sample, "accuracy": run_accuracy, "calibrate": run_calibrate,
            "metrics": run_metrics}[args.command](args)


cli = command_line(main)

if __name__ == "__main__":
    sys.exit(cli())
