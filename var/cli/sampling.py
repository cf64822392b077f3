"""What ``var-sample`` and ``var-eval sample`` share, all read from the sampler registry
(:mod:`var.samplers.registry`): the ``--sampler`` choice, one option per sampler knob, the settings they give the
chosen sampler (a flag it does not take is an error naming the flag), and the models it drives."""
from __future__ import annotations

import argparse
import logging
from collections import defaultdict

import torch

from var.errors import ConfigError
from var.samplers.registry import SAMPLERS, Knob, SamplerSpec, get_sampler

log = logging.getLogger("var.cli")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CLI_FAMILIES = {"var": "next_scale", "ar": "next_token"}  # --family -> registry family
DEFAULT_SAMPLER = {"next_scale": "next_scale", "next_token": "next_token"}
# the samplers a command line can drive: class-conditional ones (text-to-image samplers need prompt features)
CLI_SAMPLERS = {name: spec for name, spec in SAMPLERS.items() if spec.condition == "labels"}


def knob_flags(samplers: dict[str, SamplerSpec] = SAMPLERS) -> dict[str, list[tuple[SamplerSpec, Knob]]]:
    """CLI flag -> the (sampler, knob) pairs it sets, in registry order."""
    flags = defaultdict(list)
    for spec in samplers.values():
        for knob in spec.knobs:
            flags[knob.cli_flag].append((spec, knob))
    return dict(flags)


def _dest(flag: str) -> str:
    return "knob_" + flag.lstrip("-").replace("-", "_")


def _defaults_text(uses) -> str:
    """``16 (sjd, lantern, gsd); 32 (mcsjd)``: each sampler's own default, grouped by value."""
    groups = defaultdict(list)
    for spec, knob in uses:
        defaults = spec.defaults()
        groups[repr(defaults[knob.name]) if knob.name in defaults else "required"].append(spec.name)
    return "; ".join(f"{value} ({', '.join(names)})" for value, names in groups.items())


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def per_scale_type(kind):
    """An argparse type: ``3`` -> one value; ``4,4,3.5`` -> one value per scale (``kind`` each)."""
    def parse(text: str):
        values = [kind(v) for v in text.split(",")]
        return values[0] if len(values) == 1 else values
    parse.__name__ = kind.__name__
    return parse


def add_sampler_arguments(parser: argparse.ArgumentParser, *, sampler_default_help: str,
                          samplers: dict[str, SamplerSpec] = CLI_SAMPLERS) -> None:
    """``--sampler`` (one of ``samplers``) and one option per knob flag of theirs (absent unless given, so the
    sampler's own default applies), each with its allowed values, its default per sampler and the samplers that
    take it."""
    group = parser.add_argument_group(
        "sampler and its settings (each setting lists the samplers that take it, with their own defaults; a "
        "setting the chosen sampler does not take is an error)")
    lines = [f"{name} ({spec.family}, {'exact' if spec.exact else 'approximate'}): {spec.summary}"
             for name, spec in samplers.items()]
    group.add_argument("--sampler", choices=list(samplers), default=None, metavar="NAME",
                       help=f"{sampler_default_help}. Samplers: " + "; ".join(lines))
    for flag, uses in knob_flags(samplers).items():
        knob = uses[0][1]
        text = f"{knob.help}; {knob.describe()}; default {_defaults_text(uses)}"
        if flag == "--cfg":
            text += "; with a next-token sampler, a deprecated alias of --cfg-scale"
        kwargs = dict(dest=_dest(flag), default=argparse.SUPPRESS, help=text)
        if knob.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _optional(knob.kind) if knob.optional else per_scale_type(knob.kind) if knob.per_scale \
                else knob.kind
            kwargs["metavar"] = knob.kind.__name__.upper()
            if knob.choices:
                kwargs["choices"] = knob.choices
                kwargs.pop("metavar")
        group.add_argument(flag, **kwargs)


def resolve_sampler(name: str | None, family: str | None = None,
                    allowed: dict[str, SamplerSpec] = CLI_SAMPLERS) -> SamplerSpec:
    """The registered sampler ``name`` (default: the plain sampler of ``family``, a registry family name);
    :class:`ConfigError` when it belongs to another family or the command does not drive it."""
    if name is None:
        return get_sampler(DEFAULT_SAMPLER[family or "next_scale"])
    spec = get_sampler(name)
    if name not in allowed:
        raise ConfigError(f"sampler {name} samples from {spec.condition} (not class ids): call "
                          f"{spec.fn.__module__}.{spec.fn.__name__} from Python")
    if family is not None and spec.family != family:
        raise ConfigError(f"sampler {name} is a {spec.family} sampler, not {family}")
    return spec


def sampler_settings(spec: SamplerSpec, args: argparse.Namespace) -> dict:
    """The knob flags given on the command line, as validated settings of ``spec``."""
    given = {flag: getattr(args, _dest(flag)) for flag in knob_flags() if hasattr(args, _dest(flag))}
    if "--cfg" in given and "cfg" not in spec.knob_index and "cfg_scale" in spec.knob_index:
        if "--cfg-scale" in given:
            raise ConfigError("give --cfg-scale only: --cfg is its deprecated alias for next-token samplers")
        log.warning("--cfg with a next-token sampler is deprecated: use --cfg-scale (LlamaGen's scale, 1 = none)")
        given["--cfg-scale"] = given.pop("--cfg")
    flags = {k.cli_flag: k.name for k in spec.knobs}
    settings = {}
    for flag, value in given.items():
        if flag not in flags:
            raise ConfigError(f"{flag} is not a setting of sampler {spec.name}; its settings: "
                              f"{', '.join(flags) or 'none'}")
        settings[flags[flag]] = value
    return spec.check_settings(settings)


def effective_settings(spec: SamplerSpec, settings: dict) -> dict:
    """The sampler's defaults overridden by ``settings`` (what a run actually used, for its records)."""
    return {**spec.defaults(), **settings}


# ---- models ---------------------------------------------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser, title: str) -> None:
    """Checkpoint options of every sampler family; each is an error with a sampler that does not use it."""
    m = parser.add_argument_group(title)
    m.add_argument("--vae", help="VAR multi-scale tokenizer: vae_ch160v4096z32.pth, .safetensors or saved directory")
    m.add_argument("--var", help="VAR transformer: var_d16.pth ... var_d36.pth, .safetensors or saved directory")
    m.add_argument("--refiner", help="second VAR transformer, the refiner of --sampler collaborative (CoDe)")
    m.add_argument("--vq", help="next-token tokenizer: vq_ds16_c2i.pt, .safetensors or saved directory")
    m.add_argument("--gpt", help="next-token transformer: c2i_{B,L,XL,XXL,3B}_*.pt, .safetensors or saved "
                                 "directory (a saved NAR for --sampler nar; CTF stage 1 for coarse_to_fine)")
    m.add_argument("--stage2", help="saved CTF stage-2 directory (--sampler coarse_to_fine)")
    m.add_argument("--image-size", type=int, default=None,
                   help="next-token image size (384 for the *_384 GPTs; default: the tokenizer's)")
    m.add_argument("--random-init", action="store_true",
                   help="random weights of the tiny presets of the sampler's family: a smoke test, not images")


_USED_BY = {"--vae": ("next_scale",), "--var": ("next_scale",), "--refiner": ("collaborative",),
            "--vq": ("next_token",), "--gpt": ("next_token",), "--stage2": ("coarse_to_fine",),
            "--image-size": ("next_token",)}


def _check_model_flags(spec: SamplerSpec, args) -> None:
    for flag, users in _USED_BY.items():
        if getattr(args, flag.lstrip("-").replace("-", "_")) is not None and not (
                spec.name in users or spec.family in users):
            raise ConfigError(f"{flag} is not used by sampler {spec.name}")


def load_var_models(args):
    """``(tokenizer, model, description)``: --vae/--var, the bundled VAR model, or random tiny presets."""
    from var import hub
    from var.assets import bundled_var_dir
    from var.models import create
    if args.vae or args.var:
        if not (args.vae and args.var):
            raise ConfigError("give both --vae and --var")
        tok, model = hub.load_var(args.vae, args.var, device=args.device)
        return tok, model, f"{args.var}"
    bundled = bundled_var_dir()
    if bundled is not None and not args.random_init:
        tok, model = hub.load_var(bundled / "tokenizer", bundled / "transformer", device=args.device)
        return tok, model, f"bundled model {bundled.name}"
    log.warning("sampling from RANDOM weights (var_tiny): images are noise")
    torch.manual_seed(args.seed)
    tok, model = create("msvq_tiny").eval(), create("var_tiny").eval()
    return tok.to(args.device), model.to(args.device), "random-weight var_tiny"


def load_ar_models(args):
    """``(tokenizer, gpt, description)``: --vq/--gpt, the bundled AR model, or random tiny presets."""
    from var import hub
    from var.assets import bundled_ar_dir
    from var.models import create
    if args.vq or args.gpt:
        if not (args.vq and args.gpt):
            raise ConfigError("give both --vq and --gpt")
        vq, gpt = hub.load_llamagen(args.vq, args.gpt, image_size=args.image_size, device=args.device)
        return vq, gpt, f"{args.gpt}"
    bundled = bundled_ar_dir()
    if bundled is not None and not args.random_init:
        vq, gpt = hub.load_llamagen(bundled / "tokenizer", bundled / "transformer", device=args.device)
        return vq, gpt, f"bundled AR model {bundled.name}"
    if not args.random_init:
        raise ConfigError("no bundled AR model is installed: give --vq and --gpt (or --random-init for a smoke test)")
    torch.manual_seed(args.seed)
    return create("vq_tiny").eval().to(args.device), create("gpt_tiny").eval().to(args.device), "random-weight gpt_tiny"


def _saved_or_random(args, flag: str, preset: str):
    """A saved model directory given with ``flag``, else (with --random-init) the seeded tiny ``preset``."""
    from var import hub
    from var.models import create
    path = getattr(args, flag.lstrip("-").replace("-", "_"))
    if path:
        return hub.load_pretrained(path, device=args.device), str(path)
    if not args.random_init:
        raise ConfigError(f"give {flag} (a saved model directory) or --random-init")
    return create(preset).eval().to(args.device), f"random-weight {preset}"


def load_sampler_models(spec: SamplerSpec, args) -> tuple[dict, str]:
    """``(models by role, description)`` for ``spec`` from the checkpoint options; the registry then checks that
    each model is one the sampler can drive."""
    from var import hub
    from var.models import create
    _check_model_flags(spec, args)
    if spec.family == "next_scale":
        tok, model, desc = load_var_models(args)
        if spec.name != "collaborative":
            models = {"model": model, "tokenizer": tok}
        else:
            if args.refiner:
                refiner, rdesc = hub.load_var_transformer(args.refiner, device=args.device), args.refiner
            elif args.random_init:
                torch.manual_seed(args.seed + 1)
                refiner = create("var_tiny", depth=1, width=32, num_heads=2).eval().to(args.device)
                rdesc = "random-weight var_tiny d1"
            else:
                raise ConfigError("sampler collaborative needs a second model: --refiner")
            models, desc = {"drafter": model, "refiner": refiner, "tokenizer": tok}, f"{desc} + refiner {rdesc}"
    elif spec.name == "nar":
        torch.manual_seed(args.seed)
        model, desc = _saved_or_random(args, "--gpt", "nar_tiny")
        models = {"model": model, "tokenizer": _tokenizer_or_tiny(args)}
    elif spec.name == "coarse_to_fine":
        torch.manual_seed(args.seed)
        stage1, desc1 = _saved_or_random(args, "--gpt", "ctf_stage1_tiny")
        stage2, desc2 = _saved_or_random(args, "--stage2", "ctf_stage2_tiny")
        models, desc = {"stage1": stage1, "stage2": stage2, "tokenizer": _tokenizer_or_tiny(args)}, f"{desc1} + {desc2}"
    else:
        tok, model, desc = load_ar_models(args)
        models = {"model": model, "tokenizer": tok}
    spec.check_models(models)
    return models, desc


def _tokenizer_or_tiny(args):
    from var.hub import load_llamagen_vq
    from var.models import create
    if args.vq:
        return load_llamagen_vq(args.vq, image_size=args.image_size, device=args.device)
    if not args.random_init:
        raise ConfigError("give --vq: the tokenizer that decodes the sampled tokens")
    return create("vq_tiny").eval().to(args.device)


def num_classes_of(models: dict) -> int:
    """Class count of the sampler's (first) transformer."""
    return int(next(iter(models.values())).config.num_classes)


def autocast(device: str, dtype: str):
    """The transformer's autocast context for ``--dtype`` (fp32: none)."""
    import contextlib
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[dtype])


# ---- KV-cache policy ------------------------------------------------------------------------------------------
PROFILED_POLICIES = ("ScaleKV", "HACK")  # they classify layers / heads from a calibration profile of the model
CALIBRATION_CLASSES = 4  # classes (or prompts) of an on-the-fly calibration run


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cache``, ``--budget`` and ``--kv-profile`` (ScaleKV / HACK's calibration profile)."""
    from var.samplers.registry import cache_policies
    c = parser.add_argument_group("KV-cache policy")
    c.add_argument("--cache", choices=tuple(cache_policies()), default=None,
                   help="cache policy of samplers that take one (default: the full cache)")
    c.add_argument("--budget", type=float, default=None,
                   help="budget of a compression --cache: fraction of the cache kept (or a token count); required "
                        "with one, an error without")
    c.add_argument("--kv-profile", default=None, metavar="PATH|bundled|calibrate",
                   help="calibration profile of --cache ScaleKV/HACK: a profile JSON (written by var-eval "
                        "calibrate), 'bundled' (the shipped profile of the bundled VAR) or 'calibrate' (one "
                        f"full-cache run over {CALIBRATION_CLASSES} classes or prompts before sampling). Default: "
                        "'bundled' for the bundled VAR; any other model needs one (ScaleKV/HACK without a profile "
                        "would run uncalibrated)")
    c.add_argument("--kv-budgets", default=None, metavar="PATH",
                   help="a budget file of the ScaleKV release (budgets/2b_10%%_budget.json, 8b_10%%_...): --cache "
                        "ScaleKV then keeps the file's per-layer caps and drafters as they are, instead of a "
                        "profile's (e.g. --cache ScaleKV --budget 0.1 --kv-budgets 2b_10%%_budget.json)")


def check_cache_arguments(spec: SamplerSpec, args) -> None:
    """Cache flags that cannot work with ``spec``, before any model is loaded."""
    from var.samplers.registry import make_cache_policy
    make_cache_policy(args.cache, args.budget)  # unknown policy, budget without policy and the reverse
    if args.cache is not None and not spec.takes_cache:
        raise ConfigError(f"sampler {spec.name} takes no cache policy (--cache)")
    if args.kv_profile is not None and args.cache not in PROFILED_POLICIES:
        raise ConfigError(f"--kv-profile is the calibration profile of --cache {' or '.join(PROFILED_POLICIES)}, "
                          f"not of {args.cache or 'the full cache'}")
    if args.kv_budgets is not None:
        if args.cache != "ScaleKV":
            raise ConfigError(f"--kv-budgets is a budget file of ScaleKV's release: it needs --cache ScaleKV, not "
                              f"{args.cache or 'the full cache'}")
        if args.kv_profile is not None:
            raise ConfigError("--kv-budgets replaces the calibration profile: give --kv-profile or --kv-budgets")
    if args.cache in PROFILED_POLICIES and spec.name not in ("next_scale", "infinity"):
        raise ConfigError(f"--cache {args.cache} calibrates on one VAR or Infinity model; sampler {spec.name} is "
                          f"not supported from the command line (collaborative: give drafter_cache= / "
                          f"refiner_cache= policies from Python)")


def make_cache_from_arguments(spec: SamplerSpec, args, models: dict, desc: str, calibrate_on=None):
    """The cache policy of ``--cache/--budget/--kv-profile`` for the loaded ``models``; ScaleKV and HACK get a
    profile checked against the model (or a :class:`ConfigError` saying how to get one). ``calibrate_on``:
    ``fn() -> CalibrationProfile`` for ``--kv-profile calibrate`` (default: VAR's :func:`var.samplers.calibrate`
    over the first classes)."""
    from var.samplers.registry import make_cache_policy
    check_cache_arguments(spec, args)
    if args.cache not in PROFILED_POLICIES:
        return make_cache_policy(args.cache, args.budget)
    if args.kv_budgets is not None:
        from var.kernels.policies.scalekv import ReleasedBudgets
        budgets = ReleasedBudgets.load(args.kv_budgets)
        budgets.check_depth(models["model"].config.depth, f"--kv-budgets {args.kv_budgets}")  # now, not at a batch
        return make_cache_policy(args.cache, args.budget, released_budgets=budgets)
    return make_cache_policy(args.cache, args.budget, profile=_profile(spec, args, models, desc, calibrate_on))


def _profile(spec: SamplerSpec, args, models: dict, desc: str, calibrate_on):
    from var.kernels.policies.base import CacheLayout
    from var.kernels.policies.calibration import CalibrationProfile, bundled_profile
    source = args.kv_profile
    if source is None and desc.startswith("bundled model"):
        source = "bundled"
        log.info("--cache %s: the shipped calibration profile of the bundled VAR", args.cache)
    if source is None:
        raise ConfigError(f"--cache {args.cache} needs a calibration profile of this model: --kv-profile PATH "
                          f"(write one with 'var-eval calibrate'), or --kv-profile calibrate (calibrates before "
                          f"sampling)")
    if source == "calibrate":
        log.info("--cache %s: calibrating on %d classes/prompts (one full-cache run)", args.cache,
                 CALIBRATION_CLASSES)
        if calibrate_on is None:
            from var.samplers.calibration import calibrate
            model = models["model"]
            labels = torch.arange(min(CALIBRATION_CLASSES, model.config.num_classes), device=args.device)
            return calibrate(model, models["tokenizer"], labels, seed=args.seed)
        return calibrate_on()
    profile = bundled_profile() if source == "bundled" else CalibrationProfile.load(source)
    if spec.family == "next_scale":  # a profile of another model is a named error now, not at the first batch
        profile.check(CacheLayout.of(models["model"]))
    return profile


def calibrate_text_model(models: dict, text, settings: dict, seed: int):
    """``--kv-profile calibrate`` for Infinity: one full-cache run over ``text`` with the sampling run's settings
    (its schedule, guidance and temperatures)."""
    from var.samplers.infinity import calibrate_infinity
    return calibrate_infinity(models["model"], models["vae"], text, seed=seed, **settings)
