"""Benchmark CoDe (per draft_steps N), NAR and CTF against the plain VAR / next-token samplers.

Measures per sampler call: forward passes, images/s (tokens only, no VQ decode, as in the papers), the peak KV
cache bytes (sampler stats), the parameter bytes, the peak CUDA memory on a GPU, and a quality proxy. The models
have random weights (no trained checkpoints of these sizes are bundled), so the quality proxy is a likelihood,
not an image metric:

* CoDe: mean NLL (nats/token) of the sampled tokens under the **drafter** (teacher forcing, conditional logits).
  N = all scales is the drafter's own sampler; lower means "closer to what the large model would draw".
* NAR / AR / CTF: each sampler's NLL of its own samples under its own model (CTF: stage-1 NLL of the coarse
  labels + stage-2 NLL of the fine codes). With random weights this measures sampling consistency only.

    var-bench code-nar-ctf                   # CPU-sized models
    var-bench code-nar-ctf --size paper      # VAR-d30/d16, NAR-B vs GPT-B, CTF-B (needs a GPU)

Prints a table and writes ``benchmarks/code_nar_ctf_<size>_<device>.json`` naming the machine.

Quality mode (an image-level proxy with trained models): given a single-scale tokenizer trained on the offline
shapes dataset, it trains tiny AR, NAR and CTF models of equal width, samples with each and reports the fraction
of samples the bundled shapes classifier assigns to their conditioning class::

    var-train tokenizer-ss --data shapes --out-dir runs/ssvq --steps 700
    var-bench code-nar-ctf --quality-tokenizer runs/ssvq/model --save-dir runs/nar_ctf
"""
from __future__ import annotations

import argparse
import json
import statistics
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
from var.utils.machine import machine_description
from var.tokenizers.multiscale_vqvae import VAR_PATCH_NUMS_256

SIZES = {
    # smoke test: the same code paths on models of a few thousand parameters
    "tiny": dict(drafter=dict(depth=2, width=64, num_heads=2), refiner=dict(depth=1, width=32, num_heads=2),
                 var_classes=10, vocab=64, batch=1,
                 gpt=dict(dim=32, n_layer=1, n_head=2, multiple_of=16, vocab_size=64, grid_size=4), coarse=8),
    # CPU: a 10-scale VAR pair with a ~8x parameter ratio (like d30/d16's 6.7x), GPTs over a 16x16 grid.
    "cpu": dict(drafter=dict(depth=6, width=384, num_heads=6), refiner=dict(depth=3, width=192, num_heads=3),
                var_classes=1000, vocab=4096, batch=2,
                gpt=dict(dim=256, n_layer=4, n_head=4, multiple_of=64, vocab_size=4096, grid_size=16),
                coarse=512),
    # GPU: the paper's pairs (random weights).
    "paper": dict(drafter=dict(depth=30), refiner=dict(depth=16), var_classes=1000, vocab=4096, batch=64,
                  gpt=dict(dim=768, n_layer=12, n_head=12, vocab_size=16384, grid_size=16), coarse=512),
}


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
    out, sec, peak = timed(lambda: sample_next_token(gpt, None, labels, cfg_scale=2.0, generator=gen(),
                                                     decode=False), repeats, device)
    rows.append(row("AR next-token (plain GPT)", out, sec, B, peak, param_bytes(gpt), gpt_nll(gpt, labels, out.tokens)))

    nar = randomized(NAR(GPTConfig(**c)))
    out, sec, peak = timed(lambda: sample_nar(nar, None, labels, cfg_scale=2.0, generator=gen(), decode=False),
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
    out, sec, peak = timed(lambda: sample_coarse_to_fine(stage1, stage2, None, labels, cfg_scale=2.0,
                                                         generator=gen(), decode=False), repeats, device)
    coarse = out.coarse
    with torch.no_grad():
        nll1 = gpt_nll(stage1, labels, coarse)
        logits2 = stage2(labels, coarse).float()
        nll2 = F.cross_entropy(logits2.flatten(0, 1), out.tokens.flatten()).item()
    r = row(f"CTF (K={K}, {stage1.seq_len}+1 passes)", out, sec, B, peak, param_bytes(stage1, stage2), nll1 + nll2)
    r["kmeans_s"] = kmeans_s
    rows.append(r)
    return rows


# ---- quality on the offline shapes dataset (trained tiny models) -------------------------------------------------
def _train(name, loss_fn, params, steps, batch, data, seed, lr):
    """AdamW on random minibatches of ``data = (tokens [N, L], labels [N])`` with 10% class dropout."""
    tokens, labels = data
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    t0, first, last = time.perf_counter(), None, None
    for step in range(steps):
        idx = torch.randint(0, tokens.shape[0], (batch,), generator=gen)
        lab = labels[idx].clone()
        lab[torch.rand(batch, generator=gen) < 0.1] = 10  # null class for CFG
        loss = loss_fn(lab, tokens[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item() if last is None else 0.9 * last + 0.1 * loss.item()
    print(f"  trained {name}: {steps} steps, loss {first:.3f} -> {last:.3f} ({time.perf_counter() - t0:.0f} s)")
    return {"first_loss": first, "final_loss_ema": last, "train_s": time.perf_counter() - t0}


def bench_quality(args) -> dict:
    """Train AR, NAR and CTF (tiny, same width) over a trained single-scale tokenizer of the shapes dataset, sample
    with each, and score the samples with the bundled shapes classifier (fraction classified as their label)."""
    from var.eval.classifier import load_classifier
    from var.hub import load_pretrained, save_pretrained
    from var.models.ctf import CTFStage2, CTFStage2Config
    from var.train.objectives_nar_ctf import nar_loss, stage1_loss, stage2_loss
    from var.train.data import ProceduralShapes

    torch.manual_seed(args.seed)
    vq = load_pretrained(args.quality_tokenizer).eval()
    clf = load_classifier().eval()
    ds = ProceduralShapes(args.quality_images, image_size=32, seed=args.seed + 1)  # not the tokenizer's seed-0 set
    images, labels = ds.tensors()
    with torch.no_grad():
        tokens = torch.cat([vq.encode(images[i:i + 256])[0].flatten(1) for i in range(0, len(images), 256)])
        recon_acc = (clf.predict(vq.decode([tokens[:500]])) == labels[:500]).float().mean().item()
        real_acc = (clf.predict(images[:500]) == labels[:500]).float().mean().item()
    grid = int(tokens.shape[1] ** 0.5)
    print(f"tokens {tuple(tokens.shape)}; classifier accuracy: real {real_acc:.3f}, tokenizer recon {recon_acc:.3f}")
    base = dict(dim=args.quality_dim, n_layer=4, n_head=4, multiple_of=32, num_classes=10,
                vocab_size=vq.vocab_size, grid_size=grid, token_dropout_p=0.0, resid_dropout_p=0.0,
                ffn_dropout_p=0.0)
    data, steps, bs, lr = (tokens, labels), args.train_steps, 64, args.lr
    train_log = {}
    ar = GPT(GPTConfig(**base))
    train_log["ar"] = _train("AR", lambda lab, tok: F.cross_entropy(ar(lab, tok).flatten(0, 1), tok.flatten()),
                             list(ar.parameters()), steps, bs, data, 1, lr)
    nar = NAR(GPTConfig(**base))
    train_log["nar"] = _train("NAR", lambda lab, tok: nar_loss(nar, lab, tok), list(nar.parameters()), steps, bs,
                              data, 2, lr)
    K = args.coarse
    stage1 = GPT(GPTConfig(**{**base, "vocab_size": K}))
    stage2 = CTFStage2(CTFStage2Config(**base, num_coarse=K))
    stage2.set_clusters(kmeans_codebook(vq.codebook(), K))
    train_log["ctf_stage1"] = _train("CTF stage 1", lambda lab, tok: stage1_loss(stage1, lab, tok, stage2.cluster_of),
                                     list(stage1.parameters()), steps, bs, data, 3, lr)
    train_log["ctf_stage2"] = _train("CTF stage 2", lambda lab, tok: stage2_loss(stage2, lab, tok),
                                     list(stage2.parameters()), steps, bs, data, 4, lr)
    if args.save_dir:
        for name, m in (("ar", ar), ("nar", nar), ("ctf_stage1", stage1), ("ctf_stage2", stage2)):
            save_pretrained(m, Path(args.save_dir) / name)
    for m in (ar, nar, stage1, stage2):
        m.eval()

    n = args.samples
    sample_labels = torch.arange(n) % 10
    scale = args.quality_cfg_scale
    samplers = {
        "AR next-token": lambda g: sample_next_token(ar, vq, sample_labels, cfg_scale=scale, generator=g),
        "NAR": lambda g: sample_nar(nar, vq, sample_labels, cfg_scale=scale, generator=g),
        "CTF (constrained)": lambda g: sample_coarse_to_fine(stage1, stage2, vq, sample_labels, cfg_scale=scale,
                                                             temperature=1.0, stage2_temperature=1.0, generator=g),
    }
    rows = []
    for name, fn in samplers.items():
        t0 = time.perf_counter()
        out = fn(torch.Generator().manual_seed(args.seed))
        sec = time.perf_counter() - t0
        with torch.no_grad():
            acc = (clf.predict(out.images * 2 - 1) == sample_labels).float().mean().item()
        used = out.tokens.unique().numel() / vq.vocab_size
        rows.append({"sampler": name, "forward_passes": out.stats.forward_passes, "images_per_s": n / sec,
                     "classifier_accuracy": acc, "codes_used": used})
    print(f"{'sampler':20s} {'passes':>6s} {'img/s':>8s} {'class acc':>9s} {'codes used':>10s}")
    for r in rows:
        print(f"{r['sampler']:20s} {r['forward_passes']:6d} {r['images_per_s']:8.2f} {r['classifier_accuracy']:9.3f} "
              f"{r['codes_used']:10.3f}")
    return {"tokenizer": str(args.quality_tokenizer), "classifier_real_accuracy": real_acc,
            "classifier_recon_accuracy": recon_acc, "model": base, "coarse_labels": K, "train_steps": steps,
            "train_batch": bs, "lr": lr, "cfg": args.quality_cfg_scale, "samples": n, "train": train_log, "rows": rows}


def bench_code_quality(args) -> dict:
    """CoDe on trained models: the bundled VAR drafts, ``--code-refiner`` (a smaller VAR on the same tokenizer)
    refines; classifier accuracy and timing for every draft_steps N (N = K: the drafter alone, N = 0: the refiner)."""
    from var import hub
    from var.assets import bundled_var_dir
    from var.eval.classifier import load_classifier

    var_dir = Path(args.code_drafter) if args.code_drafter else bundled_var_dir()
    tok, drafter = hub.load_var(var_dir / "tokenizer", var_dir / "transformer")
    refiner = hub.load_var_transformer(args.code_refiner)
    clf = load_classifier().eval()
    n, K = args.samples, len(tok.patch_nums)
    labels = torch.arange(n) % 10
    rows = []
    for N in range(K, -1, -1):
        out = sample_collaborative(drafter, refiner, tok, labels, draft_steps=N, cfg=1.5, top_k=900, top_p=0.96,
                                   generator=torch.Generator().manual_seed(args.seed))  # warm-up + the samples
        t0 = time.perf_counter()
        sample_collaborative(drafter, refiner, tok, labels, draft_steps=N, cfg=1.5, top_k=900, top_p=0.96,
                             generator=torch.Generator().manual_seed(args.seed), decode=False)
        sec = time.perf_counter() - t0
        with torch.no_grad():
            acc = (clf.predict(out.images * 2 - 1) == labels).float().mean().item()
        name = {K: "VAR drafter (plain)", 0: "VAR refiner (plain)"}.get(N, f"CoDe N={N}")
        rows.append({"sampler": name, "draft_steps": N, "forward_passes": out.stats.forward_passes,
                     "images_per_s": n / sec, "peak_kv_cache_mb": out.stats.peak_kv_cache_bytes / 2 ** 20,
                     "classifier_accuracy": acc})
    print(f"{'sampler':22s} {'passes':>6s} {'img/s':>8s} {'KV MB':>7s} {'class acc':>9s}")
    for r in rows:
        print(f"{r['sampler']:22s} {r['forward_passes']:6d} {r['images_per_s']:8.2f} {r['peak_kv_cache_mb']:7.2f} "
              f"{r['classifier_accuracy']:9.3f}")
    return {"drafter": str(var_dir), "drafter_params": sum(p.numel() for p in drafter.parameters()),
            "refiner": str(args.code_refiner), "refiner_params": sum(p.numel() for p in refiner.parameters()),
            "settings": {"cfg": 1.5, "top_k": 900, "top_p": 0.96}, "samples": n, "rows": rows}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of ``var-bench code-nar-ctf``."""
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu",
                    help="model sizes: tiny (smoke test), cpu (a 10-scale VAR pair, 16x16-grid GPTs), paper (the "
                         "papers' pairs, needs a GPU) (default cpu)")
    ap.add_argument("--batch", type=int, default=None, help="images per call (default: per size)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per row; the fastest counts (default 2)")
    ap.add_argument("--autocast", choices=["none", "bfloat16", "float16"], default=None,
                    help="autocast dtype (default: none on CPU, float16 on CUDA as in the CoDe paper)")
    ap.add_argument("--only", choices=["code", "nar_ctf"], default=None, help="only one half (default: both)")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights and draws (default 0)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: on a shared, loaded machine more threads make timings far worse)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/code_nar_ctf_<size>_<device>.json)")
    q = ap.add_argument_group("quality on the shapes dataset (trains tiny AR / NAR / CTF models first)")
    q.add_argument("--quality-tokenizer", default=None,
                   help="a saved single-scale tokenizer (var-train tokenizer-ss ... --out-dir D: pass D/model)")
    q.add_argument("--quality-images", type=int, default=4000, help="training images (default 4000)")
    q.add_argument("--quality-dim", type=int, default=64, help="width of the three models (default 64)")
    q.add_argument("--train-steps", type=int, default=400, help="training steps per model (default 400)")
    q.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    q.add_argument("--coarse", type=int, default=64, help="CTF coarse labels K (default 64)")
    q.add_argument("--samples", type=int, default=200, help="samples per model (default 200)")
    q.add_argument("--quality-cfg-scale", type=float, default=2.0, help="LlamaGen guidance scale (default 2.0)")
    q.add_argument("--save-dir", default=None, help="save the trained models here (save_pretrained layout)")
    c = ap.add_argument_group("CoDe quality with trained VARs (the bundled VAR drafts)")
    c.add_argument("--code-refiner", default=None, help="a saved smaller VAR over the drafter's tokenizer")
    c.add_argument("--code-drafter", default=None, help="VAR bundle dir (tokenizer/ + transformer/); default bundled")


def write_json(path, report: dict) -> None:
    """``report`` after the machine, torch version and date, as JSON at ``path``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_description(), "torch": torch.__version__,
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **report}, indent=2))
    print(f"wrote {out}")


def run(args: argparse.Namespace) -> int:
    """``var-bench code-nar-ctf``: CoDe per draft_steps, NAR and CTF against the plain samplers."""
    if args.code_refiner:
        torch.set_num_threads(args.threads)
        write_json(args.out or "benchmarks/code_quality_shapes.json", bench_code_quality(args))
        return 0
    if args.quality_tokenizer:
        if not torch.cuda.is_available():
            torch.set_num_threads(args.threads)
        write_json(args.out or "benchmarks/nar_ctf_quality_shapes.json", bench_quality(args))
        return 0
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
    print(f"machine: {machine_description()}  size={args.size} batch={size['batch']} dtype={dtype}")
    print(header)
    for r in rows:
        print(f"{r['sampler']:36s} {r['forward_passes']:6d} {r['images_per_s']:8.3f} {r['latency_s']:7.3f} "
              f"{r['peak_kv_cache_mb']:8.2f} {r['params_mb']:9.1f} {r['quality_proxy_nll']:7.3f}")
    write_json(args.out or f"benchmarks/code_nar_ctf_{args.size}_{device.type}.json",
               {"device": device.type, "size": args.size, "config": dict(size), "compute_dtype": str(dtype),
                "repeats": args.repeats, "cpu_threads": torch.get_num_threads(), "rows": rows})
    return 0

