"""One speed / memory / quality table over model families, samplers and KV-cache policies.

A *setup* is a model family with its components (``{"model": var, "tok": msvq}``, ``{"model": gpt, "vq": vq}``,
``{"drafter", "refiner", "tok"}``...) and a reference sampler (the exact, plain one of that family). Every
discovered sampler (:mod:`var.eval.discovery`) runs on the first setup that provides its arguments; samplers of
the VAR family also run with every discovered cache policy at each budget. Per row:

* ``passes``: forward passes per sampler call (each image of the batch takes them all: the sequential steps);
* ``images_per_s`` at batch ``batch`` (best of ``timed_runs``); ``latency_s``: fastest of ``repeats`` batch-1
  calls (best-of timings resist other processes on a shared machine);
* ``peak_mem_bytes``: CUDA peak allocation, or on CPU the process's peak RSS during the timed run
  (``VmHWM`` after a reset; includes the model and Python, so compare rows, not absolute values);
* ``cache_bytes``: the sampler's peak KV-cache footprint for the batch;
* ``fd``: Frechet distance on offline features (:mod:`var.eval.features`) to the setup's reference images --
  the real offline dataset for trained (bundled) models, else the reference sampler's images drawn with another
  seed (so the reference row shows the noise floor of the estimate);
* ``kid``: kernel distance (unbiased MMD^2, cubic kernel) on the same features and reference: unlike ``fd`` it
  has no small-sample bias (FD needs N >> feature dim), so it can come out negative; values near the reference
  row's are within noise, and its scale depends on the feature magnitudes;
* ``token_agreement``: share of tokens equal to the reference sampler's with the same seed and batches (1.0 for
  exact-replay paths such as a 100 % cache budget; low for samplers that draw randomness differently even when
  they are exact in distribution -- judge those by ``fd``).
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from var.errors import ConfigError
from var.utils.machine import load_average, machine_description as describe_machine

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """A model family ready to sample: its components, reference sampler and default settings."""

    name: str
    components: dict
    reference: str
    trained: bool
    settings: dict
    num_classes: int
    kind: str = "var"  # "var" setups also run the cache policies
    per_sampler: dict = field(default_factory=dict)  # sampler name -> settings that override ``settings``

    def settings_for(self, sampler: str) -> dict:
        return {**self.settings, **self.per_sampler.get(sampler, {})}

    def to(self, device) -> "Setup":
        for v in self.components.values():
            if isinstance(v, torch.nn.Module):
                v.to(device)
        return self


VAR_SETTINGS = {"cfg": 1.5, "top_k": 900, "top_p": 0.96, "temperature": 1.0}
AR_SETTINGS = {"cfg": 2.0, "cfg_scale": 2.0, "top_k": 0, "top_p": 0.0, "temperature": 1.0}


def _num_classes(model) -> int:
    return int(model.config.num_classes)


def _try(what: str, fn):
    try:
        return fn()
    except Exception as e:  # one family failing to build must not stop the others
        log.warning("setup %s unavailable: %s: %s", what, type(e).__name__, e)
        return None


def build_setups(device="cpu", *, models: tuple[str, ...] = (), seed: int = 0) -> list[Setup]:
    """The bundled VAR model when installed, random-weight tiny presets of every family, and any extra
    random-weight VAR presets named in ``models`` (e.g. ``var_d16`` on a GPU, for memory and speed)."""
    from var.models import create
    try:
        import var.models.nar_ctf_presets  # noqa: F401  (registers nar_* / ctf_*)
    except ImportError:
        pass
    setups = []
    for what, loader in (("bundled VAR", _bundled_var), ("bundled AR", _bundled_ar)):
        bundled = _try(what, loader)
        if bundled is not None:
            setups.append(bundled)

    def var_tiny():
        torch.manual_seed(seed)
        tok, model = create("msvq_tiny").eval(), create("var_tiny").eval()
        return Setup("var_tiny (random)", {"model": model, "tok": tok}, "next_scale", False, dict(VAR_SETTINGS),
                     _num_classes(model))

    def var_pair():
        torch.manual_seed(seed)
        tok, drafter = create("msvq_tiny").eval(), create("var_tiny").eval()
        refiner = create("var_tiny", depth=1, width=32, num_heads=2).eval()
        steps = max(1, len(drafter.config.patch_nums) - 2)
        return Setup("var_tiny drafter + d1 refiner (random)", {"drafter": drafter, "refiner": refiner, "tok": tok,
                                                                "model": drafter},
                     "next_scale", False, {**VAR_SETTINGS, "draft_steps": steps}, _num_classes(drafter), kind="pair")

    def gpt_tiny():
        torch.manual_seed(seed)
        vq, gpt = create("vq_tiny").eval(), create("gpt_tiny").eval()
        half_row = max(1, int(getattr(gpt.config, "grid_size", 2)) // 2)  # ZipAR's window must fit the grid width
        return Setup("gpt_tiny (random)", {"model": gpt, "vq": vq, "tok": vq}, "next_token", False,
                     dict(AR_SETTINGS), _num_classes(gpt), kind="ar", per_sampler={"zipar": {"window": half_row}})

    def nar_tiny():
        torch.manual_seed(seed)
        vq, nar = create("vq_tiny").eval(), create("nar_tiny").eval()
        return Setup("nar_tiny (random)", {"model": nar, "vq": vq, "tok": vq}, "nar", False, dict(AR_SETTINGS),
                     _num_classes(nar), kind="nar")

    def ctf_tiny():
        torch.manual_seed(seed)
        vq, s1, s2 = create("vq_tiny").eval(), create("ctf_stage1_tiny").eval(), create("ctf_stage2_tiny").eval()
        return Setup("ctf_tiny (random)", {"stage1": s1, "stage2": s2, "vq": vq, "tok": vq}, "coarse_to_fine",
                     False, dict(AR_SETTINGS), _num_classes(s1), kind="ctf")

    for name, fn in (("var_tiny", var_tiny), ("var pair", var_pair), ("gpt_tiny", gpt_tiny),
                     ("nar_tiny", nar_tiny), ("ctf_tiny", ctf_tiny)):
        s = _try(name, fn)
        if s is not None:
            setups.append(s)
    for preset in models:
        def big(preset=preset):
            torch.manual_seed(seed)
            model = create(preset).eval()
            tok = create("msvq_var", patch_nums=tuple(model.config.patch_nums)).eval()
            return Setup(f"{preset} (random)", {"model": model, "tok": tok}, "next_scale", False, dict(VAR_SETTINGS),
                         _num_classes(model))
        s = _try(preset, big)
        if s is not None:
            setups.append(s)
    return [s.to(device) for s in setups]


def _bundled_var() -> Setup | None:
    from var import hub
    from var.assets import bundled_var_dir
    path = bundled_var_dir()
    if path is None:
        return None
    tok, model = hub.load_var(path / "tokenizer", path / "transformer")
    return Setup(f"bundled VAR ({path.name})", {"model": model.eval(), "tok": tok.eval()}, "next_scale", True,
                 dict(VAR_SETTINGS), _num_classes(model))


def _bundled_ar() -> Setup | None:
    from var import hub
    try:
        from var.assets import bundled_ar_dir
    except ImportError:
        return None
    path = bundled_ar_dir()
    if path is None:
        return None
    vq, gpt = hub.load_pretrained(path / "tokenizer"), hub.load_pretrained(path / "transformer")
    half_row = max(1, int(getattr(gpt.config, "grid_size", 2)) // 2)
    return Setup(f"bundled AR ({path.name})", {"model": gpt.eval(), "vq": vq.eval(), "tok": vq.eval()}, "next_token",
                 True, dict(AR_SETTINGS), _num_classes(gpt), kind="ar", per_sampler={"zipar": {"window": half_row}})


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
    extra: dict = field(default_factory=dict)


def run_batches(entry, setup: Setup, *, labels: torch.Tensor, batch: int, seed: int, cache_factory=None,
                device="cpu") -> RunResult:
    """Sample ``labels`` in batches with one generator seeded ``seed``; timed, with peak memory."""
    from var.eval.discovery import call_sampler
    gen = torch.Generator(device=device).manual_seed(seed)
    images, tokens, passes, cache_bytes = [], [], 0, 0
    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    for start in range(0, len(labels), batch):
        cache = cache_factory() if cache_factory else None
        out = call_sampler(entry, setup.components, labels[start:start + batch].to(device), generator=gen,
                           cache=cache, **setup.settings_for(entry.name))
        images.append(out.images.float().cpu())
        tokens.append(_flat_tokens(out.tokens) if out.tokens is not None else None)
        passes = max(passes, out.stats.forward_passes)
        cache_bytes = max(cache_bytes, out.stats.peak_kv_cache_bytes)
    _sync(device)
    seconds = time.perf_counter() - t0
    toks = torch.cat(tokens) if all(t is not None for t in tokens) else None
    return RunResult(torch.cat(images), toks, passes, cache_bytes, seconds, _peak(device))


def batch1_latency(entry, setup: Setup, *, repeats: int, seed: int, cache_factory=None, device="cpu") -> float:
    """Fastest wall time of ``repeats`` single-image calls after one warm-up call (best-of: robust to other
    processes sharing the machine)."""
    from var.eval.discovery import call_sampler
    times = []
    for r in range(repeats + 1):
        gen = torch.Generator(device=device).manual_seed(seed + r)
        label = torch.tensor([r % setup.num_classes], device=device)
        cache = cache_factory() if cache_factory else None
        _sync(device)
        t0 = time.perf_counter()
        call_sampler(entry, setup.components, label, generator=gen, cache=cache, **setup.settings_for(entry.name))
        _sync(device)
        if r > 0:
            times.append(time.perf_counter() - t0)
    return min(times)


def machine_description(device) -> str:
    """CPU model and core count, or the GPU name; plus torch version."""
    return describe_machine(device)


def agreement(tokens: torch.Tensor | None, ref: torch.Tensor | None) -> float | None:
    if tokens is None or ref is None or tokens.shape != ref.shape:
        return None
    return float((tokens == ref).float().mean())


def nan_to_none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def reference_images(setup: Setup, entry_ref, *, labels, batch, seed, device, size: int) -> tuple[np.ndarray, str]:
    """Real offline-dataset images for a trained model, else the reference sampler's images with another seed."""
    if setup.trained:
        try:
            from var.train.data import ProceduralShapes
            data = ProceduralShapes(len(labels), image_size=size, seed=1)
            return np.stack([data.image_uint8(i) for i in range(len(labels))]), "offline dataset (ProceduralShapes seed 1)"
        except ImportError:
            pass
    run = run_batches(entry_ref, setup, labels=labels, batch=batch, seed=seed + 10_000, device=device)
    from var.utils.images import to_uint8_hwc
    return to_uint8_hwc(run.images), f"{setup.reference} sampler, seed {seed + 10_000}"


# ---- the table --------------------------------------------------------------------------------------------------
# which setup kinds a known sampler runs on; unknown (newly added) samplers try the kinds in UNKNOWN_ORDER
KNOWN_KINDS = {"next_scale": ("var",), "collaborative": ("pair",), "next_token": ("ar",), "nar": ("nar",),
               "coarse_to_fine": ("ctf",)}
UNKNOWN_ORDER = ("ar", "var", "nar", "ctf", "pair")


def _trial(entry, setup: Setup, device) -> str | None:
    """None when ``entry`` samples one image on ``setup``, else the reason it cannot."""
    from var.eval.discovery import probe_sampler
    settings = setup.settings_for(entry.name)
    missing = entry.missing_components(setup.components, settings)
    if missing:
        return f"needs {missing}"
    try:
        probe_sampler(entry, setup.components, torch.tensor([0], device=device), device=device, **settings)
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return None


def _assign(samplers: dict, setups: list[Setup], device, only=None) -> tuple[list[tuple], list[dict]]:
    """(sampler entry, setup) pairs to run, and the samplers skipped with their reasons."""
    pairs, skipped = [], []
    for name, entry in samplers.items():
        if only and name not in only:
            continue
        kinds = KNOWN_KINDS.get(name, UNKNOWN_ORDER)
        reasons, placed = [], False
        for kind in kinds:
            for setup in (s for s in setups if s.kind == kind):
                reason = _trial(entry, setup, device)
                if reason is None:
                    pairs.append((entry, setup))
                    placed = True
                else:
                    reasons.append(f"{setup.name}: {reason}")
            if placed and name not in KNOWN_KINDS:
                break  # a new sampler runs on the first family it fits
        if not placed:
            skipped.append({"sampler": name, "reason": "; ".join(reasons) or "no setup of its family was built"})
    return pairs, skipped


def _policy_factories(policies: dict, setup: Setup, budgets, device, only=None) -> tuple[list[tuple], list[dict]]:
    """(policy name, budget, factory) for every discovered compression policy and budget on a VAR setup."""
    out, skipped = [], []
    profile = None
    for name, pol in policies.items():
        if name == "FullCache" or (only and name not in only):
            continue
        extra = {}
        try:
            import inspect
            if "profile" in inspect.signature(pol.cls).parameters:
                if profile is None:
                    from var.samplers.calibration import calibrate
                    labels = torch.arange(min(4, setup.num_classes), device=device)
                    profile = calibrate(setup.components["model"], setup.components["tok"], labels, seed=1234)
                extra["profile"] = profile
            for budget in budgets:
                pol.make(budget, **extra)  # validate once
                out.append((name, budget, lambda pol=pol, budget=budget, extra=extra: pol.make(budget, **extra)))
        except Exception as e:
            skipped.append({"sampler": f"next_scale + {name}", "reason": f"{type(e).__name__}: {e}"})
    return out, skipped


def run_benchmark(*, device="cpu", num_images: int = 64, batch: int = 16, repeats: int = 3,
                  budgets=(0.5, 0.25, 0.1), seed: int = 0, models: tuple[str, ...] = (), extractor: str = "auto",
                  samplers: tuple[str, ...] = (), policies: tuple[str, ...] = (), timed_runs: int = 2,
                  families: tuple[str, ...] = ()) -> dict:
    """Measure every (setup, sampler[, cache policy, budget]) row; returns the report dict (see module doc)."""
    from var.eval.discovery import discover_cache_policies, discover_samplers
    from var.eval.features import extract_features, load_offline_extractor
    from var.eval.metrics import frechet_distance_features, kernel_distance
    from var.utils.images import to_uint8_hwc

    found_samplers, found_policies = discover_samplers(), discover_cache_policies()
    setups = build_setups(device, models=models, seed=seed)
    if families:
        unknown = [f for f in families if not any(f in s.name for s in setups)]
        if unknown:  # a typo used to give an empty table with exit status 0
            raise ConfigError(f"--families {unknown} match no setup; available: {', '.join(s.name for s in setups)}")
        setups = [s for s in setups if any(f in s.name for f in families)]
    ext = load_offline_extractor(extractor, device=device)
    pairs, skipped = _assign(found_samplers, setups, device, only=set(samplers) or None)
    rows, references = [], {}
    ref_cache: dict[str, tuple] = {}

    def setup_reference(setup: Setup):
        if setup.name not in ref_cache:
            labels = torch.arange(num_images) % setup.num_classes
            ref_entry = found_samplers[setup.reference]
            ref_run = run_batches(ref_entry, setup, labels=labels, batch=batch, seed=seed, device=device)
            size = ref_run.images.shape[-1]
            ref_imgs, desc = reference_images(setup, ref_entry, labels=labels, batch=batch, seed=seed,
                                              device=device, size=size)
            references[setup.name] = desc
            ref_cache[setup.name] = (labels, ref_run.tokens, extract_features(ext, ref_imgs))
        return ref_cache[setup.name]

    def measure(entry, setup: Setup, cache_name="full", budget=None, factory=None):
        labels, ref_tokens, ref_feats = setup_reference(setup)
        log.info("bench: %s | %s | %s %s", setup.name, entry.name, cache_name, budget if budget is not None else "")
        latency = batch1_latency(entry, setup, repeats=repeats, seed=seed, cache_factory=factory, device=device)
        runs = [run_batches(entry, setup, labels=labels, batch=batch, seed=seed, cache_factory=factory, device=device)
                for _ in range(max(1, timed_runs))]
        run = min(runs, key=lambda r: r.seconds)  # same seed: same images; best-of time
        run.peak_mem = max((r.peak_mem or 0) for r in runs) or None
        feats = extract_features(ext, to_uint8_hwc(run.images))
        rows.append({"family": setup.name, "sampler": entry.name, "cache": cache_name, "budget": budget,
                     "passes": run.passes, "images_per_s": len(labels) / run.seconds, "latency_s": latency,
                     "peak_mem_bytes": run.peak_mem, "cache_bytes": run.cache_bytes,
                     "fd": frechet_distance_features(feats, ref_feats),
                     "kid": kernel_distance(feats, ref_feats, num_subsets=50, subset_size=min(len(feats), 1000))[0],
                     "token_agreement": agreement(run.tokens, ref_tokens),
                     "is_reference": entry.name == setup.reference and cache_name == "full"})

    for entry, setup in pairs:
        try:
            measure(entry, setup)
        except Exception as e:
            skipped.append({"sampler": f"{entry.name} on {setup.name}", "reason": f"{type(e).__name__}: {e}"})
            continue
        if setup.kind == "var" and entry.name == setup.reference and entry.accepts("cache"):
            factories, pol_skipped = _policy_factories(found_policies, setup, budgets, device,
                                                       only=set(policies) or None)
            skipped += pol_skipped
            for name, budget, factory in factories:
                try:
                    measure(entry, setup, name, budget, factory)
                except Exception as e:
                    skipped.append({"sampler": f"{entry.name} + {name}({budget}) on {setup.name}",
                                    "reason": f"{type(e).__name__}: {e}"})
    order = {s.name: i for i, s in enumerate(setups)}
    rows.sort(key=lambda r: (order.get(r["family"], 99), not r["is_reference"], r["sampler"], r["cache"] != "full",
                             r["cache"], -(r["budget"] or 0)))
    load = f"load average {load_average()} at the end"
    return {"machine": machine_description(device), "device": str(device), "load": load,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "settings": {"num_images": num_images, "batch": batch, "repeats": repeats, "timed_runs": timed_runs,
                         "budgets": list(budgets),
                         "seed": seed,
                         "setups": {s.name: {**s.settings, "per_sampler": s.per_sampler} for s in setups}},
            "evaluator": f"offline:{ext.name}", "references": references, "rows": rows, "skipped": skipped,
            "samplers_found": sorted(found_samplers), "policies_found": sorted(found_policies)}
