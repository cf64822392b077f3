"""``var-sample``: generate class-conditional images with a VAR model.

Examples::

    var-sample                                    # bundled model (or a random-weight demo config), grid PNG
    var-sample --vae vae_ch160v4096z32.pth --var var_d16.pth --classes 207 360 387 --cfg 1.5 --out grid.png
    var-sample --vae ... --var ... --num-images 16 --out-dir samples/ --device cuda --dtype bf16
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

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
    gen = p.add_argument_group("what to sample")
    gen.add_argument("--classes", type=int, nargs="*", help="class ids (default: random classes)")
    gen.add_argument("--num-images", type=int, default=16, help="images to sample when --classes is not given")
    gen.add_argument("--cfg", type=float, default=1.5, help="VAR guidance strength at the last scale (0 = none)")
    gen.add_argument("--top-k", type=int, default=900)
    gen.add_argument("--top-p", type=float, default=0.96)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--more-smooth", action="store_true", help="VAR's Gumbel smoothing (visualisation only)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=8)
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
            raise SystemExit("var-sample: give both --vae and --var")
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


def _bundled_var():
    from var.assets import bundled_var_dir
    return bundled_var_dir()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    from var.samplers import sample_next_scale
    from var.utils.images import save_image_grid, save_images

    tok, model, desc = load_models(args)
    num_classes = model.config.num_classes
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    if args.classes:
        labels = torch.tensor(args.classes, dtype=torch.long)
    else:
        labels = torch.randint(0, num_classes, (args.num_images,), generator=torch.Generator().manual_seed(args.seed))
    model.check_labels(labels)
    autocast = (torch.autocast(torch.device(args.device).type, dtype=DTYPES[args.dtype])
                if args.dtype != "fp32" else contextlib.nullcontext())
    images, passes = [], 0
    for start in tqdm(range(0, len(labels), args.batch_size), desc=f"sampling {desc}", unit="batch"):
        with autocast:
            out = sample_next_scale(model, tok, labels[start:start + args.batch_size].to(args.device),
                                    cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                                    more_smooth=args.more_smooth, generator=gen)
        images.append(out.images.float().cpu())
        passes += out.stats.forward_passes
    images = torch.cat(images)
    path = save_image_grid(images, args.out, nrow=args.nrow)
    log.info("wrote %s (%d images, classes %s, %d forward passes)", path, len(images), labels.tolist(), passes)
    if args.out_dir:
        save_images(images, args.out_dir)
        log.info("wrote %d PNGs to %s", len(images), Path(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
