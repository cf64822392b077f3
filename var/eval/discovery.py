"""Find, at run time, the samplers and KV-cache policies that this installation provides, and call them uniformly.

Samplers live in ``var.samplers.<module>`` as public ``sample_*`` functions; policies live in
``var.kernels.policies`` (and ``var.kernels``) as classes with a ``new_cache`` method. Modules that fail to import
(half-written, missing optional dependencies) are skipped with a log line, never fatal: evaluation and
benchmarks include whatever works.

:func:`call_sampler` passes only the keyword arguments a sampler's signature accepts, so one settings dict
(``cfg``, ``top_k``, ``top_p``, ``temperature``, ``window``, ...) can drive different samplers.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

# positional roles of a sampler's leading parameters -> how the caller supplies them
PAIR_PARAMS = ("drafter", "refiner")


@dataclass
class SamplerEntry:
    """A discovered sampler: ``name`` (function name without ``sample_``), its module and function."""

    name: str
    module: str
    fn: Callable
    params: tuple[str, ...] = field(default=())

    @property
    def needs_pair(self) -> bool:
        """True for two-model samplers (drafter + refiner, e.g. CoDe)."""
        return all(p in self.params for p in PAIR_PARAMS)

    def accepts(self, key: str) -> bool:
        sig = inspect.signature(self.fn)
        return key in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


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
    return found


def call_sampler(entry: SamplerEntry, models: tuple, tok, labels_B, *, generator, cache=None, **settings):
    """Run ``entry`` on ``models`` (one model, or (drafter, refiner) for pair samplers) with the settings its
    signature accepts; returns its :class:`~var.samplers.stats.SampleOutput`."""
    kwargs = {k: v for k, v in settings.items() if entry.accepts(k)}
    dropped = sorted(set(settings) - set(kwargs))
    if dropped:
        log.debug("%s ignores %s", entry.name, dropped)
    if cache is not None:
        if not entry.accepts("cache"):
            from var.errors import ConfigError
            raise ConfigError(f"sampler {entry.name} takes no cache policy")
        kwargs["cache"] = cache
    return entry.fn(*models, tok, labels_B, generator=generator, **kwargs)
