"""Benchmark CoDe (per draft_steps N), NAR and CTF against the plain VAR / next-token samplers.

Measures per sampler call: forward passes, images/s (tokens only, no VQ decode, as in the papers), the peak KV
cache bytes (sampler stats), the parameter bytes, the peak CUDA memory on a GPU, and a quality proxy. The models
have random weights (no trained checkpoints of these sizes are bundled), so the quality proxy is a likelihood,
not an image metric:

* CoDe: mean NLL (nats/token) of the sampled tokens under the **drafter** (teacher forcing, conditional logits).
  N = all scales is the drafter's own sampler; lower means "closer to what the large model would draw".
* NAR / AR / CTF: each sampler's NLL of its own samples under its own model (CTF: stage-1 NLL of the coarse
  labels + stage-2 NLL of the fine codes). With random weights this measures sampling consistency only.

    python scripts/bench_code_nar_ctf.py                   # CPU-sized models
    python scripts/bench_code_nar_ctf.py --size paper      # VAR-d30/d16, NAR-B vs GPT-B, CTF-B (needs a GPU)

Prints a table and writes ``benchmarks/code_nar_ctf_<size>_<device>.json`` naming the machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from var.models import create
from var.models import nar_ctf_presets  # noqa: F401  (registers the nar_* / ctf_* presets)
from var.models.ctf import kmeans_codebook
from var.models.gpt import GPT, GPTConfig
from var.models.nar import NAR
from var.models.var_model import VAR, VARConfig
from var.samplers.coarse_to_fine import sample_coarse_to_fine
from var.samplers.collaborative import sample_collaborative
from var.samplers.neighbor_nar import sample_nar
from var.samplers.next_scale import sample_next_scale
from var.samplers.next_token import sample_next_token
from var.tokenizers.multiscale_vqvae import VAR_PATCH_NUMS_256

SIZES = {
    # CPU: a 10-scale VAR pair with a ~8x parameter ratio (like d30/d16's 6.7x), GPTs over a 16x16 grid.
    "cpu": dict(drafter=dict(depth=6, width=384, num_heads=6), refiner=dict(depth=3, width=192, num_heads=3),
                var_classes=1000, vocab=4096, batch=2,
                gpt=dict(dim=256, n_layer=4, n_head=4, multiple_of=64, vocab_size=4096, grid_size=16),
                coarse=512),
    # GPU: the paper's pairs (random weights).
    "paper": dict(drafter=dict(depth=30), refiner=dict(depth=16), var_classes=1000, vocab=4096, batch=64,
                  gpt=dict(dim=768, n_layer=12, n_head=12, vocab_size=16384, grid_size=16), coarse=512),
}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def param_bytes(*models) -> int:
    return sum(p.numel() * p.element_size() for m in models for p in m.parameters())


AUTOCAST = {"dtype": None}


def timed(fn, repeats: int, device):
    """Run ``fn`` once to warm up, then ``repeats`` times; returns (last output, median seconds, peak CUDA bytes)."""
    if AUTOCAST["dtype"] is not None:
        plain = fn
        fn = lambda: _autocast(plain, device)  # noqa: E731
    out = fn()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return out, statistics.median(times), peak


def _autocast(fn, device):
    with torch.autocast(device.type, dtype=AUTOCAST["dtype"]):
        return fn()


@torch.no_grad()
def var_nll(model: VAR, tok, labels, tokens) -> float:
    logits = model.teacher_forcing_logits(tok, labels, tokens).float()
    target = torch.cat([t.flatten(1) for t in tokens], dim=1)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten()).item()


@torch.no_grad()
def gpt_nll(model: GPT, labels, tokens) -> float:
    logits = model(labels, tokens).float()
    return F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).item()


def row(name, out, seconds, batch, peak_cuda, params, proxy) -> dict:
    s = out.stats
    return {"sampler": name, "forward_passes": s.forward_passes, "images_per_s": batch / seconds,
            "latency_s": seconds, "peak_kv_cache_mb": s.peak_kv_cache_bytes / 2 ** 20,
            "params_mb": params / 2 ** 20, "peak_cuda_mb": None if peak_cuda is None else peak_cuda / 2 ** 20,
            "quality_proxy_nll": proxy}


def bench_code(size, device, repeats, gen_seed) -> list[dict]:
    tok = create("msvq_tiny", patch_nums=VAR_PATCH_NUMS_256, vocab_size=size["vocab"], z_channels=32).to(device)
    common = dict(num_classes=size["var_classes"], vocab_size=size["vocab"], latent_channels=32,
                  patch_nums=VAR_PATCH_NUMS_256)
    drafter = VAR(VARConfig(**common, **size["drafter"])).to(device).eval()
    refiner = VAR(VARConfig(**common, **size["refiner"])).to(device).eval()
    B = size["batch"]
    labels = torch.arange(B, device=device) % size["var_classes"]
    knobs = dict(cfg=1.5, top_k=600, top_p=0.96, decode=False)
    gen = lambda: torch.Generator(device=device).manual_seed(gen_seed)  # noqa: E731
    rows = []
    for name, model in (("VAR drafter (plain)", drafter), ("VAR refiner (plain)", refiner)):
        out, sec, peak = timed(lambda: sample_next_scale(model, tok, labels, generator=gen(), **knobs), repeats,
                               device)
        rows.append(row(name, out, sec, B, peak, param_bytes(model), var_nll(drafter, tok, labels, out.tokens)))
    K = len(VAR_PATCH_NUMS_256)
    for n in range(K - 1, 0, -1):
        out, sec, peak = timed(lambda: sample_collaborative(
            drafter, refiner, tok, labels, draft_steps=n, generator=gen(),
            temperature=[1.1] * (K - 3) + [1.0] * 3, **knobs), repeats, device)
        r = row(f"CoDe N={n}", out, sec, B, peak, param_bytes(drafter, refiner),
                var_nll(drafter, tok, labels, out.tokens))
        ex = out.stats.extra
        r.update(drafter_kv_mb=ex["drafter_peak_kv_cache_bytes"] / 2 ** 20,
                 refiner_kv_mb=ex["refiner_peak_kv_cache_bytes"] / 2 ** 20, prefill=ex["prefill"])
        rows.append(r)
    return rows


def bench_nar_ctf(size, device, repeats, gen_seed) -> list[dict]:
    c = dict(num_classes=1000, **size["gpt"])
    B = size["batch"]
    labels = torch.arange(B, device=device) % 1000
    gen = lambda: torch.Generator(device=device).manual_seed(gen_seed)  # noqa: E731
    rows = []

    def randomized(model):
        with torch.no_grad():  # the zero-initialised heads would make every sampler draw uniform tokens
            for name, p in model.named_parameters():
                if name.startswith(("output", "medusa_output")):
                    p.normal_(0, 0.02)
        return model.to(device).eval()

    gpt = randomized(GPT(GPTConfig(**c)))
    out, sec, peak = timed(lambda: sample_next_token(gpt, None, labels, cfg=2.0, generator=gen(), decode=False),
                           repeats, device)
    rows.append(row("AR next-token (plain GPT)", out, sec, B, peak, param_bytes(gpt), gpt_nll(gpt, labels, out.tokens)))

    nar = randomized(NAR(GPTConfig(**c)))
    out, sec, peak = timed(lambda: sample_nar(nar, None, labels, cfg=2.0, generator=gen(), decode=False),
                           repeats, device)
    with torch.no_grad():
        proxy = F.cross_entropy(nar(labels, out.tokens).float().flatten(0, 1), out.tokens.flatten()).item()
    rows.append(row("NAR neighbouring (2n-1 passes)", out, sec, B, peak, param_bytes(nar), proxy))

    K = size["coarse"]
    stage1 = randomized(create("ctf_stage1_tiny", **{**c, "vocab_size": K}))
    stage2 = randomized(create("ctf_stage2_tiny", **{**c, "num_coarse": K}))
    codebook = torch.randn(c["vocab_size"], 8, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    stage2.set_clusters(kmeans_codebook(codebook, K, iters=20).to(device))
    kmeans_s = time.perf_counter() - t0
    out, sec, peak = timed(lambda: sample_coarse_to_fine(stage1, stage2, None, labels, cfg=2.0, generator=gen(),
                                                         decode=False), repeats, device)
    coarse = out.stats.extra.pop("coarse")
    with torch.no_grad():
        nll1 = gpt_nll(stage1, labels, coarse)
        logits2 = stage2(labels, coarse).float()
        nll2 = F.cross_entropy(logits2.flatten(0, 1), out.tokens.flatten()).item()
    r = row(f"CTF (K={K}, {stage1.seq_len}+1 passes)", out, sec, B, peak, param_bytes(stage1, stage2), nll1 + nll2)
    r["kmeans_s"] = kmeans_s
    rows.append(r)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="images per call (default: per size)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--autocast", choices=["none", "bfloat16", "float16"], default=None,
                    help="autocast dtype (default: none on CPU, float16 on CUDA as in the CoDe paper)")
    ap.add_argument("--only", choices=["code", "nar_ctf"], default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: on a shared, loaded machine more threads make timings far worse)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/code_nar_ctf_<size>_<device>.json)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    cast = args.autocast or ("float16" if device.type == "cuda" else "none")
    AUTOCAST["dtype"] = None if cast == "none" else getattr(torch, cast)
    dtype = AUTOCAST["dtype"] or torch.float32
    size = dict(SIZES[args.size])
    if args.batch:
        size["batch"] = args.batch
    torch.manual_seed(args.seed)
    rows = []
    if args.only in (None, "code"):
        rows += bench_code(size, device, args.repeats, args.seed)
    if args.only in (None, "nar_ctf"):
        rows += bench_nar_ctf(size, device, args.repeats, args.seed)
    header = f"{'sampler':36s} {'passes':>6s} {'img/s':>8s} {'lat s':>7s} {'KV MB':>8s} {'param MB':>9s} {'NLL':>7s}"
    print(f"machine: {machine()}  size={args.size} batch={size['batch']} dtype={dtype}")
    print(header)
    for r in rows:
        print(f"{r['sampler']:36s} {r['forward_passes']:6d} {r['images_per_s']:8.3f} {r['latency_s']:7.3f} "
              f"{r['peak_kv_cache_mb']:8.2f} {r['params_mb']:9.1f} {r['quality_proxy_nll']:7.3f}")
    out = Path(args.out or f"benchmarks/code_nar_ctf_{args.size}_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "device": device.type, "size": args.size,
                               "config": {k: v for k, v in size.items()}, "compute_dtype": str(dtype),
                               "repeats": args.repeats, "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "cpu_threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
