"""One speed / memory / quality table over model families, samplers and KV-cache policies.

A *setup* is a set of models by role (``{"model": var, "tokenizer": msvq}``, ``{"model": gpt, "tokenizer": vq}``,
``{"drafter", "refiner", "tokenizer"}``...) and a reference sampler (the exact, plain one of that family). Every
sampler of the registry (:mod:`var.samplers.registry`) runs, with its own defaults, on every setup whose models
it can drive; the reference sampler of a VAR setup also runs with every compression policy of the registry at
each budget. Per row:

* ``passes``: forward passes per sampler call (each image of the batch takes them all: the sequential steps);
* ``images_per_s`` at batch ``batch`` (best of ``timed_runs``); ``latency_s``: fastest of ``repeats`` batch-1
  calls (best-of timings resist other processes on a shared machine);
* ``peak_mem_bytes``: CUDA peak allocation, or on CPU the process's peak RSS during the timed run
  (``VmHWM`` after a reset; includes the model and Python, so compare rows, not absolute values);
* ``cache_bytes``: the sampler's peak KV-cache footprint for the batch;
* ``fd``: Frechet distance on offline features (:mod:`var.eval.features`) to the setup's reference images --
  the real offline dataset for trained (bundled) models, else the reference sampler's images drawn with another
  seed (so the reference row shows the noise floor of the estimate);
* ``fd_ci95`` / ``kid_ci95``: 95% intervals (:func:`var.eval.metrics.bootstrap_interval`,
  :func:`var.eval.metrics.kid_interval`); below ``MIN_RELIABLE_SAMPLES`` images the report carries a ``warning``.
* ``kid``: kernel distance (unbiased MMD^2, cubic kernel) on the same features and reference: unlike ``fd`` it
  has no small-sample bias (FD needs N >> feature dim), so it can come out negative; values near the reference
  row's are within noise, and its scale depends on the feature magnitudes;
* ``token_agreement``: share of tokens equal to the reference sampler's with the same seed and batches (1.0 for
  exact-replay paths such as a 100 % cache budget; low for samplers that draw randomness differently even when
  they are exact in distribution -- judge those by ``fd``);
* ``kv_live_bytes``: the peak K/V bytes holding live tokens (``cache_bytes`` is what was allocated);
* ``psnr_vs_full_db``: on compressed-cache rows, PSNR of the images vs the full cache's with the same seed (the
  ScaleKV/HACK papers' measure);
* ``nll``: on next-token setups, the mean per-token NLL of the sampled tokens under the model's processed
  distribution with the row's settings (CFG, top-k/p, temperature; teacher forced): exact samplers match the
  reference within noise;
* ``attr_acc``: on the bundled text-to-image GPT, the share of images whose colour and shape the bundled
  attribute classifier finds as the prompt names them.

Text-to-image setups take prompts (``prompts``, default: the bundled model's seen and held-out evaluation
prompts) that play the classes: image ``i`` answers prompt ``i % P``. They are the bundled text-to-image GPT (every
next-token sampler, conditioned as ``var-sample --prompt`` does) and a small random Infinity with a tiny random T5
built from a ``transformers`` config (no download; skipped without ``transformers``), whose reference sampler
also runs with every compression policy (ScaleKV and HACK calibrated on it).
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from var.errors import ConfigError
from var.samplers.registry import SAMPLERS, cache_policies, make_cache_policy
from var.utils.machine import load_average, machine_description

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """Models by role, ready to sample, with the reference sampler of their family."""

    name: str
    models: dict
    reference: str
    trained: bool
    num_classes: int
    compress: bool = False  # the reference sampler also runs with every compression policy
    per_sampler: dict = field(default_factory=dict)  # sampler name -> settings it needs here (CoDe's draft_steps)
    prompts: list | None = None  # text-to-image: the prompts that play the classes (num_classes = len(prompts))
    encode: Callable | None = None  # prompts -> the sampler's condition (captions, prompt embeddings)
    calibrate: Callable | None = None  # () -> ScaleKV/HACK calibration profile (default: VAR's calibrate)

    def settings_for(self, sampler: str) -> dict:
        return dict(self.per_sampler.get(sampler, {}))

    def condition(self, ids_B: torch.Tensor, device):
        """The sampler's condition of ids ``[B]``: class ids, or the encoded prompts ``i % P``."""
        if self.encode is None:
            return ids_B.to(device)
        return self.encode([self.prompts[i] for i in ids_B.tolist()])

    def fits(self, spec) -> bool:
        """True when ``spec`` drives exactly these models."""
        try:
            spec.check_models(self.models)
        except ConfigError:
            return False
        return True

    def to(self, device) -> "Setup":
        for v in self.models.values():
            if isinstance(v, torch.nn.Module):
                v.to(device)
        return self


def _num_classes(model) -> int:
    return int(model.config.num_classes)


def build_setups(device="cpu", *, models: tuple[str, ...] = (), seed: int = 0,
                 prompts: list[str] | None = None) -> list[Setup]:
    """The bundled VAR, AR and text-to-image models when installed, random-weight tiny presets of every family (a
    small Infinity with a tiny random T5 among them), and any extra random-weight VAR presets named in ``models``
    (e.g. ``var_d16`` on a GPU, for memory and speed). ``prompts``: those of the text-to-image setups."""
    from var.models import create
    if prompts is None:
        from var.eval.bench_t2i_bundled import evaluation_prompts
        prompts = [a.caption for group in evaluation_prompts() for a in group]
    setups = [s for s in (_bundled_var(), _bundled_ar(), _bundled_t2i(prompts, device)) if s is not None]

    def seeded(*presets, **overrides):
        torch.manual_seed(seed)
        return [create(p, **overrides).eval() for p in presets]

    def tiny(name: str, reference: str, compress: bool = False, **presets) -> Setup:
        """A random-weight setup: role -> preset name (``tokenizer="vq_tiny", model="gpt_tiny"``)."""
        models = dict(zip(presets, seeded(*presets.values())))
        num_classes = next(_num_classes(m) for role, m in models.items() if role != "tokenizer")
        return Setup(name, models, reference, False, num_classes, compress)

    setups.append(tiny("var_tiny (random)", "next_scale", True, tokenizer="msvq_tiny", model="var_tiny"))
    pair = tiny("var_tiny drafter + d1 refiner (random)", "next_scale", tokenizer="msvq_tiny", drafter="var_tiny")
    pair.models["refiner"] = create("var_tiny", depth=1, width=32, num_heads=2).eval()  # drawn after the drafter
    pair.per_sampler["collaborative"] = {"draft_steps": max(1, len(pair.models["drafter"].config.patch_nums) - 2)}
    setups.append(pair)
    setups.append(tiny("gpt_tiny (random)", "next_token", tokenizer="vq_tiny", model="gpt_tiny"))
    setups.append(tiny("nar_tiny (random)", "nar", tokenizer="vq_tiny", model="nar_tiny"))
    setups.append(tiny("ctf_tiny (random)", "coarse_to_fine", tokenizer="vq_tiny", stage1="ctf_stage1_tiny",
                       stage2="ctf_stage2_tiny"))
    infinity = _tiny_infinity(prompts, device, seed)
    if infinity is not None:
        setups.append(infinity)
    for preset in models:
        model, = seeded(preset)
        tok = create("msvq_var", patch_nums=tuple(model.config.patch_nums)).eval()
        setups.append(Setup(f"{preset} (random)", {"model": model, "tokenizer": tok}, "next_scale", False,
                            _num_classes(model), compress=True))
    return [s.to(device) for s in setups]


def _bundled_var() -> Setup | None:
    from var import hub
    from var.assets import bundled_var_dir
    path = bundled_var_dir()
    if path is None:
        return None
    tok, model = hub.load_var(path / "tokenizer", path / "transformer")
    return Setup(f"bundled VAR ({path.name})", {"model": model.eval(), "tokenizer": tok.eval()}, "next_scale", True,
                 _num_classes(model), compress=True)


def _bundled_ar() -> Setup | None:
    from var import hub
    from var.assets import bundled_ar_dir
    path = bundled_ar_dir()
    if path is None:
        return None
    vq, gpt = hub.load_pretrained(path / "tokenizer"), hub.load_pretrained(path / "transformer")
    return Setup(f"bundled AR ({path.name})", {"model": gpt.eval(), "tokenizer": vq.eval()}, "next_token", True,
                 _num_classes(gpt))


def _bundled_t2i(prompts: list[str], device) -> Setup | None:
    """The bundled text-to-image GPT, its prompts encoded by its caption encoder (as ``var-sample --prompt``)."""
    from var import hub
    from var.assets import bundled_t2i_dir
    path = bundled_t2i_dir()
    if path is None:
        return None
    vq, gpt, encoder = hub.load_t2i_bundle(path, device=device)
    caption_len = gpt.config.caption_len
    encoder.condition(prompts, caption_len)  # bad prompts fail before any timing
    return Setup(f"bundled text-to-image GPT ({path.name})", {"model": gpt.eval(), "tokenizer": vq.eval()},
                 "next_token", False, len(prompts), prompts=list(prompts),
                 encode=lambda batch: encoder.condition(batch, caption_len))


INFINITY_TINY = dict(depth=3, width=64, num_heads=4, codebook_dim=16, text_maxlen=32, pool_heads=2,
                     drop_path_rate=0.0)
INFINITY_TINY_VAE = dict(codebook_dim=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8)
INFINITY_TINY_PIXELS = "0.06M"  # 7 scales, 521 tokens; the VAE's stride 4 makes 64 px images


def _tiny_infinity(prompts: list[str], device, seed: int) -> Setup | None:
    """A random Infinity (3 blocks, width 64, d = 16 bits), a random stride-4 BSQ VAE and a tiny random T5 over
    the prompts' words (``transformers`` config, no download); None without ``transformers``."""
    from var.errors import MissingDependencyError
    from var.models.infinity import Infinity, InfinityConfig
    from var.models.text_encoder import random_t5_encoder
    from var.samplers.infinity import calibrate_infinity
    from var.tokenizers.bsq_vae import BSQVAE, BSQVAEConfig
    try:
        encoder = random_t5_encoder(sorted({w for p in prompts for w in p.lower().split()}), seed=seed, d_model=32,
                                    max_length=INFINITY_TINY["text_maxlen"])
    except MissingDependencyError as e:
        log.warning("no Infinity setup: %s", e)
        return None
    torch.manual_seed(seed)
    model = Infinity(InfinityConfig(**INFINITY_TINY, text_channels=32)).eval()
    model.init_weights(init_adaln_gamma=0.5, init_head=1.0)  # strong AdaLN/head: the bits depend on the context
    vae = BSQVAE(BSQVAEConfig(**INFINITY_TINY_VAE)).eval()
    encoder.model.to(device)
    models = {"model": model.to(device), "vae": vae.to(device)}
    encode = encoder.encode
    return Setup("infinity_tiny + tiny T5 (random)", models, "infinity", False, len(prompts), compress=True,
                 per_sampler={"infinity": {"pixels": INFINITY_TINY_PIXELS}}, prompts=list(prompts), encode=encode,
                 calibrate=lambda: calibrate_infinity(model, vae, encode(prompts[:4]), pixels=INFINITY_TINY_PIXELS,
                                                      seed=1234))


# ---- measurement ------------------------------------------------------------------------------------------------
def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:  # Linux: resets VmHWM to the current RSS
            f.write("5")
    except OSError:
        pass


def _peak(device) -> int | None:
    if str(device).startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    try:
        status = open("/proc/self/status").read()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def _flat_tokens(tokens) -> torch.Tensor:
    if isinstance(tokens, (list, tuple)):
        return torch.cat([t.reshape(t.shape[0], -1) for t in tokens], dim=1).cpu()
    return tokens.reshape(tokens.shape[0], -1).cpu()


@dataclass
class RunResult:
    images: torch.Tensor
    tokens: torch.Tensor | None
    passes: int
    cache_bytes: int
    seconds: float
    peak_mem: int | None
    live_bytes: int = 0
    extra: dict = field(default_factory=dict)


def run_batches(spec, setup: Setup, *, labels: torch.Tensor, batch: int, seed: int, cache_factory=None,
                device="cpu", compile: bool = False) -> RunResult:
    """Sample ``labels`` in batches with one generator seeded ``seed``; timed, with peak memory."""
    gen = torch.Generator(device=device).manual_seed(seed)
    images, tokens, passes, cache_bytes, live_bytes = [], [], 0, 0, 0
    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    for start in range(0, len(labels), batch):
        cache = cache_factory() if cache_factory else None
        out = spec(setup.models, setup.condition(labels[start:start + batch], device), generator=gen, cache=cache,
                   compile=compile and spec.takes_compile, **setup.settings_for(spec.name))
        images.append(out.images.float().cpu())
        tokens.append(_flat_tokens(out.tokens) if out.tokens is not None else None)
        passes = max(passes, out.stats.forward_passes)
        cache_bytes = max(cache_bytes, out.stats.peak_kv_cache_bytes)
        live_bytes = max(live_bytes, out.stats.peak_kv_live_bytes)
    _sync(device)
    seconds = time.perf_counter() - t0
    toks = torch.cat(tokens) if all(t is not None for t in tokens) else None
    return RunResult(torch.cat(images), toks, passes, cache_bytes, seconds, _peak(device), live_bytes)


def batch1_latency(spec, setup: Setup, *, repeats: int, seed: int, cache_factory=None, device="cpu",
                   compile: bool = False) -> float:
    """Fastest wall time of ``repeats`` single-image calls after one warm-up call (best-of: robust to other
    processes sharing the machine)."""
    times = []
    for r in range(repeats + 1):
        gen = torch.Generator(device=device).manual_seed(seed + r)
        label = setup.condition(torch.tensor([r % setup.num_classes]), device)
        cache = cache_factory() if cache_factory else None
        _sync(device)
        t0 = time.perf_counter()
        spec(setup.models, label, generator=gen, cache=cache, compile=compile and spec.takes_compile,
             **setup.settings_for(spec.name))
        _sync(device)
        if r > 0:
            times.append(time.perf_counter() - t0)
    return min(times)



def agreement(tokens: torch.Tensor | None, ref: torch.Tensor | None) -> float | None:
    if tokens is None or ref is None or tokens.shape != ref.shape:
        return None
    return float((tokens == ref).float().mean())


def nan_to_none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def reference_images(setup: Setup, ref_spec, *, labels, batch, seed, device, size: int) -> tuple[np.ndarray, str]:
    """Real offline-dataset images for a trained model, else the reference sampler's images with another seed."""
    if setup.trained:
        from var.train.data import ProceduralShapes
        data = ProceduralShapes(len(labels), image_size=size, seed=1)
        return np.stack([data.image_uint8(i) for i in range(len(labels))]), "offline dataset (ProceduralShapes seed 1)"
    run = run_batches(ref_spec, setup, labels=labels, batch=batch, seed=seed + 10_000, device=device)
    from var.utils.images import to_uint8_hwc
    return to_uint8_hwc(run.images), f"{setup.reference} sampler, seed {seed + 10_000}"


# ---- the table --------------------------------------------------------------------------------------------------
def assign(setups: list[Setup], only=None) -> tuple[list[tuple], list[dict]]:
    """(sampler spec, setup) for every registered sampler and every setup whose models it drives, and the
    samplers that fit none (with the reason)."""
    pairs, skipped = [], []
    for name, spec in SAMPLERS.items():
        if only and name not in only:
            continue
        fitting = [s for s in setups if s.fits(spec)]
        pairs += [(spec, s) for s in fitting]
        if not fitting:
            skipped.append({"sampler": name, "reason": f"no setup with the models it drives "
                                                       f"({', '.join(spec.model_roles)})"})
    return pairs, skipped


KV_PROFILES = ("calibrate", "bundled")


def _policy_factories(setup: Setup, budgets, device, only=None, kv_profile: str = "calibrate") -> list[tuple]:
    """(policy name, budget, factory) for every compression policy of the registry and budget on a VAR setup;
    ScaleKV and HACK get a calibration profile of the setup's model: calibrated on it, or with
    ``kv_profile="bundled"`` the shipped profile on the bundled VAR."""
    out, profile = [], None
    if kv_profile == "bundled" and setup.name.startswith("bundled VAR"):
        from var.kernels.policies.calibration import bundled_profile
        profile = bundled_profile()
    for name, cls in cache_policies().items():
        if name == "FullCache" or (only and name not in only):
            continue
        extra = {}
        if name in ("ScaleKV", "HACK"):
            if profile is None and setup.calibrate is not None:
                profile = setup.calibrate()
            elif profile is None:
                from var.samplers.calibration import calibrate
                labels = torch.arange(min(4, setup.num_classes), device=device)
                profile = calibrate(setup.models["model"], setup.models["tokenizer"], labels, seed=1234)
            extra["profile"] = profile
        for budget in budgets:
            make_cache_policy(name, budget, **extra)  # a bad budget fails here, before any timing
            out.append((name, budget, lambda name=name, budget=budget, extra=extra:
                        make_cache_policy(name, budget, **extra)))
    return out


def run_benchmark(*, device="cpu", num_images: int = 64, batch: int = 16, repeats: int = 3,
                  budgets=(0.5, 0.25, 0.1), seed: int = 0, models: tuple[str, ...] = (), extractor: str = "auto",
                  samplers: tuple[str, ...] = (), policies: tuple[str, ...] = (), timed_runs: int = 2,
                  families: tuple[str, ...] = (), compile: bool = False, kv_profile: str = "calibrate",
                  prompts: list[str] | None = None) -> dict:
    """Measure every (setup, sampler[, cache policy, budget]) row; returns the report dict (see module doc).
    ``compile``: samplers with a compiled path run it on the full cache (row column ``compiled``).
    ``kv_profile``: ScaleKV/HACK's profiles, ``"calibrate"`` (each VAR setup calibrated before its rows) or
    ``"bundled"`` (the shipped profile on the bundled VAR; the random-weight setups are still calibrated)."""
    if kv_profile not in KV_PROFILES:
        raise ConfigError(f"kv_profile must be one of {', '.join(KV_PROFILES)}, got {kv_profile!r}")
    from var.eval.attributes import bundled_attribute_classifier_dir, load_attribute_classifier, prompt_accuracy
    from var.eval.bench_ar import token_nll
    from var.eval.bench_kv import psnr
    from var.eval.features import extract_features, load_offline_extractor
    from var.eval.metrics import (MIN_RELIABLE_SAMPLES, _frechet_of_features, bootstrap_interval,
                                  frechet_distance_features, kid_interval)
    from var.models.gpt import GPT
    from var.models.gpt_t2i import GPTT2I
    from var.utils.images import to_uint8_hwc

    unknown = sorted(set(samplers) - set(SAMPLERS)) + sorted(set(policies) - set(cache_policies()))
    if unknown:
        raise ConfigError(f"unknown samplers or cache policies {unknown}; samplers: {', '.join(SAMPLERS)}; "
                          f"policies: {', '.join(cache_policies())}")
    setups = build_setups(device, models=models, seed=seed, prompts=prompts)
    if families:
        unknown = [f for f in families if not any(f in s.name for s in setups)]
        if unknown:  # a typo used to give an empty table with exit status 0
            raise ConfigError(f"--families {unknown} match no setup; available: {', '.join(s.name for s in setups)}")
        setups = [s for s in setups if any(f in s.name for f in families)]
    ext = load_offline_extractor(extractor, device=device)
    pairs, skipped = assign(setups, only=set(samplers) or None)
    rows, references = [], {}
    ref_cache: dict[str, tuple] = {}
    judge: dict = {}  # the attribute classifier, loaded once when a text-to-image GPT row needs it

    def setup_reference(setup: Setup):
        if setup.name not in ref_cache:
            labels = torch.arange(num_images) % setup.num_classes
            ref_spec = SAMPLERS[setup.reference]
            ref_run = run_batches(ref_spec, setup, labels=labels, batch=batch, seed=seed, device=device)
            size = ref_run.images.shape[-1]
            ref_imgs, desc = reference_images(setup, ref_spec, labels=labels, batch=batch, seed=seed,
                                              device=device, size=size)
            references[setup.name] = desc
            ref_cache[setup.name] = (labels, ref_run.tokens, extract_features(ext, ref_imgs), ref_run.images)
        return ref_cache[setup.name]

    def quality(spec, setup: Setup, labels, run: RunResult) -> dict:
        """The next-token NLL and the text-to-image attribute accuracy of a row (None where they do not apply)."""
        out = {"nll": None, "attr_acc": None}
        model = setup.models.get("model")
        if spec.family == "next_token" and isinstance(model, GPT) and run.tokens is not None:
            knobs = {**spec.defaults(), **setup.settings_for(spec.name)}
            nll = [token_nll(model, setup.condition(labels[i:i + batch], device), run.tokens[i:i + batch],
                             **{k: knobs[k] for k in ("cfg_scale", "temperature", "top_k", "top_p") if k in knobs})
                   * len(labels[i:i + batch]) for i in range(0, len(labels), batch)]
            out["nll"] = sum(nll) / len(labels)
        if isinstance(model, GPTT2I) and setup.prompts is not None and bundled_attribute_classifier_dir():
            if "clf" not in judge:
                judge["clf"] = load_attribute_classifier()
            out["attr_acc"] = prompt_accuracy(judge["clf"], run.images * 2 - 1,
                                              [setup.prompts[i] for i in labels.tolist()])
        return out

    def measure(spec, setup: Setup, cache_name="full", budget=None, factory=None):
        labels, ref_tokens, ref_feats, ref_images = setup_reference(setup)
        log.info("bench: %s | %s | %s %s", setup.name, spec.name, cache_name, budget if budget is not None else "")
        compiled = compile and spec.takes_compile and factory is None  # compressed caches have no compiled path
        latency = batch1_latency(spec, setup, repeats=repeats, seed=seed, cache_factory=factory, device=device,
                                 compile=compiled)
        runs = [run_batches(spec, setup, labels=labels, batch=batch, seed=seed, cache_factory=factory, device=device,
                            compile=compiled) for _ in range(max(1, timed_runs))]
        run = min(runs, key=lambda r: r.seconds)  # same seed: same images; best-of time
        run.peak_mem = max((r.peak_mem or 0) for r in runs) or None
        feats = extract_features(ext, to_uint8_hwc(run.images))
        kid, _, kid_ci = kid_interval(feats, ref_feats, num_subsets=50, subset_size=min(len(feats), 1000))
        rows.append({"family": setup.name, "sampler": spec.name, "cache": cache_name, "budget": budget,
                     "passes": run.passes, "images_per_s": len(labels) / run.seconds, "latency_s": latency,
                     "peak_mem_bytes": run.peak_mem, "cache_bytes": run.cache_bytes,
                     "fd": frechet_distance_features(feats, ref_feats),
                     "fd_ci95": bootstrap_interval(_frechet_of_features, feats, ref_feats, seed=seed),
                     "kid": kid, "kid_ci95": kid_ci,
                     "token_agreement": agreement(run.tokens, ref_tokens), "compiled": compiled,
                     "kv_live_bytes": run.live_bytes,
                     "psnr_vs_full_db": (psnr(run.images, ref_images) if cache_name != "full"
                                         and run.images.shape == ref_images.shape else None),
                     **quality(spec, setup, labels, run),
                     "is_reference": spec.name == setup.reference and cache_name == "full"})

    def attempt(what: str, *args):
        try:  # a row that fails is reported in the table's "skipped" list with its error, not dropped silently
            measure(*args)
            return True
        except Exception as e:
            skipped.append({"sampler": what, "reason": f"{type(e).__name__}: {e}"})
            return False

    for spec, setup in pairs:
        if not attempt(f"{spec.name} on {setup.name}", spec, setup):
            continue
        if setup.compress and spec.name == setup.reference and spec.takes_cache:
            for name, budget, factory in _policy_factories(setup, budgets, device, only=set(policies) or None,
                                                           kv_profile=kv_profile):
                attempt(f"{spec.name} + {name}({budget}) on {setup.name}", spec, setup, name, budget, factory)
    order = {s.name: i for i, s in enumerate(setups)}
    rows.sort(key=lambda r: (order.get(r["family"], 99), not r["is_reference"], r["sampler"], r["cache"] != "full",
                             r["cache"], -(r["budget"] or 0)))
    load = f"load average {load_average()} at the end"
    return {"machine": machine_description(device), "device": str(device), "load": load, "kv_profile": kv_profile,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "settings": {"num_images": num_images, "batch": batch, "repeats": repeats, "timed_runs": timed_runs,
                         "prompts": next((s.prompts for s in setups if s.prompts), None),
                         "budgets": list(budgets), "compile": compile,
                         "seed": seed,
                         "sampler_settings": {spec.name: {**spec.defaults(), **setup.settings_for(spec.name)}
                                              for spec, setup in pairs}},
            "evaluator": f"offline:{ext.name}", "references": references, "rows": rows, "skipped": skipped,
            "samplers": list(SAMPLERS), "policies": list(cache_policies()),
            **({"warning": f"{num_images} images per row (< {MIN_RELIABLE_SAMPLES}): fd/kid differences inside their "
                           "95% intervals are noise; do not rank rows on them"}
               if num_images < MIN_RELIABLE_SAMPLES else {})}
