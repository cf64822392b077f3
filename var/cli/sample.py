"""``var-sample``: generate class-conditional images with a VAR model or a next-token (LlamaGen) GPT.

Examples::

    var-sample                                    # bundled model (or a random-weight demo config), grid PNG
    var-sample --vae vae_ch160v4096z32.pth --var var_d16.pth --classes 207 360 387 --cfg 1.5 --out grid.png
    var-sample --vae ... --var ... --num-images 16 --out-dir samples/ --device cuda --dtype bf16
    var-sample --vq vq_ds16_c2i.pt --gpt c2i_B_256.pt --sampler sjd --window 16 --cfg-scale 2.0
    var-sample --sampler zipar --zipar-window 8     # bundled AR model (--random-init: random weights)
    var-sample --sampler nar --random-init          # every registered sampler; see --sampler below
    var-sample --prompt "a pink star" --prompt "a teal square with horizontal stripes"   # bundled text-to-image
    var-sample --prompts-file prompts.txt --sampler sjd           # one prompt per line
    var-sample --family infinity --vae infinity_vae_d32reg.pth --model infinity_2b_reg.pth \
        --text-encoder google/flan-t5-xl --prompt "a red fox in the snow" --cfg-list 3 --tau-list 0.5

The samplers, their settings and defaults come from one registry (var.samplers.registry): a setting the chosen
sampler does not take is an error, never ignored.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from var.cli import command_line
from var.cli.infinity import add_infinity_arguments
from var.cli.sampling import (CALIBRATION_CLASSES, CLI_FAMILIES, DTYPES, add_cache_arguments, add_model_arguments,
                              add_sampler_arguments, autocast, calibrate_text_model, check_cache_arguments,
                              load_ar_models, load_sampler_models, load_var_models, make_cache_from_arguments,
                              num_classes_of, resolve_sampler, sampler_settings)
from var.errors import ConfigError

log = logging.getLogger("var.cli.sample")
__all__ = ["build_parser", "main", "load_ar_models", "load_var_models"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="var-sample", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, "models (default: the bundled model of the sampler's family; --random-init: tiny random "
                           "presets)")
    p.add_argument("--family", choices=(*CLI_FAMILIES, "infinity"), default=None,
                   help="var: next-scale VAR (default sampler next_scale); ar: next-token GPT (default sampler "
                        "next_token); infinity: text-to-image Infinity (--vae, --model, --text-encoder, --prompt). "
                        "Default: the --sampler's family, else var")
    p.add_argument("--text-encoder", help="for --prompt with --gpt: google/flan-t5-xl (or a local T5 directory) "
                                          "for LlamaGen T2I, or a saved caption encoder directory")
    add_sampler_arguments(p, sampler_default_help="default: next_scale, or next_token with --family ar")
    add_cache_arguments(p)
    gen = p.add_argument_group("what to sample")
    gen.add_argument("--classes", nargs="*", metavar="CLASS",
                     help="class ids, or names of the procedural shapes classes of the bundled models (red_disc, "
                          "orange_square, ..., pink_star) (default: --num-images random classes)")
    gen.add_argument("--per-class", type=int, default=1, help="images of each --classes entry (default 1)")
    gen.add_argument("--prompt", action="append", default=None,
                     help="text prompt (repeatable): samples the bundled text-to-image model (--family ar)")
    gen.add_argument("--prompts-file", help="text prompts, one per line (empty lines are an error)")
    gen.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    gen.add_argument("--num-images", type=int, default=None,
                     help="random classes to sample when --classes is not given (default 16)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the class draw and of the sampler (default 0)")
    gen.add_argument("--batch-size", type=int, default=8, help="images per sampler call (default 8)")
    out = p.add_argument_group("output and device")
    out.add_argument("--out", default="samples.png", help="grid PNG path (default samples.png)")
    out.add_argument("--out-dir", help="also write each image as a PNG into this folder (default: none)")
    out.add_argument("--nrow", type=int, default=None, help="images per grid row (default: about the square root)")
    out.add_argument("--labels", action="store_true",
                     help="write each image's class (name for the bundled models' classes, else id) or prompt "
                          "under its grid tile")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    out.add_argument("--device", default=default_device, help=f"torch device (default {default_device})")
    out.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                     help="autocast dtype of the transformer (default fp32)")
    out.add_argument("--compile", action="store_true",
                     help="compile the sampler's per-step forward with torch.compile (CUDA graphs on CUDA; "
                          "experimental; the first batch compiles, on a CPU for minutes)")
    add_infinity_arguments(p)
    return p


def read_prompts(args) -> list[str] | None:
    """``--prompt`` values then the lines of ``--prompts-file``; None when neither is given."""
    from var.errors import PromptError
    given = getattr(args, "prompt", None)  # var-eval has --prompts-file only
    if given is None and not args.prompts_file:
        return None
    prompts = [p.strip() for p in given or []]
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise PromptError(f"prompts file not found: {path}")
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                raise PromptError(f"{path}:{n}: empty line (one prompt per line, no blank lines)")
        if not lines:
            raise PromptError(f"{path} holds no prompts")
        prompts += [line.strip() for line in lines]
    if not all(prompts):
        raise PromptError("empty prompt: describe the image, e.g. --prompt 'a pink star'")
    return prompts


def load_t2i_models(args):
    """(vq, gpt, text encoder, description) for prompts: --vq/--gpt/--text-encoder or the bundled t2i model."""
    from var import hub
    from var.assets import bundled_t2i_dir
    from var.errors import CheckpointError, PromptError
    from var.models.caption_encoder import CaptionEncoder, T5Captions
    from var.models.gpt_t2i import GPTT2I
    if args.vq or args.gpt:
        if not (args.vq and args.gpt):
            raise ConfigError("give both --vq and --gpt")
        vq, gpt = hub.load_llamagen(args.vq, args.gpt, image_size=args.image_size, device=args.device)
        if not isinstance(gpt, GPTT2I):
            raise PromptError(f"--prompt needs a text-to-image GPT: {args.gpt} is class-conditional (use --classes)")
        if not args.text_encoder:
            raise PromptError("--prompt with --gpt needs --text-encoder (google/flan-t5-xl for LlamaGen's T2I "
                              "models, or a saved caption encoder directory)")
        if (Path(args.text_encoder) / "config.json").is_file() and "_class_name" in (
                Path(args.text_encoder) / "config.json").read_text():
            enc = hub.expect_type(hub.load_pretrained(args.text_encoder, device=args.device), CaptionEncoder,
                                  args.text_encoder)
        else:  # a T5 encoder (hub name or transformers directory), as the released models use
            from var.models.text_encoder import TextEncoder
            enc = T5Captions(TextEncoder.from_pretrained(args.text_encoder, device=args.device,
                                                         max_length=gpt.config.caption_len))
        return vq, gpt, enc, f"{args.gpt}"
    bundled = bundled_t2i_dir()
    if bundled is None:
        raise CheckpointError("no bundled text-to-image model in var/assets/t2i_bundled (give --vq, --gpt and "
                              "--text-encoder)")
    vq, gpt, enc = hub.load_t2i_bundle(bundled, device=args.device)
    return vq, gpt, enc, f"bundled text-to-image model {bundled.name}"




def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    from var.utils.images import save_image_grid, save_images
    check_outputs(args)
    if args.family == "infinity":
        return sample_infinity_main(args)
    prompts = read_prompts(args)
    if prompts is not None:
        if args.classes:
            raise ConfigError("give --classes or --prompt, not both")
        if args.family == "var" or args.vae or args.var:
            raise ConfigError("--prompt samples a next-token text-to-image model (--family ar, no --vae/--var)")
        args.family = "ar"
    spec = resolve_sampler(args.sampler, CLI_FAMILIES.get(args.family))
    settings = sampler_settings(spec, args)
    if args.compile and not spec.takes_compile:
        raise ConfigError(f"--compile: sampler {spec.name} has no compiled path")
    check_cache_arguments(spec, args)  # before any model is loaded
    if args.classes and args.num_images is not None:
        raise ConfigError("--num-images is for random classes: give --classes or --num-images, not both")
    text_encoder = None
    if prompts is not None:
        tok, model, text_encoder, desc = load_t2i_models(args)
        models = {"model": model, "tokenizer": tok}
        spec.check_models(models)
        labels = [p for p in prompts for _ in range(args.images_per_prompt)]
        text_encoder.condition(labels, model.config.caption_len)  # bad prompts fail before any sampling
    else:
        models, desc = load_sampler_models(spec, args)
        if models.get("tokenizer") is None:
            raise ConfigError("give --vq: the tokenizer that decodes the sampled tokens")
        if args.classes:
            labels = class_labels(args.classes, args.per_class)
        else:
            labels = torch.randint(0, num_classes_of(models), (args.num_images or 16,),
                                   generator=torch.Generator().manual_seed(args.seed))
        first = next(iter(models.values()))
        getattr(first, "check_condition", first.check_labels)(labels)  # GPTs also take captions; VAR class ids
    cache = make_cache_from_arguments(spec, args, models, desc)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    images, passes = [], 0
    for start in tqdm(range(0, len(labels), args.batch_size), desc=f"sampling {desc}", unit="batch"):
        # each batch's PNGs are written as soon as it is done: a kill keeps what was sampled
        batch = labels[start:start + args.batch_size]
        batch = (text_encoder.condition(batch, model.config.caption_len) if text_encoder is not None
                 else batch.to(args.device))
        with autocast(args.device, args.dtype):
            out = spec(models, batch, generator=gen, compile=args.compile, cache=cache, **settings)
        images.append(out.images.float().cpu())
        passes += out.stats.forward_passes
        if args.out_dir:
            save_images(images[-1], args.out_dir, start_index=start)
    images = torch.cat(images)
    captions = (list(labels) if text_encoder is not None else class_names(labels, num_classes_of(models))
                ) if args.labels else None
    path = save_image_grid(images, args.out, nrow=args.nrow, labels=captions)
    what = f"prompts {labels}" if text_encoder is not None else f"classes {labels.tolist()}"
    log.info("wrote %s (%d images, %s, %s sampler, %d forward passes)", path, len(images), what, spec.name, passes)
    if args.out_dir:
        log.info("wrote %d PNGs to %s", len(images), Path(args.out_dir))
    return 0


def sample_infinity_main(args) -> int:
    """``--family infinity``: encode the prompts, sample in batches, write the grid (and PNGs)."""
    from var.cli.infinity import (check_text_encoder, check_text_source, load_infinity_models, load_text_source,
                                  negative_prompts)
    from var.errors import ConfigError
    from var.samplers.infinity import per_scale, sample_infinity
    from var.samplers.registry import SAMPLERS
    from var.tokenizers.scale_schedules import dynamic_schedule
    from var.utils.images import save_image_grid, save_images

    if args.sampler is not None:
        raise ConfigError(f"--sampler {args.sampler} is not an Infinity sampler")
    if args.compile:
        raise ConfigError("--compile: the Infinity sampler has no compiled path")
    if hasattr(args, "knob_cfg"):
        raise ConfigError("--cfg is VAR's guidance (0 = none): Infinity's is --cfg-list (1 = none; one value or one "
                          "per scale)")
    other = sorted(k for k in vars(args) if k.startswith("knob_") and k[5:] not in ("top_k", "top_p"))
    if other:
        raise ConfigError(f"--{other[0][5:].replace('_', '-')} is not a setting of Infinity")
    given = {"top_k": getattr(args, "knob_top_k", None), "top_p": getattr(args, "knob_top_p", None),
             "cfg_list": args.cfg_list, "tau_list": args.tau_list, "gumbel": args.gumbel,
             "cfg_insertion_layer": args.cfg_insertion_layer}  # None: not given, the sampler's own default
    settings = SAMPLERS["infinity"].check_settings({k: v for k, v in given.items() if v is not None})
    check_cache_arguments(SAMPLERS["infinity"], args)
    prompts = read_prompts(args)
    if prompts is None:
        raise ConfigError("--family infinity needs --prompt or --prompts-file")
    prompts = [p for p in prompts for _ in range(args.images_per_prompt)]
    negatives = negative_prompts(args, len(prompts))
    schedule = dynamic_schedule(args.h_div_w, args.pixels)  # named error for an aspect ratio with no template
    for name in ("cfg_list", "tau_list"):  # per-scale lists of the wrong length fail before any loading
        if name in settings:
            per_scale(name, settings[name], schedule.num_scales)
    check_text_source(args)
    vae, model, desc = load_infinity_models(args)  # a wrong file fails before the (large) text encoder loads
    encode = load_text_source(args, args.device)
    cache = make_cache_from_arguments(
        SAMPLERS["infinity"], args, {"model": model, "vae": vae}, desc,
        calibrate_on=lambda: calibrate_text_model({"model": model, "vae": vae}, encode(prompts[:CALIBRATION_CLASSES]),
                                                  {**settings, "h_div_w": args.h_div_w, "pixels": args.pixels},
                                                  args.seed))
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    images, passes = [], 0
    for start in tqdm(range(0, len(prompts), args.batch_size), desc=f"sampling {desc}", unit="batch"):
        emb = encode(prompts[start:start + args.batch_size])
        check_text_encoder(model, emb)
        neg = encode(negatives[start:start + args.batch_size]) if negatives else None
        with autocast(args.device, args.dtype):
            out = sample_infinity(model, vae, emb, schedule=schedule, negative=neg, generator=gen, cache=cache,
                                  **settings)
        images.append(out.images.float().cpu())
        passes += out.stats.forward_passes
        if args.out_dir:  # each batch's PNGs as soon as it is done: a kill keeps what was sampled
            save_images(images[-1], args.out_dir, start_index=start)
    images = torch.cat(images)
    path = save_image_grid(images, args.out, nrow=args.nrow, labels=prompts if args.labels else None)
    log.info("wrote %s (%d images of %dx%d px, %d forward passes)", path, len(images), images.shape[-2],
             images.shape[-1], passes)
    if args.out_dir:
        log.info("wrote %d PNGs to %s", len(images), Path(args.out_dir))
    return 0


def class_labels(classes: list[str], per_class: int = 1) -> torch.Tensor:
    """``--classes`` (ids, or names of the procedural shapes classes) as ids, each repeated ``per_class`` times."""
    from var.train.data import SHAPE_CLASSES
    names = [c.name for c in SHAPE_CLASSES]
    if per_class < 1:
        raise ConfigError(f"--per-class must be >= 1, got {per_class}")
    ids = []
    for value in classes:
        if value.lstrip("-").isdigit():
            ids.append(int(value))
        elif value in names:
            ids.append(names.index(value))
        else:
            raise ConfigError(f"--classes {value!r} is neither a class id nor a class name; names (the procedural "
                              f"shapes dataset of the bundled models): {', '.join(names)}")
    return torch.tensor(ids, dtype=torch.long).repeat_interleave(per_class)


def class_names(labels_B: torch.Tensor, num_classes: int) -> list[str]:
    """Captions of class ids: the procedural shapes names for a model with their class count, else the ids."""
    from var.train.data import SHAPE_CLASSES
    if num_classes == len(SHAPE_CLASSES):
        return [SHAPE_CLASSES[i].name if 0 <= i < num_classes else str(i) for i in labels_B.tolist()]
    return [str(i) for i in labels_B.tolist()]


def check_outputs(args) -> None:
    """Bad counts and output names fail before any sampling (not after minutes of it)."""
    from var.utils.devices import check_device
    from var.utils.images import image_format
    check_device(args.device)
    if args.num_images is not None and args.num_images < 1:
        raise ConfigError(f"--num-images must be >= 1, got {args.num_images}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    image_format(args.out)
    if Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a folder: give an image file name")
    if args.out_dir and Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise ConfigError(f"--out-dir {args.out_dir} exists and is not a folder")


cli = command_line(main)

if __name__ == "__main__":
    sys.exit(cli())
