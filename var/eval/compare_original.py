"""Check that this package's VAR stack computes what the original FoundationVision/VAR code computes, and time both.

Usage::

    var-bench original --original /path/to/VAR-checkout [--depth 16] [--batch 2]

The original is imported from ``--original`` (its ``models`` package and ``dist.py``); nothing of it is part
of this repository. Both stacks run on CPU in fp32 with the same random weights: the original VQVAE + VAR are
built with the original builder, then their state dicts are loaded into ours with :func:`var.hub.load_strict`
(identical key sets, no renaming). Checks:

(a) tokenizer: indices per scale of the same images, teacher-forcing inputs, decoded images;
(b) teacher-forced logits: original ``VAR.forward`` (cond_drop_rate = 0) vs ``VAR.teacher_forcing_logits``;
(c) sampling: original ``autoregressive_infer_cfg`` vs :func:`sample_next_scale` with the same seed; per-scale
    guided logits, tokens and images;
(d) timing of full sampling incl. decode (interleaved runs, min of ``--runs`` after a warm-up), then ours at
    ``--big-batch``; written to ``benchmarks/var_vs_original.{md,json}``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn as nn

from var.errors import ConfigError
from var.hub import load_strict
from var.models.var_model import VAR, VARConfig
from var.samplers import next_scale as ours_sampler
from var.tokenizers.multiscale_vqvae import MultiScaleVQVAE, MultiScaleVQVAEConfig
from var.utils.machine import cpu_model, load_average

RESET_CLASSES = (nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d,
                 nn.ConvTranspose1d, nn.ConvTranspose2d)


# ---- importing the original -------------------------------------------------------------------------------------
def import_original(repo: Path):
    """Import the original ``models`` package from a checkout. Missing optional dependencies get stand-ins:
    ``huggingface_hub`` (only a mixin base class of an unused subclass) and ``dist`` (single-process CPU)."""
    if not (repo / "models" / "__init__.py").is_file():
        raise ConfigError(f"{repo} is not a checkout of FoundationVision/VAR (no models/__init__.py)")
    if "models" in sys.modules:
        raise ConfigError("a module named 'models' is already imported: run the comparison in a fresh process")
    if importlib.util.find_spec("huggingface_hub") is None:
        hub_mod = types.ModuleType("huggingface_hub")
        hub_mod.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = hub_mod
    sys.path.insert(0, str(repo))  # the user-given checkout only, and only while its package is imported
    try:
        if importlib.util.find_spec("dist") is None:
            dist_mod = types.ModuleType("dist")
            dist_mod.get_device = lambda: "cpu"
            dist_mod.initialized = lambda: False
            sys.modules["dist"] = dist_mod
        import models as orig_models  # noqa: PLC0415  (the checkout's package)
        import models.var as orig_var_module  # noqa: PLC0415
    finally:
        sys.path.remove(str(repo))
    return orig_models, orig_var_module


def build_original(orig_models, depth: int, seed: int, shared_aln: bool = False):
    """Original builder on CPU (flash/fused off). It disables ``reset_parameters`` globally while building; we
    restore it afterwards and give the VQVAE convolutions PyTorch's default init (the builder leaves them as
    uninitialised memory because released VAE weights are always loaded)."""
    saved = {cls: cls.reset_parameters for cls in RESET_CLASSES}
    torch.manual_seed(seed)
    try:
        with _quiet():
            vae, var = orig_models.build_vae_var(device="cpu", depth=depth, shared_aln=shared_aln,
                                                 flash_if_available=False, fused_if_available=False)
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn
    for m in vae.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    perturb_var(var, seed + 1)
    var.cond_drop_rate = 0.0
    return vae.eval(), var.eval()


@torch.no_grad()
def perturb_var(var: nn.Module, seed: int) -> None:
    """The builder's init makes every block nearly an identity (gamma rows x 1e-5, zero biases), which would
    hide block bugs. Add N(0, init_std) noise to all parameters and N(0, 0.5) to the AdaLN biases so attention,
    FFN, AdaLN scale/shift/gamma and the head all matter."""
    g = torch.Generator().manual_seed(seed)
    std = (1 / var.C / 3) ** 0.5
    for name, p in var.named_parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)
        if "ada_lin" in name and name.endswith("bias"):
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


class _quiet:
    """Silence the original constructor's prints."""

    def __enter__(self):
        self._stdout, sys.stdout = sys.stdout, open(os.devnull, "w")

    def __exit__(self, *exc):
        sys.stdout.close()
        sys.stdout = self._stdout


def build_ours(orig_vae, orig_var, depth: int, shared_aln: bool = False):
    tok = MultiScaleVQVAE(MultiScaleVQVAEConfig())
    model = VAR(VARConfig(depth=depth, shared_aln=shared_aln))
    load_strict(tok, orig_vae.state_dict(), "original VQVAE state dict")
    load_strict(model, orig_var.state_dict(), f"original VAR-d{depth} state dict")
    return tok.eval(), model.eval()


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---- (a) tokenizer ----------------------------------------------------------------------------------------------
@torch.no_grad()
def compare_tokenizer(orig_vae, tok, batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    # smooth random images (low-frequency noise upsampled) in [-1, 1]
    img = torch.nn.functional.interpolate(torch.rand(batch, 3, 32, 32, generator=g), size=256, mode="bicubic")
    img = (img * 2 - 1).clamp(-1, 1)
    f_orig = orig_vae.quant_conv(orig_vae.encoder(img))
    f_ours = tok.encode_latent(img)
    idx_orig = orig_vae.img_to_idxBl(img)
    idx_ours = tok.encode(img)
    per_scale = []
    for si, (a, b) in enumerate(zip(idx_orig, idx_ours)):
        per_scale.append(int((a.view(batch, -1) != b.view(batch, -1)).sum()))
    # decode the SAME (original) indices with both, so the decoder check is independent of encode agreement
    idx_ours_fmt = [a.view(batch, round(a.shape[1] ** 0.5), -1) for a in idx_orig]
    rec_orig = orig_vae.idxBl_to_img(idx_orig, same_shape=True, last_one=True)
    rec_ours = tok.decode(idx_ours_fmt)
    tf_orig = orig_vae.quantize.idxBl_to_var_input(idx_orig)
    tf_ours = tok.teacher_forcing_input(idx_ours_fmt)
    fhat_orig = orig_vae.quantize.embed_to_fhat(
        [orig_vae.quantize.embedding(a).transpose(1, 2).reshape(batch, 32, s.shape[1], s.shape[2])
         for a, s in zip(idx_orig, idx_ours_fmt)], all_to_max_scale=True, last_one=True)
    fhat_ours = tok.quantize.indices_to_fhat(idx_ours_fmt)
    return {
        "latent_max_abs_diff": max_abs(f_orig, f_ours),
        "index_mismatches_per_scale": per_scale,
        "index_total": sum(a.numel() for a in idx_orig),
        "f_hat_max_abs_diff": max_abs(fhat_orig, fhat_ours),
        "teacher_forcing_input_max_abs_diff": max_abs(tf_orig, tf_ours),
        "decode_max_abs_diff": max_abs(rec_orig, rec_ours),
        "idx_orig": idx_orig,
    }


# ---- (b) teacher-forced logits ----------------------------------------------------------------------------------
@torch.no_grad()
def compare_teacher_forcing(orig_vae, orig_var, tok, model, idx_orig, batch: int) -> dict:
    labels = torch.arange(batch) * 137 % 1000
    x_orig = orig_vae.quantize.idxBl_to_var_input(idx_orig)
    logits_orig = orig_var(labels, x_orig)
    idx_ours = [a.view(batch, round(a.shape[1] ** 0.5), -1) for a in idx_orig]
    logits_ours = model.teacher_forcing_logits(tok, labels, idx_ours)
    same_input = model(labels, x_orig)
    scale = logits_orig.abs().max().item()
    return {
        "logits_max_abs_diff": max_abs(logits_orig, logits_ours),
        "logits_max_abs_diff_same_input": max_abs(logits_orig, same_input),
        "logits_max_abs": scale,
        "argmax_agreement": (logits_orig.argmax(-1) == logits_ours.argmax(-1)).float().mean().item(),
    }


# ---- (c) sampling -----------------------------------------------------------------------------------------------
class _Recorder:
    """Wraps a function, keeping a copy of its first positional argument and of its result."""

    def __init__(self, fn, record_input=True):
        self.fn, self.inputs, self.outputs, self.record_input = fn, [], [], record_input

    def __call__(self, *args, **kwargs):
        if self.record_input:
            self.inputs.append(args[0].detach().clone())
        out = self.fn(*args, **kwargs)
        self.outputs.append(out.detach().clone())
        return out


def run_original(orig_var, labels, seed, cfg, top_k, top_p, more_smooth=False):
    return orig_var.autoregressive_infer_cfg(B=labels.shape[0], label_B=labels, g_seed=seed, cfg=cfg,
                                             top_k=top_k, top_p=top_p, more_smooth=more_smooth)


def run_ours(model, tok, labels, seed, cfg, top_k, top_p, more_smooth=False):
    gen = torch.Generator().manual_seed(seed)
    return ours_sampler.sample_next_scale(model, tok, labels, cfg=cfg, top_k=top_k, top_p=top_p, generator=gen,
                                          more_smooth=more_smooth)


@torch.no_grad()
def compare_sampling(orig_var_module, orig_var, tok, model, batch, seed, cfg, top_k, top_p,
                     more_smooth=False) -> dict:
    labels = torch.arange(batch) * 211 % 1000
    rec_orig = _Recorder(orig_var_module.sample_with_top_k_top_p_)
    rec_ours = _Recorder(ours_sampler.processed_logits)
    orig_var_module.sample_with_top_k_top_p_, ours_sampler.processed_logits = rec_orig, rec_ours
    try:
        img_orig = run_original(orig_var, labels, seed, cfg, top_k, top_p, more_smooth)
        out = run_ours(model, tok, labels, seed, cfg, top_k, top_p, more_smooth)
    finally:
        orig_var_module.sample_with_top_k_top_p_ = rec_orig.fn
        ours_sampler.processed_logits = rec_ours.fn
    tok_orig = [o[:, :, 0] for o in rec_orig.outputs]
    tok_ours = [t.view(batch, -1) for t in out.tokens]
    mismatches = [int((a != b).sum()) for a, b in zip(tok_orig, tok_ours)]
    first_div = next((si for si, m in enumerate(mismatches) if m), None)
    upto = len(mismatches) if first_div is None else first_div + 1  # logits comparable up to the first divergence
    logit_diffs = [max_abs(a, b) for a, b in zip(rec_orig.inputs[:upto], rec_ours.inputs[:upto])]
    return {
        "labels": labels.tolist(),
        "token_mismatches_per_scale": mismatches,
        "first_divergent_scale": first_div,
        "guided_logits_max_abs_diff_per_scale": logit_diffs,
        "image_max_abs_diff": max_abs(img_orig, out.images),
        "rng_draws": "one torch.multinomial over B*pn^2 rows per scale on the seeded CPU generator (both)",
    }


# ---- (d) timing -------------------------------------------------------------------------------------------------
def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def time_sampling(orig_var, tok, model, batch, big_batch, runs, seed, cfg, top_k, top_p, log) -> dict:
    labels = torch.arange(batch) * 211 % 1000
    orig_fn = lambda: run_original(orig_var, labels, seed, cfg, top_k, top_p)  # noqa: E731
    ours_fn = lambda: run_ours(model, tok, labels, seed, cfg, top_k, top_p)  # noqa: E731
    log(f"timing warm-up (batch {batch})")
    warm = {"original": _timed(orig_fn), "ours": _timed(ours_fn)}
    times = {"original": [], "ours": []}
    for r in range(runs):
        for name, fn in (("original", orig_fn), ("ours", ours_fn)):
            times[name].append(_timed(fn))
            log(f"  run {r}: {name} {times[name][-1]:.2f} s")
    res = {"batch": batch, "warmup_s": warm, "runs_s": times,
           "min_s": {k: min(v) for k, v in times.items()}}
    if big_batch:
        big_labels = torch.arange(big_batch) * 211 % 1000
        big_fn = lambda: run_ours(model, tok, big_labels, seed, cfg, top_k, top_p)  # noqa: E731
        big = [_timed(big_fn) for _ in range(runs)]
        log(f"  ours batch {big_batch}: {[round(t, 2) for t in big]}")
        res["ours_big_batch"] = {"batch": big_batch, "runs_s": big, "min_s": min(big)}
    return res


def machine_info() -> dict:
    cpu = cpu_model()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "note": f"Load average {load_average()} when the report was written (above the CPU count, other jobs "
                    f"shared the machine); min of interleaved runs reported"}


def markdown(report: dict) -> str:
    a, b, c, d, m = (report.get(k) for k in ("tokenizer", "teacher_forcing", "sampling", "timing", "machine"))
    lines = [f"# VAR vs original FoundationVision/VAR (depth {report['depth']}, fp32, CPU)", "",
             f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with "
             f"{m['torch_threads']} threads. {m['note']}.", "",
             "## Equivalence (same random weights, loaded with `load_strict`)", "",
             "| check | result |", "|---|---|"]
    if a:
        lines += [f"| encoder latent max abs diff | {a['latent_max_abs_diff']:.2e} |",
                  f"| index mismatches per scale | {a['index_mismatches_per_scale']} of {a['index_total']} |",
                  f"| f_hat from indices max abs diff | {a['f_hat_max_abs_diff']:.2e} |",
                  f"| teacher-forcing input max abs diff | {a['teacher_forcing_input_max_abs_diff']:.2e} |",
                  f"| decoded image max abs diff | {a['decode_max_abs_diff']:.2e} |"]
    if b:
        lines += [f"| teacher-forced logits max abs diff | {b['logits_max_abs_diff']:.2e} "
                  f"(max abs logit {b['logits_max_abs']:.2f}; argmax agreement {b['argmax_agreement']:.4f}) |"]
    if c:
        diffs = ", ".join(f"{x:.1e}" for x in c["guided_logits_max_abs_diff_per_scale"])
        lines += [f"| sampling token mismatches per scale | {c['token_mismatches_per_scale']} |",
                  f"| sampling guided logits max abs diff per scale | {diffs} |",
                  f"| sampled image max abs diff | {c['image_max_abs_diff']:.2e} |"]
    if d:
        t = d
        lines += ["", f"## Sampling time (cfg {report['cfg']}, top-k {report['top_k']}, top-p {report['top_p']}, "
                      f"incl. VQVAE decode)", "",
                  "| implementation | batch | min s / batch | images / s | runs (s) |", "|---|---|---|---|---|"]
        for name in ("original", "ours"):
            s = t["min_s"][name]
            runs = ", ".join(f"{x:.2f}" for x in t["runs_s"][name])
            lines.append(f"| {name} | {t['batch']} | {s:.2f} | {t['batch'] / s:.3f} | {runs} |")
        if "ours_big_batch" in t:
            bb = t["ours_big_batch"]
            runs = ", ".join(f"{x:.2f}" for x in bb["runs_s"])
            lines.append(f"| ours | {bb['batch']} | {bb['min_s']:.2f} | {bb['batch'] / bb['min_s']:.3f} | {runs} |")
        lines += ["", f"Speed-up ours vs original at batch {t['batch']}: "
                      f"{t['min_s']['original'] / t['min_s']['ours']:.2f}x"]
    lines += ["", "Command: `" + report["command"] + "`", ""]
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of ``var-bench original``."""
    ap.add_argument("--original", required=True, type=Path, help="checkout of FoundationVision/VAR (required)")
    ap.add_argument("--depth", type=int, default=16, help="VAR depth of both stacks (default 16)")
    ap.add_argument("--batch", type=int, default=2, help="images compared and timed (default 2)")
    ap.add_argument("--big-batch", type=int, default=8, help="extra timing of ours at this batch (0: skip) (default 8)")
    ap.add_argument("--runs", type=int, default=2, help="timed runs per implementation after one warm-up (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights, images and draws (default 0)")
    ap.add_argument("--cfg", type=float, default=1.5, help="VAR guidance (default 1.5)")
    ap.add_argument("--top-k", type=int, default=900, help="top-k (default 900)")
    ap.add_argument("--top-p", type=float, default=0.96, help="top-p (default 0.96)")
    ap.add_argument("--shared-aln", action="store_true", help="shared-AdaLN variant (as in VAR-d36-s)")
    ap.add_argument("--more-smooth", action="store_true", help="also compare VAR's Gumbel-smoothed sampling")
    ap.add_argument("--skip-timing", action="store_true", help="only the numerical comparison")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/var_vs_original"),
                    help="output prefix: writes <out>.md and <out>.json (with --skip-timing nothing is written) "
                         "(default benchmarks/var_vs_original)")


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """``var-bench original``: our VAR stack against the original code, same weights, same seed."""
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    orig_models, orig_var_module = import_original(args.original.resolve())
    orig_vae, orig_var = build_original(orig_models, args.depth, args.seed, args.shared_aln)
    tok, model = build_ours(orig_vae, orig_var, args.depth, args.shared_aln)
    log(f"built original + ours (depth {args.depth}); state dicts loaded strictly into ours")
    report = {"depth": args.depth, "shared_aln": args.shared_aln, "batch": args.batch, "cfg": args.cfg,
              "top_k": args.top_k, "top_p": args.top_p,
              "command": "var-bench original " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info()}

    a = compare_tokenizer(orig_vae, tok, args.batch, args.seed)
    idx_orig = a.pop("idx_orig")
    report["tokenizer"] = a
    log(f"(a) tokenizer: {json.dumps(a)}")
    report["teacher_forcing"] = compare_teacher_forcing(orig_vae, orig_var, tok, model, idx_orig, args.batch)
    log(f"(b) teacher forcing: {json.dumps(report['teacher_forcing'])}")
    report["sampling"] = compare_sampling(orig_var_module, orig_var, tok, model, args.batch, args.seed,
                                          args.cfg, args.top_k, args.top_p, args.more_smooth)
    log(f"(c) sampling: {json.dumps(report['sampling'])}")
    if not args.skip_timing:
        report["timing"] = time_sampling(orig_var, tok, model, args.batch, args.big_batch, args.runs, args.seed,
                                         args.cfg, args.top_k, args.top_p, log)
        md = markdown(report)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(md)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        log(md)
    return 0

