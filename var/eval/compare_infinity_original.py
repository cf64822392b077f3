"""Check that this package's Infinity stack computes what the original FoundationVision/Infinity code computes.

``var-bench original-infinity --original /path/to/Infinity-checkout [--out FILE.json]``

The original is imported from ``--original`` (nothing of it is part of this repository; the checkout is on
``sys.path`` only while its package is imported). Its hard imports that are not needed on this path get
stand-ins made here: ``flash_attn`` (varlen cross-attention computed with
SDPA per sample), ``timm`` (DropPath, a no-op ``register_model``), ``pytz``/``imageio``/``torchvision`` (unused
modules), and the ``torch.compile``-d fused AdaLN layer norm is replaced by the same three operations uncompiled
(inductor needs a C++ toolchain). Both stacks run on CPU in fp32 with the same random weights, at small size:

(a) VAE (base width 128, ch_mult 1,1,1: stride 4, codebook d): the original's module state dict goes through
    :func:`convert_infinity_vae_state_dict` into :class:`BSQVAE` (strict); encoder latents, bit labels per scale,
    decoded images from the bits, and the teacher-forcing inputs (original ``BitwiseSelfCorrection.flip_requant``
    with no bit flips vs ``BSQVAE.teacher_forcing_input``);
(b) transformer (2 blocks in 2 chunks, width 128, 2 heads, 128-d text, released flags: shared AdaLN, 2-D RoPE
    normalised by the 1M grid, fused-norm path): converted with :func:`convert_infinity_state_dict` (strict);
    teacher-forced logits on the '0.06M' 1:1 schedule (7 scales, 521 tokens) for two prompts of different length;
(c) sampling: original ``autoregressive_infer_cfg`` (CFG on logits, per-scale cfg/tau) vs :func:`sample_infinity`
    with the same seed: sampled bits per scale and the decoded images.

The original computes cross-attention in bf16 whenever its inputs are fp32 (it casts before ``flash_attn``), so
logits agree to bf16 rounding, not to fp32 rounding. The ``*_bf16_cross_attention`` entries rerun ours with
q, k, v and the output of its cross-attention rounded to bf16 the same way (a patch of this comparison only,
undone afterwards), which isolates that rounding as the only difference.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from var import hub
from var.errors import ConfigError
from var.hub import infinity as hub_infinity
from var.models.infinity import Infinity
from var.samplers.infinity import sample_infinity
from var.tokenizers.bsq_vae import BSQVAE
from var.tokenizers.scale_schedules import dynamic_schedule
from var.utils.machine import cpu_model


# ---- stand-ins for the original's hard imports -------------------------------------------------------------------
def _varlen_kvpacked_sdpa(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                          softmax_scale=None, **_):
    """flash_attn_varlen_kvpacked_func computed per sample with SDPA: q [Nq, H, D], kv [Nk, 2, H, D]."""
    out = torch.empty_like(q)
    for b in range(len(cu_seqlens_q) - 1):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        qb = q[q0:q1].transpose(0, 1).float()
        kb, vb = kv[k0:k1].float().unbind(1)
        o = F.scaled_dot_product_attention(qb, kb.transpose(0, 1), vb.transpose(0, 1), scale=softmax_scale)
        out[q0:q1] = o.transpose(0, 1).to(q.dtype)
    return out


def _flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, **_):  # not reached (customized_flash_attn off)
    raise RuntimeError("flash_attn_func stand-in called")


def install_stand_ins():
    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    module("flash_attn", flash_attn_func=_flash_attn_func, flash_attn_varlen_kvpacked_func=_varlen_kvpacked_sdpa)

    class DropPath(nn.Module):
        def __init__(self, p=0.0):
            super().__init__()
            self.p = p

        def forward(self, x):
            return x

    module("timm")
    module("timm.models", register_model=lambda fn: fn)
    module("timm.models.layers", DropPath=DropPath, drop_path=lambda x, *a, **k: x)
    module("timm.loss", SoftTargetCrossEntropy=type("SoftTargetCrossEntropy", (nn.Module,), {}))
    for name in ("pytz", "imageio", "torchvision", "torchvision.transforms", "cv2", "wandb"):
        if name not in sys.modules:
            module(name)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]


def fused_ada_layer_norm_plain(C, eps, x, scale, shift):
    """The original's fused AdaLN layer norm, uncompiled."""
    x = F.layer_norm(x.float(), (C,), None, None, eps)
    return x.mul(scale.add(1)).add_(shift)


def import_original(repo: Path):
    """The original's transformer module, VAE factory and ``BitwiseSelfCorrection`` from a checkout."""
    if not (repo / "infinity" / "models" / "infinity.py").is_file():
        raise ConfigError(f"{repo} is not a checkout of FoundationVision/Infinity (no infinity/models/infinity.py)")
    if "infinity" in sys.modules:
        raise ConfigError("a module named 'infinity' is already imported: run the comparison in a fresh process")
    install_stand_ins()
    sys.path.insert(0, str(repo))  # the user-given checkout only, and only while its package is imported
    try:
        import infinity.models.infinity as orig_inf  # noqa: PLC0415  (the checkout's package)
        from infinity.models.bitwise_self_correction import BitwiseSelfCorrection  # noqa: PLC0415
        from infinity.models.bsq_vae.vae import vae_model  # noqa: PLC0415
    finally:
        sys.path.remove(str(repo))
    orig_inf.fused_ada_layer_norm = fused_ada_layer_norm_plain
    return orig_inf, vae_model, BitwiseSelfCorrection


def emulate_bf16_cross_attention(enabled: bool) -> None:
    """Round our cross-attention's q, k, v and output to bf16 like the original's cast before flash_attn
    (this comparison only, undone with ``enabled=False``: shows that the remaining differences are that rounding)."""
    import var.models.infinity_layers as layers  # noqa: PLC0415

    if not hasattr(layers, "_fp32_masked_cross_attention"):
        layers._fp32_masked_cross_attention = layers.masked_cross_attention
    fp32 = layers._fp32_masked_cross_attention

    def bf16(q, k, v, mask):
        r = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
        return r(fp32(r(q), r(k), r(v), mask))

    layers.masked_cross_attention = bf16 if enabled else fp32


def maxdiff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


# ---- (a) VAE ------------------------------------------------------------------------------------------------------
def compare_vae(vae_model, BitwiseSelfCorrection, schedule, d: int, seed: int, batch: int):
    torch.manual_seed(seed)
    orig = vae_model(None, schedule_mode="dynamic", codebook_dim=d, codebook_size=2 ** d, patch_size=4,
                     encoder_ch_mult=[1, 1, 1], decoder_ch_mult=[1, 1, 1]).eval()
    with torch.no_grad():
        for m in orig.modules():  # non-trivial GroupNorm affines (default init is 1 / 0)
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    sd = hub_infinity.convert_infinity_vae_state_dict(dict(orig.state_dict()))
    ours = hub.load_strict(BSQVAE(hub_infinity.bsq_vae_config_from_state_dict(sd)), sd, "original VAE").eval()

    H, W = schedule.grids[-1]
    img = torch.rand(batch, 3, 4 * H, 4 * W, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    sched3 = [(1, h, w) for h, w in schedule.grids]
    with torch.no_grad():
        h_orig, z_orig, _, bits_orig, _, _ = orig.encode(img, scale_schedule=sched3)
        lat = ours.encode_latent(img)
        bits_ours, summed = ours.quantize(lat, schedule)
        bits_orig = [b.reshape(batch, h, w, d).long() for b, (h, w) in zip(bits_orig, schedule.grids)]
        args = types.SimpleNamespace(noise_apply_layers=0, noise_apply_requant=0, noise_apply_strength=0.0,
                                     apply_spatial_patchify=0, debug_bsc=0)
        x_orig, _ = BitwiseSelfCorrection(orig, args).flip_requant(sched3, img, h_orig, "cpu")
        x_ours = ours.teacher_forcing_input(bits_ours, schedule)
        _, img_orig = orig.decode_from_indices([b.unsqueeze(1) for b in bits_orig], sched3, "bit_label")
        img_ours = ours.decode(bits_ours, schedule)
    report = {
        "latent_max_abs_diff": maxdiff(h_orig, lat),
        "summed_codes_max_abs_diff": maxdiff(z_orig, summed),
        "bits_equal_fraction": float(torch.cat([(a == b).flatten() for a, b in zip(bits_orig, bits_ours)])
                                     .float().mean()),
        "bits_identical": all(torch.equal(a, b) for a, b in zip(bits_orig, bits_ours)),
        "teacher_forcing_input_max_abs_diff": maxdiff(x_orig, x_ours),
        "decoded_image_max_abs_diff": maxdiff(img_orig, img_ours),
    }
    return orig, ours, img, bits_ours, report


# ---- (b) transformer ------------------------------------------------------------------------------------------
def build_transformers(orig_inf, orig_vae, seed: int, width=128, depth=2, heads=2, text_channels=128):
    torch.manual_seed(seed)
    orig = orig_inf.Infinity(
        orig_vae, text_channels=text_channels, text_maxlen=32, embed_dim=width, depth=depth, num_heads=heads,
        mlp_ratio=4.0, shared_aln=True, block_chunks=2, fused_norm=True, customized_flash_attn=False,
        pad_to_multiplier=128, use_flex_attn=False, add_lvl_embeding_only_first_block=1, use_bit_label=1,
        rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, pn="0.06M", apply_spatial_patchify=0,
        inference_mode=True, train_h_div_w_list=[1.0], cond_drop_rate=0.0, drop_path_rate=0.0,
        checkpointing=None).eval()
    with torch.no_grad():  # strong, non-trivial AdaLN and head weights: every path matters
        for name, p in orig.named_parameters():
            if "ada_gss" in name or "ada_lin" in name or name.startswith("head") or "scale_mul" in name:
                p.normal_(0, 0.3)
            elif p.ndim == 1:
                p.normal_(0, 0.1)
    sd, chunks = hub_infinity.convert_infinity_state_dict(dict(orig.state_dict()))
    config = hub_infinity.infinity_config_from_state_dict(sd, chunks)
    ours = hub.load_strict(Infinity(config), sd, "original Infinity").eval()
    return orig, ours


def text_inputs(batch: int, text_channels: int, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.tensor([7 - 3 * (b % 2) for b in range(batch)])
    n = int(lengths.max())
    feats = torch.randn(batch, n, text_channels, generator=g)
    mask = torch.arange(n) < lengths[:, None]
    feats = feats * mask[..., None]
    kv_compact = feats[mask]
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return feats, mask, (kv_compact, lengths, cu, n)


def compare_teacher_forced(orig, ours, vae, bits, schedule, text, batch):
    feats, mask, packed = text
    sched3 = [(1, h, w) for h, w in schedule.grids]
    x = vae.teacher_forcing_input(bits, schedule)
    with torch.no_grad():
        logits_orig = orig(tuple(t.clone() if torch.is_tensor(t) else t for t in packed), x, sched3)
        logits_ours = ours(ours.encode_text(feats, mask), x, schedule)
    rel = maxdiff(logits_orig, logits_ours) / float(logits_orig.abs().max())
    agree = ((logits_orig.view(batch, -1, 2).argmax(-1) == logits_ours.view(batch, -1, 2).argmax(-1))
             .float().mean())
    return {"logits_max_abs_diff": maxdiff(logits_orig, logits_ours), "logits_max_rel_diff": rel,
            "logits_max_abs": float(logits_orig.abs().max()), "argmax_bit_agreement": float(agree)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``var-bench original-infinity``."""
    parser.add_argument("--original", required=True, type=Path, help="checkout of FoundationVision/Infinity")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, images and draws (default 0)")
    parser.add_argument("--batch", type=int, default=2, help="images / prompts compared (default 2)")
    parser.add_argument("--bits", type=int, default=16, help="bits per token d of the VAE (default 16)")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")


@torch.no_grad()  # in-process callers (tests, var-bench) keep their grad mode
def run(args: argparse.Namespace) -> int:
    """``var-bench original-infinity``: our Infinity stack against the original code, same weights, same seed."""
    orig_inf, vae_model, BSC = import_original(args.original.resolve())
    schedule = dynamic_schedule(1.0, "0.06M")
    orig_vae, ours_vae, img, bits, report_vae = compare_vae(vae_model, BSC, schedule, args.bits, args.seed,
                                                            args.batch)
    orig, ours = build_transformers(orig_inf, orig_vae, args.seed)
    text = text_inputs(args.batch, 128, args.seed)
    commit = subprocess.run(["git", "-C", str(args.original), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    report = {"machine": f"{cpu_model()}, CPU, fp32, torch {torch.__version__}", "original_commit": commit,
              "sizes": {"vae": f"base width 128, ch_mult 1,1,1 (stride 4), d = {args.bits} bits",
                        "transformer": "2 blocks (2 chunks), width 128, 2 heads, 128-d text, 2 prompts",
                        "schedule": "'0.06M' 1:1 (7 scales, 521 tokens; 64 x 64 px with the stride-4 VAE)"},
              "vae": report_vae, "teacher_forced": compare_teacher_forced(orig, ours, ours_vae, bits, schedule,
                                                                          text, args.batch)}
    emulate_bf16_cross_attention(True)
    try:
        report["teacher_forced_bf16_cross_attention"] = compare_teacher_forced(orig, ours, ours_vae, bits,
                                                                               schedule, text, args.batch)
        report["sampling_bf16_cross_attention"] = compare_sampling(orig, ours, orig_vae, ours_vae, schedule, text,
                                                                   args)
    finally:
        emulate_bf16_cross_attention(False)
    report["sampling"] = compare_sampling(orig, ours, orig_vae, ours_vae, schedule, text, args)
    text_out = json.dumps(report, indent=2)
    print(text_out)
    if args.out:
        args.out.write_text(text_out + "\n")
    return 0


def compare_sampling(orig, ours, orig_vae, ours_vae, schedule, text, args):
    feats, mask, packed = text
    sched3 = [(1, h, w) for h, w in schedule.grids]
    n = schedule.num_scales
    cfg_list, tau_list = [3.0] * n, [0.5] * n
    lfq, recorded = orig_vae.quantizer.lfq, []
    to_codes = lfq.indices_to_codes

    def recording(indices, label_type="int_label", **kw):  # the original returns no bits: record them here
        recorded.append(indices.clone())
        return to_codes(indices, label_type, **kw)

    lfq.indices_to_codes = recording
    _, _, img_orig = orig.autoregressive_infer_cfg(
        vae=orig_vae, scale_schedule=sched3, label_B_or_BLT=tuple(t.clone() if torch.is_tensor(t) else t
                                                                  for t in packed),
        B=args.batch, g_seed=args.seed, cfg_list=cfg_list, tau_list=tau_list, top_k=0, top_p=0.0,
        cfg_insertion_layer=[0], vae_type=args.bits, returns_vemb=1, ret_img=True, inference_mode=True)
    g = torch.Generator().manual_seed(args.seed)
    out = sample_infinity(ours, ours_vae, (feats, mask), schedule=schedule, cfg_list=cfg_list, tau_list=tau_list,
                          top_k=0, top_p=0.0, generator=g)
    lfq.indices_to_codes = to_codes
    bits_orig = [b.reshape(args.batch, h, w, -1).long() for b, (h, w) in zip(recorded, schedule.grids)]
    per_scale = [float((a == b).float().mean()) for a, b in zip(bits_orig, out.tokens)]
    img_ours = out.images.mul(255).to(torch.uint8)  # ours RGB in [0, 1]; the original returns BGR uint8 BHWC
    img_orig_rgb = img_orig.flip(dims=(3,)).permute(0, 3, 1, 2)
    return {"bits_agreement_per_scale": per_scale, "bits_identical": all(x == 1.0 for x in per_scale),
            "image_max_abs_diff_uint8": maxdiff(img_orig_rgb, img_ours)}

