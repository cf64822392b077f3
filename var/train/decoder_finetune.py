"""Fine-tune only the decoding side of a multi-scale tokenizer (``post_quant_conv`` + ``decoder``) on its own
quantised latents, optionally switching the decoder's padding mode. Encoder, codebook and phi stay frozen, so every
image keeps its tokens and a VAR transformer trained on the tokenizer still fits it.

The bundled tokenizer was made this way (zero padding left its decoder a green top-right pixel; see
``docs/models.md``)::

    python -m var.train.decoder_finetune --tokenizer runs/msvq/export --decoder-padding-mode replicate \\
        --steps 600 --export-dir var/assets/var_bundled/tokenizer
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time

import torch

from var.errors import ConfigError
from var.tokenizers.multiscale_vqvae import MultiScaleVQVAE
from var.tokenizers.vae_modules import PADDING_MODES

log = logging.getLogger(__name__)


def with_decoder_padding(tok: MultiScaleVQVAE, mode: str) -> MultiScaleVQVAE:
    """A copy of ``tok`` (same weights) whose decoder pads with ``mode``."""
    if mode not in PADDING_MODES:
        raise ConfigError(f"decoder padding mode must be one of {PADDING_MODES}, got {mode!r}")
    new = MultiScaleVQVAE(dataclasses.replace(tok.config, decoder_padding_mode=mode))
    new.load_state_dict(tok.state_dict())
    return new.to(next(tok.parameters()).device)


def decoding_parameters(tok: MultiScaleVQVAE) -> list[torch.nn.Parameter]:
    return list(tok.post_quant_conv.parameters()) + list(tok.decoder.parameters())


def finetune_decoder(tok: MultiScaleVQVAE, dataset, *, steps: int, batch_size: int = 32, lr: float = 5e-4,
                     clip_grad: float = 1.0, seed: int = 0, log_every: int = 100) -> MultiScaleVQVAE:
    """Train ``post_quant_conv`` and ``decoder`` of ``tok`` in place for ``steps`` AdamW steps (betas 0.9/0.95,
    no weight decay, cosine decay from ``lr`` to 0) on the L1 error of ``decode(encode(x))`` for random images of
    ``dataset`` (items ``(image in [-1, 1], label)``). Deterministic for a given ``seed``; returns ``tok``."""
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ConfigError(f"steps and batch_size must be >= 1 and lr > 0, got {steps}, {batch_size}, {lr}")
    tok.requires_grad_(False).eval()
    params = decoding_parameters(tok)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    device = next(tok.parameters()).device
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(dataset), (batch_size,), generator=gen).tolist()
        x = torch.stack([dataset[i][0] for i in idx]).to(device)
        with torch.no_grad():
            f_hat = tok.quantize.indices_to_fhat(tok.encode(x))  # frozen: the tokens never change
        loss = (tok.decoder(tok.post_quant_conv(f_hat)) - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log.info("decoder step %d/%d  l1 %.4f  %.0f s", step + 1, steps, loss.item(), time.time() - t0)
    return tok.requires_grad_(False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m var.train.decoder_finetune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="saved multi-scale tokenizer directory (var-train export)")
    p.add_argument("--export-dir", required=True, help="where to save the fine-tuned tokenizer")
    p.add_argument("--decoder-padding-mode", choices=PADDING_MODES, default=None,
                   help="switch the decoder's padding first (default: keep the tokenizer's)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (cosine decay to 0)")
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0, help="seed of the procedural shapes dataset")
    p.add_argument("--num-images", type=int, default=20000)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from var.hub import load_var_tokenizer, save_pretrained
    from var.train.data import ProceduralShapes
    tok = load_var_tokenizer(args.tokenizer)
    if args.decoder_padding_mode is not None:
        tok = with_decoder_padding(tok, args.decoder_padding_mode)
    dataset = ProceduralShapes(args.num_images, image_size=tok.image_size, seed=args.data_seed)
    t0 = time.time()
    finetune_decoder(tok, dataset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                     clip_grad=args.clip_grad, seed=args.seed)
    save_pretrained(tok, args.export_dir)
    log.info("fine-tuned the decoder %d steps in %.1f s -> %s", args.steps, time.time() - t0, args.export_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
