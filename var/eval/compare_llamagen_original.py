"""Check that this package's LlamaGen text-to-image GPT computes what the original FoundationVision/LlamaGen code
computes, on the same random weights and the same caption features.

Usage::

    git clone https://github.com/FoundationVision/LlamaGen /work/scratch/LlamaGen   # outside this repository
    var-bench original-llamagen-t2i --original /work/scratch/LlamaGen [--size B] [--json out.json]

The original ``autoregressive/models/{gpt,generate}.py`` are imported from the checkout (nothing of it is part of
this repository; the checkout is on ``sys.path`` only while they are imported). Its
``Transformer(model_type='t2i')`` is built with random weights (every parameter and the ``uncond_embedding`` buffer
drawn from N(0, 0.02), the zero-initialised head included, so logits are not trivial), its state dict is loaded into
:class:`~var.models.gpt_t2i.GPTT2I` with :func:`var.hub.load_strict` (same keys, no renaming). Two captions with
different padding (random "T5 features", left padded as LlamaGen does). Checks:

(a) teacher-forced logits: original ``forward`` in training mode (all dropouts 0) with the attention mask built
    the way ``dataset/t2i.py`` builds it, for the captions and for the null caption (``uncond_embedding``), vs
    ``GPTT2I.forward``;
(b) cached generation: original ``generate`` (KV cache, CFG against the null caption, ``emb_masks``) vs
    :func:`~var.samplers.next_token.sample_next_token` with greedy decoding (top-k 1, so the comparison does not
    depend on how each side draws random numbers): image tokens;
(c) the same for SJD and ZipAR with window = grid width (greedy: both must reproduce the original's tokens), and
    ZipAR's default window for information (approximate by design: its agreement is not an equivalence check).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from var.errors import ConfigError
from var.hub import load_strict
from var.models.conditioning import CaptionCondition
from var.models.gpt_t2i import GPTT2I, GPTT2IConfig
from var.samplers.jacobi import sample_sjd
from var.samplers.neighbor import sample_zipar
from var.samplers.next_token import sample_next_token
from var.utils.machine import cpu_model, load_average

SIZES = {"B": (12, 12, 768), "L": (24, 16, 1024), "XL": (36, 20, 1280)}


def import_original(repo: Path):
    """The original's ``autoregressive.models.gpt`` and ``generate`` modules from a checkout."""
    if not (repo / "autoregressive" / "models" / "gpt.py").is_file():
        raise ConfigError(f"{repo} is not a checkout of FoundationVision/LlamaGen (no autoregressive/models/gpt.py)")
    if "autoregressive" in sys.modules:
        raise ConfigError("a module named 'autoregressive' is already imported: run the comparison in a fresh process")
    sys.path.insert(0, str(repo))  # the user-given checkout only, and only while its package is imported
    try:
        from autoregressive.models import generate as orig_generate  # noqa: PLC0415  (the checkout's modules)
        from autoregressive.models import gpt as orig_gpt  # noqa: PLC0415
    finally:
        sys.path.remove(str(repo))
    return orig_gpt, orig_generate


def build_pair(orig_gpt, size: str, grid: int, seed: int):
    n_layer, n_head, dim = SIZES[size]
    torch.manual_seed(seed)
    args = orig_gpt.ModelArgs(n_layer=n_layer, n_head=n_head, dim=dim, block_size=grid * grid, cls_token_num=120,
                              model_type="t2i", token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
                              drop_path_rate=0.0, class_dropout_prob=0.0)
    orig = orig_gpt.Transformer(args)
    with torch.no_grad():
        for t in list(orig.parameters()) + [orig.cls_embedding.uncond_embedding]:
            if t.ndim > 1:
                t.normal_(0.0, 0.02)
    ours = GPTT2I(GPTT2IConfig(dim=dim, n_layer=n_layer, n_head=n_head, grid_size=grid))
    load_strict(ours, orig.state_dict(), "original LlamaGen t2i state dict")
    return orig, ours.eval()


def captions(lengths, seed: int) -> CaptionCondition:
    g = torch.Generator().manual_seed(seed)
    return CaptionCondition.left_padded([0.2 * torch.randn(n, 2048, generator=g) for n in lengths], 120)


def original_mask(emb_mask_BT: torch.Tensor, seq: int) -> torch.Tensor:
    """``dataset/t2i.py``'s training mask (causal, caption keys masked, diagonal forced), cut to ``seq``."""
    T = emb_mask_BT.shape[1]
    masks = []
    for m in emb_mask_BT.float():
        a = torch.tril(torch.ones(seq, seq))
        a[:, :T] = a[:, :T] * m[None]
        eye = torch.eye(seq)
        masks.append((a * (1 - eye) + eye).bool())
    return torch.stack(masks)[:, None]


@torch.no_grad()
def teacher_forced(orig, ours, cond: CaptionCondition, idx_BL: torch.Tensor) -> dict:
    T, L = 120, idx_BL.shape[1]
    orig.train()  # the original's teacher-forcing branch (dropouts are 0); eval slices RoPE by input_pos
    out = {}
    null = CaptionCondition(orig.cls_embedding.uncond_embedding.expand(len(cond), -1, -1), cond.mask_BT)
    for name, c in (("caption", cond), ("null caption", null)):
        ref, _ = orig(idx=idx_BL[:, :-1], cond_idx=c.features_BTC, mask=original_mask(c.mask_BT, T + L - 1))
        got = ours(c, idx_BL)
        out[name] = dict(max_abs_diff=(ref - got).abs().max().item(), max_abs_logit=ref.abs().max().item(),
                         argmax_agreement=(ref.argmax(-1) == got.argmax(-1)).float().mean().item())
    orig.eval()
    return out


@torch.no_grad()
def generation(orig, orig_generate, ours, cond: CaptionCondition, cfg_scale: float) -> dict:
    N = ours.seq_len
    t0 = time.perf_counter()
    ref = orig_generate.generate(orig, cond.features_BTC, N, emb_masks=cond.mask_BT.float(), cfg_scale=cfg_scale,
                                 temperature=1.0, top_k=1, top_p=1.0, sample_logits=True).long()
    t_orig = time.perf_counter() - t0
    out = {"original_s": t_orig}
    greedy = dict(cfg_scale=cfg_scale, top_k=1, decode=False)
    runs = {"next_token": lambda: sample_next_token(ours, None, cond, **greedy),
            "sjd": lambda: sample_sjd(ours, None, cond, window=16, **greedy),
            "zipar_window_eq_width": lambda: sample_zipar(ours, None, cond, window=ours.config.grid_size, **greedy),
            "zipar_default_window (approximate)": lambda: sample_zipar(ours, None, cond, **greedy)}
    for name, run in runs.items():
        t0 = time.perf_counter()
        res = run()
        out[name] = dict(tokens_equal=bool(torch.equal(res.tokens, ref)),
                         token_agreement=(res.tokens == ref).float().mean().item(),
                         forward_passes=res.stats.forward_passes, seconds=time.perf_counter() - t0)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``var-bench original-llamagen-t2i``."""
    parser.add_argument("--original", type=Path, required=True, help="checkout of FoundationVision/LlamaGen")
    parser.add_argument("--size", choices=sorted(SIZES), default="B", help="GPT size (default B)")
    parser.add_argument("--grid", type=int, default=16,
                        help="tokens per side (16 = 256 px stage 1, 32 = stage 2; default 16)")
    parser.add_argument("--cfg-scale", type=float, default=7.5, help="LlamaGen guidance, 1 = none (default 7.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, captions and tokens (default 0)")
    parser.add_argument("--json", type=Path, help="write the report as JSON here")


@torch.no_grad()  # in-process callers (tests, var-bench) keep their grad mode
def run(args: argparse.Namespace) -> int:
    """``var-bench original-llamagen-t2i``: our text-to-image GPT against the original code, same weights."""
    orig_gpt, orig_generate = import_original(args.original.resolve())
    orig, ours = build_pair(orig_gpt, args.size, args.grid, args.seed)
    cond = captions([7, 25], args.seed + 1)
    idx = torch.randint(0, 16384, (2, args.grid * args.grid), generator=torch.Generator().manual_seed(args.seed + 2))
    report = {"machine": f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                         f"{platform.python_version()}, load average {load_average()}",
              "model": f"GPT-{args.size} t2i (random weights), {args.grid}x{args.grid} tokens, 120-token captions "
                       f"of 7 and 25 real tokens, fp32 CPU",
              "teacher_forced": teacher_forced(orig, ours, cond, idx),
              "greedy_generation_cfg_scale": args.cfg_scale,
              "generation": generation(orig, orig_generate, ours, cond, args.cfg_scale)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0
