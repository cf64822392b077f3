"""Training of the bundled text-to-image model: a :class:`~var.models.gpt_t2i.GPTT2I` with a caption prefix from a
:class:`~var.models.caption_encoder.CaptionEncoder` trained jointly from scratch, on
:class:`~var.train.data.CompositionalShapes` (the held-out colour-shape pairs are never rendered), over the frozen
single-scale tokenizer of the bundled class-conditional AR model (8 x 8 tokens, 256 codes).

    python -m var.train.t2i_bundled --out-dir runs/t2i --export-dir var/assets/t2i_bundled

The export directory gets ``tokenizer/``, ``transformer/`` and ``text_encoder/`` (``var.hub`` saved directories),
rewritten atomically every ``--export-every`` steps and at the end.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from var import hub
from var.models.caption_encoder import CaptionEncoder, CaptionEncoderConfig
from var.models.gpt_t2i import GPTT2I, GPTT2IConfig
from var.train.data import COLOURS, SHAPES, TEXTURES, CompositionalShapes

log = logging.getLogger(__name__)


def caption_vocabulary() -> tuple[str, ...]:
    """Every word of the compositional captions (the bundled text encoder's vocabulary)."""
    words = ["a", *COLOURS, *SHAPES]
    for phrase in TEXTURES.values():
        words += [w for w in phrase.split() if w not in words]
    return tuple(dict.fromkeys(words))


class T2IBundle(nn.Module):
    """The trained pair: text encoder + GPT (one module so the optimiser and the EMA see both)."""

    def __init__(self, gpt: GPTT2I, text_encoder: CaptionEncoder):
        super().__init__()
        self.gpt, self.text_encoder = gpt, text_encoder

    def loss(self, captions: list[str], tokens_BN: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        cond = self.text_encoder.condition(captions, self.gpt.config.caption_len)
        cond = self.gpt.drop_captions(cond, generator)
        logits = self.gpt(cond, tokens_BN)
        return F.cross_entropy(logits.flatten(0, 1), tokens_BN.flatten())


def encode_dataset(vq, dataset: CompositionalShapes, batch: int = 256) -> tuple[torch.Tensor, list[str]]:
    """Token maps ``[N, h*w]`` and captions of every image (rendered and encoded once)."""
    tokens, captions = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), batch):
            idx = range(start, min(start + batch, len(dataset)))
            images, attrs = dataset.tensors(idx)
            tokens.append(vq.encode(images)[0].flatten(1))
            captions += [a.caption for a in attrs]
    return torch.cat(tokens), captions


def export(directory: Path, vq, bundle: T2IBundle) -> None:
    """Write tokenizer/, transformer/, text_encoder/ next to each other, then swap them in."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hub.save_pretrained(vq, tmp / "tokenizer")
    hub.save_pretrained(bundle.gpt, tmp / "transformer")
    hub.save_pretrained(bundle.text_encoder, tmp / "text_encoder")
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def build(vocab_size: int, grid_size: int, *, dim: int = 128, n_layer: int = 4, n_head: int = 4,
          text_dim: int = 64, text_layers: int = 2, seed: int = 0) -> T2IBundle:
    torch.manual_seed(seed)
    enc = CaptionEncoder(CaptionEncoderConfig(vocab=caption_vocabulary(), dim=text_dim, n_layer=text_layers,
                                              n_head=4, max_words=7))
    gpt = GPTT2I(GPTT2IConfig(dim=dim, n_layer=n_layer, n_head=n_head, multiple_of=32, vocab_size=vocab_size,
                              grid_size=grid_size, caption_dim=text_dim, caption_len=enc.config.caption_len,
                              token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, class_dropout_p=0.1))
    return T2IBundle(gpt, enc)


def train(args) -> T2IBundle:
    from var.assets import bundled_ar_dir
    from var.hub import load_llamagen_vq
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vq = load_llamagen_vq(args.tokenizer or bundled_ar_dir() / "tokenizer")
    cache = out / f"tokens_{args.num_images}_seed{args.seed}.pt"
    if cache.exists():
        data = torch.load(cache, weights_only=True)
        tokens, captions = data["tokens"], data["captions"]
    else:
        t0 = time.perf_counter()
        tokens, captions = encode_dataset(vq, CompositionalShapes(args.num_images, seed=args.seed))
        torch.save({"tokens": tokens, "captions": captions}, cache)
        log.info("rendered and encoded %d images in %.0f s", len(tokens), time.perf_counter() - t0)
    grid = int(math.isqrt(tokens.shape[1]))
    bundle = build(vq.vocab_size, grid, dim=args.dim, n_layer=args.n_layer, n_head=args.n_head,
                   text_dim=args.text_dim, seed=args.seed)
    ema = copy.deepcopy(bundle).eval().requires_grad_(False)
    opt = torch.optim.AdamW(bundle.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup_steps) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    gen = torch.Generator().manual_seed(args.seed)
    metrics = (out / "metrics.jsonl").open("a")
    t0 = time.perf_counter()
    bundle.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(tokens), (args.batch_size,), generator=gen)
        loss = bundle.loss([captions[i] for i in idx.tolist()], tokens[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bundle.parameters(), args.clip_grad)
        opt.step()
        sched.step()
        with torch.no_grad():  # EMA of every parameter (buffers, e.g. the null caption, are fixed)
            for pe, p in zip(ema.parameters(), bundle.parameters()):
                pe.lerp_(p, 1 - args.ema_decay)
        if step % args.log_every == 0 or step == args.steps:
            row = dict(step=step, loss=round(loss.item(), 4), lr=sched.get_last_lr()[0],
                       seconds=round(time.perf_counter() - t0, 1))
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            log.info("step %d/%d loss %.4f (%.0f s)", step, args.steps, loss.item(), row["seconds"])
        if args.export_dir and (step % args.export_every == 0 or step == args.steps):
            export(Path(args.export_dir), vq, ema)
    log.info("trained %d steps in %.0f s", args.steps, time.perf_counter() - t0)
    return ema


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="train the bundled text-to-image model (CPU, offline)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--export-dir", help="write tokenizer/ transformer/ text_encoder/ here (e.g. var/assets/t2i_bundled)")
    ap.add_argument("--tokenizer", help="single-scale tokenizer directory (default: the bundled AR model's)")
    ap.add_argument("--num-images", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--clip-grad", type=float, default=2.0)
    ap.add_argument("--ema-decay", type=float, default=0.99)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--text-dim", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--export-every", type=int, default=500)
    return ap


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parser().parse_args(argv)
    torch.set_num_threads(1) if torch.get_num_threads() > 2 else None
    train(args)


if __name__ == "__main__":
    main()
