"""The one list of samplers: name -> function, family, the models it drives and its knobs.

Every command (``var-sample``, ``var-eval sample``, ``var-bench``) reads :data:`SAMPLERS`; nothing else lists
samplers. A knob is a setting a user may change, with its type and range; its default is the sampler function's
own keyword default (read from the signature here, never retyped). Settings a sampler does not take are an error
that names them, and so is a model it cannot drive.

Guidance follows each original's convention and name: next-scale samplers take VAR's ``cfg`` (``(1 + t) cond -
t uncond``, ramped to ``cfg`` at the last scale, 0 = none); next-token samplers take LlamaGen's ``cfg_scale``
(``uncond + s (cond - uncond)``, 1 = none); Infinity takes its release's per-scale ``cfg_list`` and ``tau_list``
(``cfg cond + (1 - cfg) uncond``, 1 = none).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from var.errors import ConfigError
from var.kernels import H2O, HACK, FullCache, ScaleKV, SnapKV, StreamingLLM
from var.kernels.policies import PyramidKV
from var.models.ctf import CTFStage2
from var.models.gpt import GPT
from var.models.nar import NAR
from var.models.var_model import VAR
from var.samplers.coarse_to_fine import sample_coarse_to_fine
from var.samplers.collaborative import PREFILL_MODES, sample_collaborative
from var.samplers.logits import TEMPERATURE_ORDERS
from var.models.infinity import Infinity
from var.samplers.infinity import sample_infinity
from var.samplers.jacobi import (DRAFT_INITS, LANTERN_CODES, LanternAcceptance, sample_gsd, sample_jacobi,
                                 sample_lantern, sample_mcsjd, sample_sjd)
from var.samplers.neighbor import ZIPAR_SCHEDULES, sample_zipar
from var.samplers.neighbor_nar import sample_nar
from var.samplers.next_scale import sample_next_scale, sample_scale
from var.samplers.next_token import sample_next_token
from var.tokenizers import MultiScaleVQVAE, SingleScaleVQ
from var.tokenizers.bsq_vae import BSQVAE
from var.tokenizers.scale_schedules import PIXEL_SCALES

FAMILIES = {
    "next_scale": "VAR next-scale prediction; guidance cfg (VAR: 0 = none)",
    "next_token": "next-token GPTs (LlamaGen) and their parallel decoders; guidance cfg_scale (LlamaGen: 1 = none)",
    "text_to_image": "Infinity: bitwise next-scale prediction from T5 prompt features; guidance cfg_list, one value "
                     "per scale (Infinity: 1 = none)",
}


# ---- knobs ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Knob:
    """One user-settable keyword of a sampler: its type, allowed values and the CLI flag that sets it."""

    name: str
    kind: type  # int, float, bool or str
    help: str
    choices: tuple = ()
    minimum: float | None = None  # inclusive bounds
    maximum: float | None = None
    above: float | None = None  # exclusive lower bound (temperature > 0)
    optional: bool = False  # None is allowed (the sampler's own rule applies)
    per_scale: bool = False  # one value per scale (a list) is allowed too
    flag: str = ""  # CLI flag; default ``--name-with-dashes``

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def describe(self) -> str:
        """The allowed values in words: ``int >= 1``, ``one of random, gumbel``, ``float in [0, 1]``..."""
        kind = self.kind.__name__
        if self.choices:
            text = "one of " + ", ".join(map(str, self.choices))
        elif self.minimum is not None and self.maximum is not None:
            text = f"{kind} in [{self.minimum:g}, {self.maximum:g}]"
        elif self.minimum is not None:
            text = f"{kind} >= {self.minimum:g}"
        elif self.above is not None:
            text = f"{kind} > {self.above:g}"
        elif self.maximum is not None:
            text = f"{kind} <= {self.maximum:g}"
        else:
            text = kind
        return text + (" or None" if self.optional else "") + (" (or one per scale)" if self.per_scale else "")

    def check(self, sampler: str, value: Any) -> Any:
        """``value`` converted to the knob's type, or :class:`ConfigError` naming the sampler and the knob."""
        if value is None:
            if self.optional:
                return None
            raise ConfigError(f"{sampler}: {self.name} must be {self.describe()}, got None")
        if self.per_scale and isinstance(value, (list, tuple)):
            return [self._check_one(sampler, v) for v in value]
        return self._check_one(sampler, value)

    def _check_one(self, sampler: str, value: Any) -> Any:
        bad = ConfigError(f"{sampler}: {self.name} must be {self.describe()}, got {value!r}")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise bad
            return value
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise bad
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if self.kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise bad
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise bad
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum) \
                or (self.above is not None and value <= self.above):
            raise bad
        return value

    def parse(self, text: str) -> Any:
        """A command-line string -> the knob's type (``none`` for optional knobs); range checks happen in
        :meth:`check`."""
        if self.optional and text.lower() == "none":
            return None
        if self.kind is bool:
            if text.lower() in ("1", "true", "yes"):
                return True
            if text.lower() in ("0", "false", "no"):
                return False
            raise ConfigError(f"{self.cli_flag} expects true/false, got {text!r}")
        try:
            return self.kind(text)
        except ValueError:
            raise ConfigError(f"{self.cli_flag} expects {self.describe()}, got {text!r}") from None


def _filtering(top_k_help: str) -> tuple[Knob, ...]:
    return (Knob("top_k", int, top_k_help, minimum=0),
            Knob("top_p", float, "top-p (nucleus) filtering; 0 or 1 = off", minimum=0, maximum=1),
            Knob("temperature", float, "softmax temperature", above=0))


NEXT_SCALE_KNOBS = (
    Knob("cfg", float, "VAR guidance (1 + t) cond - t uncond, t ramped from 0 to cfg over the scales; 0 = none",
         minimum=0),
    *_filtering("top-k filtering; 0 = off"),
    Knob("more_smooth", bool, "VAR's Gumbel-softmax smoothing of the codes (visualisation, not FID)"),
)
NEXT_TOKEN_KNOBS = (
    Knob("cfg_scale", float, "LlamaGen guidance uncond + s (cond - uncond); 1 = none", minimum=1),
    *_filtering("top-k filtering; 0 = off"),
)
CFG_INTERVAL = Knob("cfg_interval", int, "LlamaGen/NAR: guide only the first cfg-interval + 1 tokens (-1 = all)",
                    minimum=-1)
JACOBI_KNOBS = (
    CFG_INTERVAL,
    Knob("window", int, "Jacobi window: tokens drafted and verified per forward pass", minimum=1),
    Knob("init", str, "initial drafts of the Jacobi window", choices=DRAFT_INITS),
)
PER_SCALE = tuple(dataclasses.replace(k, per_scale=True) for k in NEXT_SCALE_KNOBS[:4])  # CoDe: lists per scale


# ---- models ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Role:
    """A positional model argument of a sampler and the classes it must be."""

    name: str
    classes: tuple[type, ...]
    excluded: tuple[type, ...] = ()  # subclasses it cannot drive (a NAR is a GPT with another head)
    optional: bool = False  # None allowed (a tokenizer: then no images are decoded)

    def check(self, sampler: str, obj) -> None:
        if obj is None and self.optional:
            return
        bare = getattr(obj, "_orig_mod", obj)  # torch.compile wrapper
        if not isinstance(bare, self.classes) or isinstance(bare, self.excluded):
            want = " or ".join(c.__name__ for c in self.classes)
            raise ConfigError(f"sampler {sampler} drives a {want} as {self.name}, got "
                              f"{type(bare).__name__ if obj is not None else None}")


VAR_ROLES = (Role("model", (VAR,)), Role("tokenizer", (MultiScaleVQVAE,)))
GPT_ROLES = (Role("model", (GPT,), excluded=(NAR,)), Role("tokenizer", (SingleScaleVQ,), optional=True))


# ---- samplers -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler. Call it as ``spec(models, labels_B, generator=..., **settings)``."""

    name: str
    fn: Callable
    family: str
    roles: tuple[Role, ...]
    knobs: tuple[Knob, ...]
    exact: bool
    summary: str
    reference: str = ""  # the exact sampler whose distribution this one has or approximates
    condition: str = "labels"  # what the argument after the models holds: class ids, or (text) prompt features
    knob_index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "knob_index", {k.name: k for k in self.knobs})
        params = inspect.signature(self.fn).parameters
        missing = [k.name for k in self.knobs if k.name not in params and not self._via_kwargs(params)]
        if missing or self.family not in FAMILIES:
            raise ConfigError(f"registry entry {self.name}: unknown family or knobs {missing} not in the signature")

    @staticmethod
    def _via_kwargs(params) -> bool:
        return any(p.kind is p.VAR_KEYWORD for p in params.values())

    @property
    def takes_cache(self) -> bool:
        """True when the sampler accepts a cache policy (``cache=``)."""
        return "cache" in inspect.signature(self.fn).parameters

    @property
    def takes_compile(self) -> bool:
        """True when the sampler has a compiled path (``compile=``, see :mod:`var.models.compiled`)."""
        fns = (self.fn, *([sample_jacobi] if self.fn in _JACOBI_WRAPPERS else []))
        return any("compile" in inspect.signature(fn).parameters for fn in fns)

    @property
    def model_roles(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.roles)

    def defaults(self) -> dict:
        """Each knob's default: the keyword default of the function (or of the engine it forwards to)."""
        out = {}
        for fn in (self.fn, *([sample_jacobi] if self.fn in _JACOBI_WRAPPERS else [])):
            for name, p in inspect.signature(fn).parameters.items():
                if name in self.knob_index and name not in out and p.default is not p.empty:
                    out[name] = p.default
        return out

    def required(self) -> list[str]:
        """Knobs without a default (the caller must set them, e.g. CoDe's ``draft_steps``)."""
        return [k for k in self.knob_index if k not in self.defaults()]

    def check_settings(self, settings: Mapping[str, Any]) -> dict:
        """Validated settings; unknown names and out-of-range values raise :class:`ConfigError` naming them."""
        unknown = sorted(set(settings) - set(self.knob_index))
        if unknown:
            hint = ""
            if "cfg" in unknown and "cfg_scale" in self.knob_index:
                hint = " (next-token samplers take LlamaGen's cfg_scale, 1 = none)"
            elif "cfg_scale" in unknown and "cfg" in self.knob_index:
                hint = " (next-scale samplers take VAR's cfg, 0 = none)"
            raise ConfigError(f"sampler {self.name} has no setting {', '.join(unknown)}{hint}; its settings: "
                              f"{', '.join(self.knob_index)}")
        out = {name: self.knob_index[name].check(self.name, v) for name, v in settings.items()}
        missing = [k for k in self.required() if k not in out]
        if missing:
            raise ConfigError(f"sampler {self.name} needs {', '.join(missing)}")
        return out

    def check_models(self, models: Mapping[str, Any]) -> None:
        """Raise :class:`ConfigError` unless ``models`` holds exactly this sampler's roles, of the right classes."""
        extra = sorted(set(models) - set(self.model_roles))
        absent = [r.name for r in self.roles if r.name not in models and not r.optional]
        if extra or absent:
            raise ConfigError(f"sampler {self.name} takes the models {', '.join(self.model_roles)}; "
                              f"missing {absent or 'none'}, not taken {extra or 'none'}")
        for role in self.roles:
            role.check(self.name, models.get(role.name))

    def __call__(self, models: Mapping[str, Any], labels_B, *, generator=None, cache=None, decode: bool = True,
                 compile=False, **settings):
        """Check the models and settings, then sample; returns the sampler's
        :class:`~var.samplers.stats.SampleOutput`. ``compile``: the sampler's compiled per-step forward (True, a
        ``torch.compile`` backend name or a :class:`~var.models.compiled.CompileSpec`; samplers without one raise)."""
        self.check_models(models)
        settings = self.check_settings(settings)
        extra = {}
        if cache is not None:
            if not self.takes_cache:
                raise ConfigError(f"sampler {self.name} takes no cache policy")
            extra["cache"] = cache
        if compile:
            if not self.takes_compile:
                raise ConfigError(f"sampler {self.name} has no compiled path; compile= is taken by "
                                  f"{', '.join(n for n, s in SAMPLERS.items() if s.takes_compile)}")
            extra["compile"] = compile
        return self.fn(*(models.get(r) for r in self.model_roles), labels_B, generator=generator, decode=decode,
                       **extra, **settings)


_JACOBI_WRAPPERS = (sample_sjd, sample_mcsjd, sample_lantern, sample_gsd)

_SPECS = (
    SamplerSpec("next_scale", sample_next_scale, "next_scale", VAR_ROLES, NEXT_SCALE_KNOBS, exact=True,
                summary="VAR: one forward pass per scale"),
    SamplerSpec("collaborative", sample_collaborative, "next_scale",
                (Role("drafter", (VAR,)), Role("refiner", (VAR,)), Role("tokenizer", (MultiScaleVQVAE,))),
                (Knob("draft_steps", int, "CoDe: scales sampled by the drafter; the refiner does the rest",
                      minimum=0),
                 *PER_SCALE, NEXT_SCALE_KNOBS[4],
                 Knob("temperature_order", str, "CoDe: divide by the temperature after top-k/top-p (the release) or "
                      "before (VAR, LlamaGen)", choices=TEMPERATURE_ORDERS),
                 Knob("prefill", str, "how the refiner rebuilds its cache from the drafted scales",
                      choices=PREFILL_MODES)),
                exact=False, reference="next_scale", summary="CoDe: a large drafter, a small refiner"),
    SamplerSpec("next_token", sample_next_token, "next_token", GPT_ROLES, NEXT_TOKEN_KNOBS + (CFG_INTERVAL,),
                exact=True,
                summary="LlamaGen: one forward pass per token"),
    SamplerSpec("sjd", sample_sjd, "next_token", GPT_ROLES, NEXT_TOKEN_KNOBS + JACOBI_KNOBS, exact=True,
                reference="next_token", summary="speculative Jacobi decoding"),
    SamplerSpec("mcsjd", sample_mcsjd, "next_token", GPT_ROLES,
                NEXT_TOKEN_KNOBS + JACOBI_KNOBS + (Knob("coupling", str, "MC-SJD draft coupling",
                                                        choices=("maximal", "gumbel")),),
                exact=True, reference="next_token", summary="MC-SJD: SJD with coupled drafts"),
    SamplerSpec("lantern", sample_lantern, "next_token", GPT_ROLES,
                NEXT_TOKEN_KNOBS + JACOBI_KNOBS + (
                    Knob("k", int, "LANTERN: latent neighbours per token", minimum=1, flag="--lantern-k"),
                    Knob("delta", float, "LANTERN: moved-mass bound per token (0 = SJD)", minimum=0, maximum=1,
                         flag="--lantern-delta"),
                    Knob("codes", str, "LANTERN: latent neighbours over the raw code table (the release) or the "
                         "L2-normalised codes", choices=LANTERN_CODES, flag="--lantern-codes"),
                    Knob("residual", str, "LANTERN: the release's residual or the relaxed one",
                         choices=LanternAcceptance.RESIDUALS, flag="--lantern-residual"),
                    Knob("one_hot_drafts", bool, "LANTERN: drafts recorded one-hot (keeps each token within TV "
                         "delta)", flag="--lantern-one-hot-drafts")),
                exact=False, reference="next_token", summary="SJD with relaxed acceptance over latent neighbours"),
    SamplerSpec("gsd", sample_gsd, "next_token", GPT_ROLES,
                NEXT_TOKEN_KNOBS + JACOBI_KNOBS + (
                    Knob("group_size", int, "GSD: rank window +-group // 2 (none = the release's 6 likelier / 7 "
                         "less likely tokens; 1 = SJD)", minimum=1, optional=True, flag="--gsd-group"),
                    Knob("prob_gap", float, "GSD: probability gap that ends a cluster", minimum=0, maximum=1,
                         flag="--gsd-prob-gap"),
                    Knob("embed_threshold", float, "GSD: embedding-similarity filter (none = off)", minimum=-1,
                         maximum=1, optional=True, flag="--gsd-embed-threshold")),
                exact=False, reference="next_token", summary="grouped speculative decoding"),
    SamplerSpec("zipar", sample_zipar, "next_token", GPT_ROLES,
                NEXT_TOKEN_KNOBS + (Knob("window", int, "ZipAR: decoded tokens of a row before the next row starts "
                                         "(none = half the grid width; the width = next-token)", minimum=1,
                                         optional=True, flag="--zipar-window"),
                                    Knob("schedule", str, "ZipAR: eager passes, or the release's own bookkeeping",
                                         choices=ZIPAR_SCHEDULES, flag="--zipar-schedule")),
                exact=False, reference="next_token", summary="ZipAR: rows decoded in parallel"),
    SamplerSpec("nar", sample_nar, "next_token",
                (Role("model", (NAR,)), Role("tokenizer", (SingleScaleVQ,), optional=True)),
                NEXT_TOKEN_KNOBS + (CFG_INTERVAL,),
                exact=True, summary="NAR: next-neighbour prediction, 2n - 1 passes for an n x n grid"),
    SamplerSpec("coarse_to_fine", sample_coarse_to_fine, "next_token",
                (Role("stage1", (GPT,), excluded=(NAR,)), Role("stage2", (CTFStage2,)),
                 Role("tokenizer", (SingleScaleVQ,), optional=True)),
                NEXT_TOKEN_KNOBS + (
                    Knob("stage2_cfg_scale", float, "CTF stage 2 guidance (1 = none)", minimum=1),
                    Knob("stage2_top_k", int, "CTF stage 2 top-k (0 = off)", minimum=0),
                    Knob("stage2_temperature", float, "CTF stage 2 temperature", above=0),
                    Knob("constrained", bool, "CTF: each fine code stays inside its coarse cluster")),
                exact=True, summary="CTF: coarse labels token by token, then all fine codes in one pass"),
    SamplerSpec("infinity", sample_infinity, "text_to_image", (Role("model", (Infinity,)), Role("vae", (BSQVAE,))),
                (Knob("cfg_list", float, "Infinity guidance per scale, cfg cond + (1 - cfg) uncond; 1 = none",
                      minimum=0, per_scale=True),
                 Knob("tau_list", float, "Infinity temperature per scale", above=0, per_scale=True),
                 Knob("top_k", int, "top-k over each bit's two logits; 0 = off", minimum=0),
                 Knob("top_p", float, "top-p over each bit's two logits; 0 or 1 = off", minimum=0, maximum=1),
                 Knob("gumbel", bool, "draw with the Gumbel-max trick"),
                 Knob("cfg_insertion_layer", int, "0: guidance on the logits; -k: on the hidden states after block "
                      "depth - k", maximum=0),
                 Knob("h_div_w", float, "aspect ratio of the dynamic schedule", above=0),
                 Knob("pixels", str, "image size of the dynamic schedule", choices=tuple(PIXEL_SCALES))),
                exact=True, condition="text", summary="Infinity: bitwise next-scale from text"),
)

SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in _SPECS}

# Public ``sample_*`` functions that are building blocks, not samplers a user picks by name.
ENGINES = {sample_jacobi: "the Jacobi engine behind sjd, mcsjd, lantern and gsd (takes an acceptance rule object)",
           sample_scale: "one VAR scale step, shared by next_scale and collaborative"}


def get_sampler(name: str) -> SamplerSpec:
    """The registered sampler ``name``; :class:`ConfigError` lists the names otherwise."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def samplers_of(family: str) -> list[str]:
    """Registered sampler names of one family, in registry order."""
    return [n for n, s in SAMPLERS.items() if s.family == family]


# ---- cache policies -------------------------------------------------------------------------------------------
def cache_policies() -> dict[str, type]:
    """Cache policies a sampler's ``cache=`` takes, by class name: ``FullCache`` (no compression) and the
    compression policies, which all take a ``budget`` (fraction of the cache kept, or a token count)."""
    return {"FullCache": FullCache, "ScaleKV": ScaleKV, "HACK": HACK, "SnapKV": SnapKV, "PyramidKV": PyramidKV,
            "H2O": H2O, "StreamingLLM": StreamingLLM}


def make_cache_policy(name: str | None, budget: float | None = None, **kwargs):
    """``cache_policies()[name](budget=budget, **kwargs)``; None for ``name=None``. A budget without a
    compression policy, or a compression policy without a budget, is an error."""
    if name is None:
        if budget is not None:
            raise ConfigError("a cache budget needs a compression policy (--cache ScaleKV, SnapKV, ...)")
        return None
    policies = cache_policies()
    if name not in policies:
        raise ConfigError(f"unknown cache policy {name!r}; choose one of {', '.join(policies)}")
    if name == "FullCache":
        if budget is not None:
            raise ConfigError("the full cache takes no budget")
        return policies[name]()
    if budget is None:
        raise ConfigError(f"cache policy {name} needs a budget (fraction of the cache kept, e.g. 0.1)")
    return policies[name](budget=budget, **kwargs)
