"""Find, at run time, the samplers and KV-cache policies that this installation provides, and call them uniformly.

Samplers live in ``var.samplers.<module>`` as public ``sample_*`` functions; policies live in
``var.kernels.policies`` (and ``var.kernels``) as classes with a ``new_cache`` method. Modules that fail to import
(half-written, missing optional dependencies) are skipped with a log line, never fatal: evaluation and
benchmarks include whatever works.

:func:`call_sampler` binds a sampler's model arguments by name from a dict of components (``model``, ``tok`` /
``vq``, ``drafter``, ``refiner``, ...) and passes only the keyword settings its signature accepts, so one settings
dict (``cfg``, ``top_k``, ``top_p``, ``temperature``, ``window``, ...) can drive different samplers.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

PAIR_PARAMS = ("drafter", "refiner")
CALL_PARAMS = ("labels_B", "generator", "cache")  # supplied by call_sampler itself


@dataclass
class SamplerEntry:
    """A discovered sampler: ``name`` (function name without ``sample_``), its module and function."""

    name: str
    module: str
    fn: Callable
    params: tuple[str, ...] = field(default=())
    rejected: set = field(default_factory=set)  # settings its **kwargs turned out not to take (see call_sampler)

    @property
    def needs_pair(self) -> bool:
        """True for two-model samplers (drafter + refiner, e.g. CoDe)."""
        return all(p in self.params for p in PAIR_PARAMS)

    def accepts(self, key: str) -> bool:
        if key in self.rejected:
            return False
        sig = inspect.signature(self.fn)
        return key in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())

    def required_components(self) -> list[str]:
        """Parameters without a default that the caller must supply as components (models, tokenizer...)."""
        return [n for n, p in inspect.signature(self.fn).parameters.items()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                and n not in CALL_PARAMS]

    def missing_components(self, components: dict, settings: dict | None = None) -> list[str]:
        """Required arguments found neither in ``components`` nor in ``settings``."""
        return [n for n in self.required_components() if n not in components and n not in (settings or {})]


def _import(name: str):
    try:
        return importlib.import_module(name)
    except Exception as e:  # a module being written by someone else must not break evaluation
        log.info("skipping %s: %s: %s", name, type(e).__name__, e)
        return None


def discover_samplers() -> dict[str, SamplerEntry]:
    """Every public ``sample_*`` function defined in a module of ``var.samplers``."""
    import var.samplers as pkg
    found = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in ("logits", "stats"):
            continue
        mod = _import(f"{pkg.__name__}.{info.name}")
        if mod is None:
            continue
        for attr, fn in vars(mod).items():
            if attr.startswith("sample_") and inspect.isfunction(fn) and fn.__module__ == mod.__name__:
                params = tuple(inspect.signature(fn).parameters)
                found[attr[len("sample_"):]] = SamplerEntry(attr[len("sample_"):], mod.__name__, fn, params)
    return found


@dataclass
class PolicyEntry:
    """A discovered cache policy class and the keyword that sets its budget (if any)."""

    name: str
    cls: type
    budget_arg: str | None

    def make(self, budget: float | None = None, **kwargs):
        if budget is not None and self.budget_arg:
            kwargs[self.budget_arg] = budget
        return self.cls(**kwargs)


def _budget_arg(cls) -> str | None:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return None
    for name in ("budget", "keep_ratio", "ratio", "window"):
        if name in params:
            return name
    return None


def discover_cache_policies() -> dict[str, PolicyEntry]:
    """Classes with a ``new_cache`` method from ``var.kernels.kv_cache`` and every ``var.kernels.policies`` module."""
    modules = [m for m in (_import("var.kernels.kv_cache"),) if m is not None]
    pkg = _import("var.kernels.policies")
    if pkg is not None:
        modules.append(pkg)
        if hasattr(pkg, "__path__"):
            for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
                if not info.name.startswith("_"):
                    mod = _import(f"{pkg.__name__}.{info.name}")
                    if mod is not None:
                        modules.append(mod)
    found = {}
    for mod in modules:
        for attr, obj in vars(mod).items():
            if (inspect.isclass(obj) and not attr.startswith("_") and callable(getattr(obj, "new_cache", None))
                    and not inspect.isabstract(obj) and obj.__module__.startswith("var.")):
                found.setdefault(attr, PolicyEntry(attr, obj, _budget_arg(obj)))
    # a base class of other discovered policies is an interface, not a policy
    bases = {n for n, e in found.items() for o in found.values() if o.cls is not e.cls and issubclass(o.cls, e.cls)}
    return {n: e for n, e in found.items() if n not in bases}


def call_sampler(entry: SamplerEntry, components: dict, labels_B, *, generator, cache=None, **settings):
    """Run ``entry`` with its model arguments taken by name from ``components`` (``{"model": m, "tok": t,
    "vq": t, ...}``) and the ``settings`` its signature accepts; returns its
    :class:`~var.samplers.stats.SampleOutput`."""
    from var.errors import ConfigError
    missing = entry.missing_components(components, settings)
    if missing:
        raise ConfigError(f"sampler {entry.name} needs {missing}; this setup provides {sorted(components)}")
    params = inspect.signature(entry.fn).parameters
    kwargs = {n: components[n] for n in params if n in components and n not in CALL_PARAMS}
    kwargs.update({k: v for k, v in settings.items() if entry.accepts(k) and k not in kwargs})
    dropped = sorted(set(settings) - set(kwargs))
    if dropped:
        log.debug("%s ignores %s", entry.name, dropped)
    if cache is not None:
        if not entry.accepts("cache"):
            raise ConfigError(f"sampler {entry.name} takes no cache policy")
        kwargs["cache"] = cache
    return entry.fn(labels_B=labels_B, generator=generator, **kwargs)


_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


def probe_sampler(entry: SamplerEntry, components: dict, labels_B, *, device="cpu", cache=None, **settings):
    """Sample ``labels_B`` once with a throw-away generator to learn which settings a ``**kwargs`` sampler
    rejects (recorded in ``entry.rejected``, so later :func:`call_sampler` calls omit them). Raises what the
    sampler raises for any other reason."""
    import torch
    for _ in range(len(settings) + 1):
        try:
            return call_sampler(entry, components, labels_B, generator=torch.Generator(device=device).manual_seed(0),
                                cache=cache, **settings)
        except TypeError as e:
            m = _UNEXPECTED.search(str(e))
            if not m or m.group(1) not in settings or m.group(1) in entry.rejected:
                raise
            entry.rejected.add(m.group(1))
            log.debug("%s does not take %r: omitted", entry.name, m.group(1))
    raise RuntimeError("unreachable")
