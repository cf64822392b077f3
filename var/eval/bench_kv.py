"""Benchmark KV-cache compression policies on VAR (not a test).

For each policy (ScaleKV, HACK, SnapKV, H2O, StreamingLLM) and budget (100/50/25/10% of the cache carried into
the last scale): stored cache bytes, peak cache bytes, images/s, and fidelity against the full cache with the same
seed (token agreement, PSNR of the decoded images). Runs on ``var/assets/var_bundled`` when that directory exists
(``tokenizer/`` + ``transformer/``), otherwise on a small random-weight 256 px VAR. Adds the cache-bytes arithmetic
of VAR-d16/d30 (computed from the configs and the policies' own budgets; nothing of that size is allocated) and,
on a CUDA machine, the Triton ragged kernel vs SDPA on gathered dense tensors.

    var-bench kv                      # writes benchmarks/kv_cache.{json,md}
    var-bench kv --images 2 --budgets 1 0.1 --policies scalekv hack
    var-bench kv --images 32 --profile bundled --name kv_cache_bundled   # shipped profile

On the bundled model the table also has the class accuracy of the decoded samples under the bundled offline
classifier (``var.eval.classifier``), next to the full cache's.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from var.utils.machine import machine_description
from var.kernels import CalibrationProfile, bundled_profile
from var.samplers.calibration import calibrate
from var.kernels.kv_cache import FullCache
from var.kernels.policies.base import CacheLayout
from var.models import VAR, VARConfig
from var.samplers.next_scale import sample_next_scale
from var.samplers.registry import cache_policies
from var.tokenizers.multiscale_vqvae import MultiScaleVQVAE, MultiScaleVQVAEConfig

POLICIES = {name.lower(): cls for name, cls in cache_policies().items() if name != "FullCache"}


class Recorder:
    """Wraps a policy so the benchmark can read the cache the sampler built."""

    def __init__(self, policy):
        self.policy, self.cache = policy, None

    def new_cache(self, model, batch_size, *, dtype=None, device=None):
        self.cache = self.policy.new_cache(model, batch_size, dtype=dtype, device=device)
        return self.cache


def load_models(device):
    from var.assets import bundled_var_dir
    bundled = bundled_var_dir()
    if bundled is not None:
        from var.hub import load_var
        tok, model = load_var(bundled / "tokenizer", bundled / "transformer", device=device)
        return "var_bundled", tok.eval(), model.eval()
    torch.manual_seed(0)
    model = VAR(VARConfig(depth=6, width=384, num_heads=6, num_classes=1000)).to(device).eval()
    tok = MultiScaleVQVAE(MultiScaleVQVAEConfig(ch=32, num_res_blocks=1, norm_groups=8)).to(device).eval()
    return "var_small_random (depth 6, width 384, 6 heads x 64, 256 px, 680 tokens)", tok, model


def psnr(a, b) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def run_policy(model, tok, labels, cache, seed, device):
    gens = [torch.Generator(device=device).manual_seed(seed + i) for i in range(len(labels))]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = sample_next_scale(model, tok, labels, cfg=1.5, generator=gens, cache=cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak_gpu = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return out, elapsed, peak_gpu


def fidelity_table(args, device) -> tuple[str, list[dict], list[int]]:
    name, tok, model = load_models(device)
    layout = CacheLayout.of(model)
    num_classes = model.config.num_classes
    labels = [(i * num_classes) // args.images for i in range(args.images)]
    if args.profile:
        profile = bundled_profile() if args.profile == "bundled" else CalibrationProfile.load(args.profile)
        print(f"calibration profile {args.profile} (labels {profile.meta.get('labels')})")
    else:
        calib_labels = sorted({(7 + i * num_classes // 4) % num_classes for i in range(4)})
        profile_path = Path(args.out_dir) / f"kv_profile_{'bundled' if 'bundled' in name else 'var_small_random'}.json"
        t0 = time.perf_counter()
        profile = calibrate(model, tok, calib_labels, cfg=1.5, seed=0)
        profile.save(profile_path)
        print(f"calibrated on class labels {calib_labels} in {time.perf_counter() - t0:.1f}s -> {profile_path}")
        profile = CalibrationProfile.load(profile_path)
    roles = describe_roles(profile, layout)
    print(f"roles: {roles}")
    classifier = None
    if "bundled" in name:
        from var.eval.classifier import load_classifier
        classifier = load_classifier(device=device)
    labels_t = torch.tensor(labels, device=device)

    def class_accuracy(images):
        if classifier is None:
            return None
        return float((classifier.predict(images * 2 - 1) == labels_t).float().mean())

    full_rec = Recorder(FullCache())
    run_policy(model, tok, labels[:1], FullCache(), args.seed, device)  # warm-up
    full, full_time, full_gpu = run_policy(model, tok, labels, full_rec, args.seed, device)
    rows = [{"policy": "full (preallocated)", "budget": 1.0, "kept_tokens_per_head": layout.full_carried,
             "stored_kv_bytes": full_rec.cache.nbytes(), "peak_cache_bytes": full_rec.cache.nbytes(),
             "images_per_s": len(labels) / full_time, "token_agreement": 1.0, "psnr_db": float("inf"),
             "peak_gpu_bytes": full_gpu, "class_accuracy": class_accuracy(full.images)}]
    for pname in args.policies:
        for budget in args.budgets:
            kwargs = {"profile": profile} if pname in ("scalekv", "hack") else {}
            rec = Recorder(POLICIES[pname](budget=budget, **kwargs))
            out, elapsed, peak_gpu = run_policy(model, tok, labels, rec, args.seed, device)
            agree = sum(int((a == b).sum()) for a, b in zip(out.tokens, full.tokens))
            total = sum(a.numel() for a in full.tokens)
            cache = rec.cache
            rows.append({"policy": pname, "budget": budget, "kept_tokens_per_head": cache.policy.budget_per_head,
                         "stored_kv_bytes": cache.kv_nbytes(), "stored_bytes_with_index": cache.nbytes(),
                         "peak_cache_bytes": cache.peak_nbytes(), "images_per_s": len(labels) / elapsed,
                         "token_agreement": agree / total, "psnr_db": psnr(out.images, full.images),
                         "peak_gpu_bytes": peak_gpu, "class_accuracy": class_accuracy(out.images),
                         "kept_tokens_per_layer": [cache.lengths(layer).float().mean().item()
                                                   for layer in range(layout.depth)]})
            print(f"{pname:>12} {budget:>5}: kv {cache.kv_nbytes() / 2**20:7.2f} MiB, "
                  f"agree {agree / total:.3f}, PSNR {rows[-1]['psnr_db']:.2f} dB, {len(labels) / elapsed:.2f} img/s")
    return name, rows, labels, roles


def describe_roles(profile, layout) -> dict:
    """The classification the policies derive from the profile: ScaleKV drafters per scale, HACK contextual heads
    (the per-layer kept tokens of each run are in its row's ``kept_tokens_per_layer``)."""
    scalekv, hack = POLICIES["scalekv"](budget=0.1, profile=profile), POLICIES["hack"](budget=0.1, profile=profile)
    scalekv = scalekv.bind(layout)
    hack = hack.bind(layout)
    return {"profile_labels": profile.meta.get("labels"),
            "scalekv_drafters_per_scale": [sorted(d) for d in scalekv.drafters],
            "hack_contextual_heads_LH": hack.contextual.int().tolist()}


def arithmetic_table(budgets) -> list[dict]:
    """Cache bytes of VAR-d16/d30 (256 px) entering the last scale, from the configs and the policies' budgets.

    ScaleKV/HACK are given no profile here (uniform budgets: the same per-layer average by construction).
    Every head keeps ``min(tokens, cap)``, which is exactly what the selection rules keep.
    """
    rows = []
    for depth in (16, 30):
        config = VARConfig(depth=depth)
        layout = CacheLayout(config.depth, config.num_heads, config.width // config.num_heads, config.patch_nums)
        with torch.device("meta"):  # shows the shapes without allocating 2B parameters
            params = sum(p.numel() for p in VAR(config).parameters())
        carried = layout.full_carried
        for batch in (1, 64):
            seqs = 2 * batch  # CFG doubles the rows
            for budget in budgets:
                tokens = carried if budget >= 1 else layout.budget_tokens(budget)
                elems = depth * seqs * config.num_heads * tokens * layout.head_dim
                rows.append({"model": f"VAR-d{depth} ({params / 1e6:.0f}M params)", "batch": batch,
                             "budget": budget, "tokens_per_head": tokens,
                             "bf16_bytes": elems * 4, "fp32K_bf16V_bytes": elems * 6,
                             "full_peak_bf16_bytes": depth * seqs * config.num_heads * layout.seq_len
                             * layout.head_dim * 4})
    return rows


def gpu_kernel_table(device="cuda", configs=((16, 16, 256, (424, 212, 42)), (30, 16, 256, (424, 212, 42))),
                     dtype=torch.bfloat16, iters=20) -> list[dict]:
    """Triton ragged attention vs SDPA on the gathered dense tensors (CUDA; ``device="cpu"`` only under
    TRITON_INTERPRET=1 as a smoke check). Per-head prefix lengths are drawn in ``[kept/4, 7*kept/4]``."""
    import torch.nn.functional as F

    from var.kernels.ragged_attention import gather_prefix, ragged_attention

    rows = []
    dev = torch.device(device)
    for depth, batch, n, kept_list in configs:
        H, D = depth, 64
        seqs = 2 * batch
        for kept in kept_list:
            g = torch.Generator(device=dev).manual_seed(0)
            lens = torch.randint(max(1, kept // 4), kept * 7 // 4 + 1, (seqs * H,), generator=g, device=dev)
            lens = lens.to(torch.int32)
            start = (torch.cumsum(lens, 0) - lens).to(torch.int32)
            T = int(lens.sum())
            q, k, v = (torch.randn(seqs, H, n, D, device=dev, dtype=dtype) for _ in range(3))
            kp, vp = (torch.randn(T, D, device=dev, dtype=dtype) for _ in range(2))

            def triton_fn():
                return ragged_attention(q, kp, vp, start, lens, k, v, scale=1.0, backend="triton")

            def sdpa_fn():
                kg, vg, valid = gather_prefix(kp, vp, start, lens, seqs, H)
                mask = torch.cat((valid, valid.new_ones(seqs, H, n)), 2).unsqueeze(2)
                return F.scaled_dot_product_attention(q, torch.cat((kg, k), 2), torch.cat((vg, v), 2),
                                                      attn_mask=mask, scale=1.0)

            err = float((triton_fn().float() - sdpa_fn().float()).abs().max())
            times = {}
            for label, fn in (("triton_ms", triton_fn), ("gather_sdpa_ms", sdpa_fn)):
                for _ in range(3):
                    fn()
                sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
                sync()
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                sync()
                times[label] = (time.perf_counter() - t0) / iters * 1e3
            rows.append({"shape": f"d{depth}: {seqs} seqs x {H} heads, n={n}, mean kept {kept}", **times,
                         "max_abs_diff": err})
    return rows


def fmt_bytes(b) -> str:
    return "-" if b is None else f"{b / 2**20:.2f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def _acc(r) -> str:
    return "-" if r.get("class_accuracy") is None else f"{r['class_accuracy']:.3f}"


def to_markdown(meta, rows, arith, kernel_rows) -> str:
    lines = ["# KV-cache compression benchmark", "", f"Machine: {meta['machine']}", "",
             f"Model: {meta['model']}; {meta['images']} images (classes spread over the label range), cfg 1.5, "
             f"top-k 900, top-p 0.96, one generator per image seeded {meta['seed']}+i; fidelity vs the full cache "
             f"with the same seeds. Budgets: fraction of the tokens per head carried into the last scale; "
             f"ScaleKV/HACK use the calibration profile: {meta.get('profile', 'saved next to this file')}.",
             "", "| policy | budget | kept tokens/head | stored K/V | peak cache | peak GPU memory | images/s "
             "| token agreement | PSNR vs full (dB) | class accuracy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['budget']:.0%} | {r['kept_tokens_per_head']} | "
                     f"{fmt_bytes(r['stored_kv_bytes'])} | {fmt_bytes(r['peak_cache_bytes'])} | "
                     f"{fmt_bytes(r['peak_gpu_bytes'])} | {r['images_per_s']:.2f} | {r['token_agreement']:.3f} | "
                     f"{r['psnr_db']:.2f} | {_acc(r)} |")
    trained = "bundled" in str(meta.get("model"))
    roles = meta.get("roles") or {}
    lines += ["", "Stored K/V = the compressed cache carried into the last scale (the last scale's K/V is never "
              "stored); the full row is the preallocated cache for all tokens. Peak cache adds one layer's "
              "uncompressed scale during attention. "
              + ("Class accuracy: the bundled offline classifier on the decoded samples (the full row is the "
                 "model's own accuracy). " if trained else
                 "Random weights: the fidelity columns show the machinery works, they say nothing about trained "
                 "models. ")
              + "images/s on a shared, loaded CPU are noisy.", ""]
    if roles:
        lines += [f"Classification from the profile (calibration labels {roles.get('profile_labels')}): ScaleKV "
                  f"drafter layers per scale {roles.get('scalekv_drafters_per_scale')} (the role at scale k sets "
                  f"the cache carried into scale k); HACK contextual heads [layer][head] = "
                  f"{roles.get('hack_contextual_heads_LH')}.", ""]
    lines += ["## Cache-bytes arithmetic (entering the last scale, CFG = 2 rows per image)", "",
              "| model | batch | budget | tokens/head | bf16 K+V | fp32 K + bf16 V | full peak (680 tok, bf16) |",
              "|---|---|---|---|---|---|---|"]
    for r in arith:
        lines.append(f"| {r['model']} | {r['batch']} | {r['budget']:.0%} | {r['tokens_per_head']} | "
                     f"{fmt_bytes(r['bf16_bytes'])} | {fmt_bytes(r['fp32K_bf16V_bytes'])} | "
                     f"{fmt_bytes(r['full_peak_bf16_bytes'])} |")
    lines += ["", "## GPU kernel: Triton ragged attention vs SDPA on gathered dense tensors", ""]
    if kernel_rows:
        lines += ["| shape | Triton (ms) | gather + SDPA (ms) | max abs diff |", "|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['triton_ms']:.3f} | {r['gather_sdpa_ms']:.3f} | {r['max_abs_diff']:.2e} |"
                  for r in kernel_rows]
    else:
        lines.append("Not run: no CUDA device on this machine (the script runs it when one is present).")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``var-bench kv``."""
    parser.add_argument("--images", type=int, default=4, help="images per policy and budget (default 4)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1],
                        help="fractions of the cache carried into the last scale (default 1 0.5 0.25 0.1)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES),
                        help=f"compression policies (default: all of {', '.join(POLICIES)})")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--out-dir", default="benchmarks", help="folder of the .json/.md (default benchmarks)")
    parser.add_argument("--skip-fidelity", action="store_true", help="only the bytes arithmetic (and GPU kernels)")
    parser.add_argument("--profile", help="calibration profile JSON for ScaleKV/HACK, or 'bundled' for the one "
                                          "shipped with the bundled VAR (default: calibrate now)")
    parser.add_argument("--name", default="kv_cache", help="output file stem in --out-dir (default kv_cache)")
    parser.add_argument("--render", metavar="JSON", help="only re-render the markdown of a saved result file")


def run(args: argparse.Namespace) -> int:
    """``var-bench kv``: the fidelity and memory tables of the compression policies."""
    if args.render:
        data = json.loads(Path(args.render).read_text())
        md = to_markdown(data["meta"], data["policies"], data["arithmetic"], data["gpu_kernel"])
        Path(args.render).with_suffix(".md").write_text(md)
        print(md)
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine_description(), "images": args.images, "seed": args.seed, "device": str(device)}
    with torch.no_grad():
        model_name, rows, labels, roles = ("-", [], [], {}) if args.skip_fidelity else fidelity_table(args, device)
    meta["model"], meta["labels"], meta["roles"] = model_name, labels, roles
    meta["profile"] = args.profile or "calibrated by this run"
    arith = arithmetic_table(args.budgets)
    kernel_rows = gpu_kernel_table() if torch.cuda.is_available() else []
    md = to_markdown(meta, rows, arith, kernel_rows)
    print(md)
    out = Path(args.out_dir)
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "policies": rows, "arithmetic": arith,
                                                   "gpu_kernel": kernel_rows}, indent=1, default=str))
    (out / f"{args.name}.md").write_text(md)
    return 0

