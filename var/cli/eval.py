"""``var-eval``: sample evaluation sets (distributed, resumable) and compute FID / IS / KID / precision / recall.

Examples::

    # 50 images per class with VAR-d16 and the README settings, on 8 GPUs, into samples/d16/ (+ images.npz)
    torchrun --standalone --nproc_per_node=8 -m var.cli.eval sample --vae vae_ch160v4096z32.pth \\
        --var var_d16.pth --out samples/d16 --cfg 1.5 --top-k 900 --top-p 0.96 --device cuda --dtype bf16
    # another sampler / cache policy, any extra sampler argument as key=value
    var-eval sample --out samples/x --sampler collaborative --refiner small_var/ --sampler-arg draft_steps=8
    var-eval sample --out samples/y --cache ScaleKV --budget 0.1
    # Inception metrics through torch-fidelity (offline with a local weights file)
    var-eval metrics samples/d16/images --ref imagenet_val_folder/ --evaluator torch-fidelity \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth
    # FID-style numbers with the offline extractor, against the offline procedural dataset
    var-eval metrics samples/bundled/images.npz --ref procedural --evaluator offline

Published VAR numbers come from OpenAI's ADM evaluator run on ``images.npz`` against
``VIRTUAL_imagenet256_labeled.npz``; every number printed here names the evaluator that produced it.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from var.cli import command_line
from var.errors import ConfigError

log = logging.getLogger("var.cli.eval")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- argument parsing ---------------------------------------------------------------------------------------
def _parse_kv(items) -> dict:
    """``["draft_steps=8", "window=16"]`` -> ``{"draft_steps": 8, "window": 16}`` (Python literals, else str)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--sampler-arg expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="var-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="generate an evaluation set (PNG folder + ADM .npz), torchrun-distributed",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = s.add_argument_group("model (default: the bundled VAR model for VAR samplers, the bundled AR model for "
                             "next-token samplers; else random-weight tiny presets)")
    m.add_argument("--vae", help="multi-scale tokenizer checkpoint (VAR family)")
    m.add_argument("--var", help="VAR checkpoint (VAR family)")
    m.add_argument("--refiner", help="second VAR checkpoint for two-model samplers (collaborative / CoDe)")
    m.add_argument("--vq", help="single-scale VQ checkpoint (next-token family)")
    m.add_argument("--gpt", help="next-token GPT checkpoint (next-token family)")
    m.add_argument("--random-init", action="store_true", help="random-weight tiny presets (smoke tests)")
    m.add_argument("--model", help="Infinity transformer (--sampler infinity; --vae is then its BSQ VAE)")
    m.add_argument("--text-encoder", help="T5 encoder for --sampler infinity (google/flan-t5-xl or a local dir)")
    m.add_argument("--prompts-file", help="--sampler infinity: one prompt per line; image i uses prompt i %% P")
    g = s.add_argument_group("sampler")
    g.add_argument("--sampler", default="next_scale", help="a sampler of var.samplers (sample_<name>)")
    g.add_argument("--cfg", type=float, default=None, help="default 1.5 (VAR family), 2.0 (next-token family)")
    g.add_argument("--top-k", type=int, default=None, help="default 900 (VAR family), 0 = off (next-token family)")
    g.add_argument("--top-p", type=float, default=None, help="default 0.96 (VAR family), 0 = off (next-token)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--more-smooth", action="store_true", help="VAR's Gumbel smoothing (not for FID)")
    g.add_argument("--sampler-arg", action="append", metavar="KEY=VALUE", help="extra sampler keyword (repeatable)")
    g.add_argument("--cache", default=None, help="cache policy class (e.g. FullCache, ScaleKV); default: full")
    g.add_argument("--budget", type=float, default=None, help="cache policy budget")
    o = s.add_argument_group("set and output")
    o.add_argument("--out", required=True, help="output folder (images/, shards/, sampling.json, images.npz)")
    o.add_argument("--per-class", type=int, default=50, help="images per class (N = per_class * num_classes)")
    o.add_argument("--num-images", type=int, default=None, help="override N")
    o.add_argument("--shard-size", type=int, default=25, help="images per shard (= per sampler call)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--no-pack", action="store_true", help="do not write images.npz")
    o.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    o.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype of the transformer")

    q = sub.add_parser("metrics", help="FID / IS / KID / precision / recall of a sample set",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("samples", help="PNG folder or .npz (arr_0)")
    q.add_argument("--ref", help="reference PNG folder / .npz, or 'procedural' (the offline dataset)")
    q.add_argument("--ref-stats", help="precomputed mu/sigma .npz (ADM reference batch or --save-ref-stats file)")
    q.add_argument("--save-ref-stats", help="write the reference's mu/sigma to this .npz")
    q.add_argument("--evaluator", choices=("auto", "torch-fidelity", "offline"), default="auto",
                   help="auto: torch-fidelity when installed, else offline")
    q.add_argument("--inception-weights", help="local Inception weights (.pth) for torch-fidelity (no download)")
    q.add_argument("--extractor", choices=("auto", "classifier", "random-conv"), default="auto",
                   help="offline feature extractor")
    q.add_argument("--classifier-dir", help="saved offline classifier (default: the bundled one)")
    q.add_argument("--ref-count", type=int, default=None, help="images of the 'procedural' reference (default: N)")
    q.add_argument("--limit", type=int, default=None, help="use only the first LIMIT samples")
    q.add_argument("--json", help="also write the results to this JSON file")
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


# ---- sample -------------------------------------------------------------------------------------------------
def _load_family(args, entry):
    """(components dict, description) for the sampler's model family."""
    from var import hub
    if args.vq or args.gpt:
        if not (args.vq and args.gpt):
            raise ConfigError("give both --vq and --gpt")
        loader = getattr(hub, "load_llamagen", None)
        if loader is None:
            raise ConfigError("this installation has no next-token model loader (var.hub.load_llamagen)")
        tok, model = loader(args.vq, args.gpt, device=args.device)
        return {"model": model, "vq": tok, "tok": tok}, str(args.gpt)
    if _is_next_token(entry):
        from var.cli.sample import load_ar_models
        from var.assets import bundled_ar_dir
        if not args.random_init and bundled_ar_dir() is None:
            raise ConfigError(f"sampler {entry.name} samples a next-token model and no bundled AR model is "
                              f"installed: give --vq and --gpt (or --random-init for a smoke test)")
        vq, gpt, desc = load_ar_models(args)  # the bundled AR model, or random tiny presets with --random-init
        return {"model": gpt, "vq": vq, "tok": vq}, desc
    from var.cli.sample import load_models
    tok, model, desc = load_models(args)
    if entry.needs_pair:
        if not args.refiner:
            raise ConfigError(f"sampler {entry.name} needs a second model: --refiner")
        refiner = hub.load_var_transformer(args.refiner, device=args.device)
        return {"drafter": model, "refiner": refiner, "tok": tok}, f"{desc} + refiner {args.refiner}"
    return {"model": model, "tok": tok}, desc


def _is_next_token(entry) -> bool:
    return "vq" in entry.required_components()


def _fill_family_defaults(args, entry) -> None:
    """--cfg / --top-k / --top-p not given: var-sample's defaults of the sampler's model family."""
    from var.cli.sample import FAMILY_DEFAULTS
    for name, value in FAMILY_DEFAULTS["ar" if _is_next_token(entry) else "var"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _weight_digests(args, desc: str) -> dict:
    """Content hash of every weight file used, so a resume refuses weights replaced under the same path."""
    from var.hub import RELEASED_LLAMAGEN, RELEASED_VAR, resolve_checkpoint
    from var.utils.files import content_digest
    paths = [p for p in (args.vae, args.var, args.refiner, args.vq, args.gpt) if p]
    if not paths and desc.startswith("bundled"):
        from var.assets import bundled_ar_dir, bundled_var_dir
        paths = [p for p in (bundled_ar_dir() if "AR" in desc else bundled_var_dir(),) if p is not None]
    released = {**RELEASED_VAR, **RELEASED_LLAMAGEN}  # a released file name resolves to its cached download
    return {str(p): content_digest(resolve_checkpoint(p, released)) for p in paths}


def make_sample_fn(entry, components: dict, settings: dict, *, cache=None, dtype: str = "fp32", device="cpu"):
    """``fn(labels_B, generator) -> (images [B,3,H,W] in [0,1] on CPU, stats dict)`` for :mod:`var.eval.distributed`."""
    from var.eval.discovery import call_sampler
    autocast = (torch.autocast(torch.device(device).type, dtype=DTYPES[dtype]) if dtype != "fp32"
                else contextlib.nullcontext())

    def fn(labels_B, generator):
        with autocast:
            out = call_sampler(entry, components, labels_B, generator=generator, cache=cache, **settings)
        return out.images.float().cpu(), out.stats.as_dict()
    return fn


def run_sample(args) -> int:
    from var.eval.discovery import discover_cache_policies, discover_samplers
    from var.eval.distributed import SamplingPlan, generate_samples, init_distributed
    env = init_distributed(args.device)
    if args.device.startswith("cuda") and env.world_size > 1:
        args.device = f"cuda:{env.local_rank}"
        torch.cuda.set_device(env.local_rank)
    samplers = discover_samplers()
    if args.sampler not in samplers:
        raise ConfigError(f"unknown sampler {args.sampler!r}; available: {', '.join(sorted(samplers))}")
    entry = samplers[args.sampler]
    cache = None
    if args.cache:
        policies = discover_cache_policies()
        if args.cache not in policies:
            raise ConfigError(f"unknown cache policy {args.cache!r}; available: {', '.join(sorted(policies))}")
        cache = policies[args.cache].make(args.budget)
    if entry.name == "infinity":
        return _run_sample_infinity(args, entry, cache, env)
    components, desc = _load_family(args, entry)
    _fill_family_defaults(args, entry)
    settings = {"model": desc, "sampler": entry.name, "cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p,
                "temperature": args.temperature, "more_smooth": args.more_smooth, **_parse_kv(args.sampler_arg)}
    missing = entry.missing_components(components, settings)
    if missing:
        raise ConfigError(f"sampler {entry.name} needs {missing}: give them with --sampler-arg, or call "
                          f"var.eval.distributed.generate_samples from Python with your own sample_fn")
    num_classes = next(iter(components.values())).config.num_classes
    num_images = args.num_images or args.per_class * num_classes
    plan = SamplingPlan(num_images, num_classes, args.shard_size, args.seed)
    from var.eval.discovery import probe_sampler
    sampler_settings = {k: v for k, v in settings.items() if k not in ("model", "sampler")}
    probe_sampler(entry, components, torch.tensor([0], device=args.device), device=args.device, cache=cache,
                  **sampler_settings)  # fail before any file is written; learn what a **kwargs sampler rejects
    record = {**settings, "cache": repr(cache) if cache is not None else "full", "dtype": args.dtype,
              "checkpoint_sha256": _weight_digests(args, desc),
              "not_taken_by_sampler": sorted(k for k in sampler_settings if not entry.accepts(k))}
    fn = make_sample_fn(entry, components, sampler_settings, cache=cache, dtype=args.dtype, device=args.device)
    try:
        summary = generate_samples(fn, args.out, plan, record, env=env, device=args.device, pack=not args.no_pack)
    finally:
        env.close()
    if env.rank == 0:
        log.info("rank 0: sampled %d shards, skipped %d finished ones; %s", summary["sampled"], summary["skipped"],
                 f"npz: {summary['npz']}" if "npz" in summary else "no npz")
    return 0


def _run_sample_infinity(args, entry, cache, env) -> int:
    """``--sampler infinity``: the prompts of ``--prompts-file`` play the classes (image i uses prompt i % P)."""
    from var.cli.infinity import INFINITY_DEFAULTS, check_text_encoder, load_infinity_models, load_text_source
    from var.eval.distributed import SamplingPlan, generate_samples

    if not args.prompts_file or not Path(args.prompts_file).is_file():
        raise ConfigError("--sampler infinity needs --prompts-file (one prompt per line)")
    prompts = [line.strip() for line in Path(args.prompts_file).read_text(encoding="utf-8").splitlines()]
    if not prompts or not all(prompts):
        raise ConfigError(f"{args.prompts_file}: one non-empty prompt per line")
    for name, value in INFINITY_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.embedding_cache = None
    encode = load_text_source(args, args.device)
    vae, model, desc = load_infinity_models(args)
    knobs = {"cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p, **_parse_kv(args.sampler_arg)}
    if args.temperature != 1.0:
        knobs["tau"] = args.temperature
    embeddings = encode(prompts)
    check_text_encoder(model, embeddings)
    autocast = (torch.autocast(torch.device(args.device).type, dtype=DTYPES[args.dtype]) if args.dtype != "fp32"
                else contextlib.nullcontext())

    def fn(labels_B, generator):
        with autocast:
            out = entry.fn(model, vae, embeddings.select(labels_B.tolist()), generator=generator, cache=cache,
                           **knobs)
        return out.images.float().cpu(), out.stats.as_dict()

    num_images = args.num_images or args.per_class * len(prompts)
    plan = SamplingPlan(num_images, len(prompts), args.shard_size, args.seed)
    record = {"model": desc, "sampler": entry.name, **knobs, "prompts": prompts,
              "cache": repr(cache) if cache is not None else "full", "dtype": args.dtype}
    try:
        summary = generate_samples(fn, args.out, plan, record, env=env, device=args.device, pack=not args.no_pack)
    finally:
        env.close()
    log.info("sampled %d shards of Infinity images (%s)", summary["sampled"], desc)
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
    evaluator = args.evaluator
    if evaluator == "auto":
        try:
            import torch_fidelity  # noqa: F401
            evaluator = "torch-fidelity"
        except ImportError:
            evaluator = "offline"
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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    from var.utils.devices import check_device
    check_device(args.device)
    return run_sample(args) if args.command == "sample" else run_metrics(args)


cli = command_line(main)

if __name__ == "__main__":
    sys.exit(cli())
