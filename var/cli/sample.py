"""``var-sample``: generate class-conditional images with a VAR model or a next-token (LlamaGen) GPT.

Examples::

    var-sample                                    # bundled model (or a random-weight demo config), grid PNG
    var-sample --vae vae_ch160v4096z32.pth --var var_d16.pth --classes 207 360 387 --cfg 1.5 --out grid.png
    var-sample --vae ... --var ... --num-images 16 --out-dir samples/ --device cuda --dtype bf16
    var-sample --family ar --vq vq_ds16_c2i.pt --gpt c2i_B_256.pt --sampler sjd --window 16 --cfg 2.0
    var-sample --family ar --sampler zipar --zipar-window 8     # bundled AR model (or random weights)
    var-sample --prompt "a pink star" --prompt "a teal square with horizontal stripes"   # bundled text-to-image
    var-sample --prompts-file prompts.txt --sampler sjd           # one prompt per line
    var-sample --family infinity --vae infinity_vae_d32reg.pth --model infinity_2b_reg.pth \
        --text-encoder google/flan-t5-xl --prompt "a red fox in the snow" --cfg 3 --tau 0.5
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from var.cli import command_line
from var.cli.infinity import add_infinity_arguments
from var.errors import ConfigError

log = logging.getLogger("var.cli.sample")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="var-sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("model (default: the bundled model, else a random-weight demo config)")
    src.add_argument("--vae", help="tokenizer checkpoint: vae_ch160v4096z32.pth, .safetensors or saved directory")
    src.add_argument("--var", help="VAR checkpoint: var_d16.pth ... var_d36.pth, .safetensors or saved directory")
    src.add_argument("--random-init", action="store_true",
                     help="random weights of the tiny presets (msvq_tiny + var_tiny): a smoke test, not images")
    src.add_argument("--family", choices=("var", "ar", "infinity"), default="var",
                     help="var: next-scale VAR; ar: next-token GPT (LlamaGen) with --sampler; infinity: "
                          "text-to-image Infinity (--vae, --model, --text-encoder, --prompt)")
    src.add_argument("--vq", help="AR tokenizer: vq_ds16_c2i.pt, .safetensors or saved directory")
    src.add_argument("--gpt", help="AR transformer: c2i_{B,L,XL,XXL,3B}_*.pt, .safetensors or saved directory")
    src.add_argument("--image-size", type=int, default=None, help="AR image size (384 for the *_384 GPTs)")
    src.add_argument("--text-encoder", help="for --prompt with --gpt: google/flan-t5-xl (or a local T5 directory) "
                                            "for LlamaGen T2I, or a saved caption encoder directory")
    gen = p.add_argument_group("what to sample")
    gen.add_argument("--classes", type=int, nargs="*", help="class ids (default: random classes)")
    gen.add_argument("--prompt", action="append", default=None,
                     help="text prompt (repeatable): samples the bundled text-to-image model (--family ar)")
    gen.add_argument("--prompts-file", help="text prompts, one per line (empty lines are an error)")
    gen.add_argument("--images-per-prompt", type=int, default=1)
    gen.add_argument("--num-images", type=int, default=16, help="images to sample when --classes is not given")
    gen.add_argument("--cfg", type=float, default=None,
                     help="guidance: VAR strength at the last scale (default 1.5, 0 = none); AR scale (default 2.0, "
                          "1 = none)")
    gen.add_argument("--top-k", type=int, default=None, help="default 900 (var), 0 = off (ar)")
    gen.add_argument("--top-p", type=float, default=None, help="default 0.96 (var), 0 = off (ar)")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--more-smooth", action="store_true", help="VAR's Gumbel smoothing (visualisation only)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=8)
    ar = p.add_argument_group("next-token samplers (--family ar)")
    ar.add_argument("--sampler", choices=("next_scale", "next_token", "sjd", "mcsjd", "lantern", "gsd", "zipar"),
                    default=None, help="default next_scale (var) / next_token (ar); sjd, mcsjd are exact, lantern, "
                                       "gsd, zipar approximate")
    ar.add_argument("--window", type=int, default=16, help="Jacobi window (sjd, mcsjd, lantern, gsd)")
    ar.add_argument("--init", choices=("random", "repeat_horizon", "repeat_vertical"), default="random",
                    help="initial drafts of the Jacobi samplers")
    ar.add_argument("--coupling", choices=("maximal", "gumbel"), default="maximal", help="MC-SJD draft coupling")
    ar.add_argument("--lantern-k", type=int, default=1000, help="LANTERN latent neighbours")
    ar.add_argument("--lantern-delta", type=float, default=0.1, help="LANTERN moved-mass bound (0 = SJD)")
    ar.add_argument("--gsd-group", type=int, default=None,
                    help="GSD rank window +-group//2 (default: the release's 6 likelier / 7 less likely; 1 = SJD)")
    ar.add_argument("--zipar-window", type=int, default=None,
                    help="ZipAR window s (default: half the grid width; the grid width = next-token)")
    add_infinity_arguments(p)
    out = p.add_argument_group("output and device")
    out.add_argument("--out", default="samples.png", help="grid PNG path")
    out.add_argument("--out-dir", help="also write each image as a PNG into this folder")
    out.add_argument("--nrow", type=int, default=None, help="images per grid row")
    out.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    out.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype of the transformer")
    return p


def load_models(args):
    """(tokenizer, model, description) from the arguments."""
    from var import hub
    from var.models import create
    if args.vae or args.var:
        if not (args.vae and args.var):
            raise ConfigError("give both --vae and --var")
        tok, model = hub.load_var(args.vae, args.var, device=args.device)
        return tok, model, f"{args.var}"
    bundled = _bundled_var()
    if bundled is not None and not args.random_init:
        tok, model = hub.load_var(bundled / "tokenizer", bundled / "transformer", device=args.device)
        return tok, model, f"bundled model {bundled.name}"
    log.warning("no bundled model found: sampling from RANDOM weights (var_tiny); images are noise")
    torch.manual_seed(args.seed)
    tok, model = create("msvq_tiny").eval(), create("var_tiny").eval()
    return tok.to(args.device), model.to(args.device), "random-weight var_tiny"


def read_prompts(args) -> list[str] | None:
    """``--prompt`` values then the lines of ``--prompts-file``; None when neither is given."""
    from var.errors import PromptError
    if args.prompt is None and not args.prompts_file:
        return None
    prompts = [p.strip() for p in args.prompt or []]
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


def load_ar_models(args):
    """(vq, gpt, description) for ``--family ar``: --vq/--gpt, the bundled AR model, or random tiny presets."""
    from var import hub
    from var.assets import bundled_ar_dir
    from var.models import create
    if args.vq or args.gpt:
        if not (args.vq and args.gpt):
            raise ConfigError("give both --vq and --gpt")
        vq, gpt = hub.load_llamagen(args.vq, args.gpt, image_size=args.image_size, device=args.device)
        return vq, gpt, f"{args.gpt}"
    bundled = bundled_ar_dir()
    if bundled is not None and not args.random_init:
        vq, gpt = hub.load_llamagen(bundled / "tokenizer", bundled / "transformer", device=args.device)
        return vq, gpt, f"bundled AR model {bundled.name}"
    log.warning("no bundled AR model found: sampling from RANDOM weights (gpt_tiny); images are noise")
    torch.manual_seed(args.seed)
    return create("vq_tiny").eval().to(args.device), create("gpt_tiny").eval().to(args.device), "random-weight gpt_tiny"


# the samplers' defaults per model family: VAR's FID settings and LlamaGen's (also used by var-eval sample)
FAMILY_DEFAULTS = {"var": dict(cfg=1.5, top_k=900, top_p=0.96), "ar": dict(cfg=2.0, top_k=0, top_p=0.0)}


def resolve_family_defaults(args) -> None:
    """Fill the per-family defaults of --sampler / --cfg / --top-k / --top-p."""
    if args.family == "var":
        if args.sampler not in (None, "next_scale"):
            raise SystemExit(f"var-sample: --sampler {args.sampler} needs --family ar")
        defaults = dict(sampler="next_scale", **FAMILY_DEFAULTS["var"])
    else:
        if args.sampler == "next_scale":
            raise SystemExit("var-sample: next_scale is the VAR sampler (use --family var)")
        defaults = dict(sampler="next_token", **FAMILY_DEFAULTS["ar"])
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _bundled_var():
    from var.assets import bundled_var_dir
    return bundled_var_dir()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    check_outputs(args)
    if args.family == "infinity":
        return sample_infinity_main(args)
    prompts = read_prompts(args)
    if prompts is not None:
        if args.family == "var" and args.vae:
            raise ConfigError("--prompt samples a next-token text-to-image model (no --vae/--var)")
        if args.classes:
            raise ConfigError("give --classes or --prompt, not both")
        args.family = "ar"
    resolve_family_defaults(args)
    from var.samplers import sample_next_scale
    from var.samplers.next_token import run_ar_sampler
    from var.utils.images import save_image_grid, save_images

    text_encoder = None
    if prompts is not None:
        tok, model, text_encoder, desc = load_t2i_models(args)
        prompts = [p for p in prompts for _ in range(args.images_per_prompt)]
        labels = prompts
        text_encoder.condition(prompts, model.config.caption_len)  # bad prompts fail before any sampling
    else:
        tok, model, desc = load_ar_models(args) if args.family == "ar" else load_models(args)
        num_classes = model.config.num_classes
        if args.classes:
            labels = torch.tensor(args.classes, dtype=torch.long)
        else:
            labels = torch.randint(0, num_classes, (args.num_images,),
                                   generator=torch.Generator().manual_seed(args.seed))
        # VAR models check class ids with check_labels (only the next-token GPTs take captions: check_condition)
        (model.check_condition if hasattr(model, "check_condition") else model.check_labels)(labels)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    autocast = (torch.autocast(torch.device(args.device).type, dtype=DTYPES[args.dtype])
                if args.dtype != "fp32" else contextlib.nullcontext())
    images, passes = [], 0
    for start in tqdm(range(0, len(labels), args.batch_size), desc=f"sampling {desc}", unit="batch"):
        # each batch's PNGs are written as soon as it is done: a kill keeps what was sampled
        batch = labels[start:start + args.batch_size]
        batch = (text_encoder.condition(batch, model.config.caption_len) if text_encoder is not None
                 else batch.to(args.device))
        with autocast:
            if args.family == "ar":
                out = run_ar_sampler(args.sampler, model, tok, batch, window=args.window, init=args.init,
                                     coupling=args.coupling, lantern_k=args.lantern_k,
                                     lantern_delta=args.lantern_delta, gsd_group=args.gsd_group,
                                     zipar_window=args.zipar_window, cfg=args.cfg, top_k=args.top_k,
                                     top_p=args.top_p, temperature=args.temperature, generator=gen)
            else:
                out = sample_next_scale(model, tok, batch, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                                        temperature=args.temperature, more_smooth=args.more_smooth, generator=gen)
        images.append(out.images.float().cpu())
        passes += out.stats.forward_passes
        if args.out_dir:
            save_images(images[-1], args.out_dir, start_index=start)
    images = torch.cat(images)
    path = save_image_grid(images, args.out, nrow=args.nrow)
    what = f"prompts {labels}" if text_encoder is not None else f"classes {labels.tolist()}"
    log.info("wrote %s (%d images, %s, %s sampler, %d forward passes)", path, len(images), what, args.sampler,
             passes)
    if args.out_dir:
        log.info("wrote %d PNGs to %s", len(images), Path(args.out_dir))
    return 0


def sample_infinity_main(args) -> int:
    """``--family infinity``: encode the prompts, sample in batches, write the grid (and PNGs)."""
    from var.cli.infinity import (INFINITY_DEFAULTS, check_text_encoder, load_infinity_models, load_text_source,
                                  negative_prompts)
    from var.errors import ConfigError
    from var.samplers.infinity import sample_infinity
    from var.tokenizers.scale_schedules import dynamic_schedule
    from var.utils.images import save_image_grid, save_images

    if args.sampler not in (None, "infinity"):
        raise SystemExit(f"var-sample: --sampler {args.sampler} is not an Infinity sampler")
    for name, value in INFINITY_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    prompts = read_prompts(args)
    if prompts is None:
        raise ConfigError("--family infinity needs --prompt or --prompts-file")
    prompts = [p for p in prompts for _ in range(args.images_per_prompt)]
    negatives = negative_prompts(args, len(prompts))
    schedule = dynamic_schedule(args.h_div_w, args.pixels)  # named error for an aspect ratio with no template
    encode = load_text_source(args, args.device)
    vae, model, desc = load_infinity_models(args)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    autocast = (torch.autocast(torch.device(args.device).type, dtype=DTYPES[args.dtype])
                if args.dtype != "fp32" else contextlib.nullcontext())
    images, passes = [], 0
    for start in tqdm(range(0, len(prompts), args.batch_size), desc=f"sampling {desc}", unit="batch"):
        emb = encode(prompts[start:start + args.batch_size])
        check_text_encoder(model, emb)
        neg = encode(negatives[start:start + args.batch_size]) if negatives else None
        with autocast:
            out = sample_infinity(model, vae, emb, schedule=schedule, cfg=args.cfg, tau=args.tau, top_k=args.top_k,
                                  top_p=args.top_p, gumbel=args.gumbel, cfg_insertion_layer=args.cfg_insertion_layer,
                                  negative=neg, generator=gen)
        images.append(out.images.float().cpu())
        passes += out.stats.forward_passes
        if args.out_dir:  # each batch's PNGs as soon as it is done: a kill keeps what was sampled
            save_images(images[-1], args.out_dir, start_index=start)
    images = torch.cat(images)
    path = save_image_grid(images, args.out, nrow=args.nrow)
    log.info("wrote %s (%d images of %dx%d px, %d forward passes)", path, len(images), images.shape[-2],
             images.shape[-1], passes)
    if args.out_dir:
        log.info("wrote %d PNGs to %s", len(images), Path(args.out_dir))
    return 0


def check_outputs(args) -> None:
    """Bad counts and output names fail before any sampling (not after minutes of it)."""
    from var.utils.devices import check_device
    from var.utils.images import image_format
    check_device(args.device)
    if args.num_images < 1 and not args.classes:
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
