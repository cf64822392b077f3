"""Compiled sampling steps (``compile=True`` on the samplers): the one place that decides how ``torch.compile`` is
applied to a model's per-step forward, and the objects that keep a compiled step's inputs at fixed addresses.

* VAR's scale step (:class:`ScaleStep`, ``VAR.forward_scale``): every scale has static shapes over the preallocated
  cache, so ``dynamic=False`` compiles one graph per scale at the first sample and every later sample of that batch
  size reuses them: ``len(patch_nums)`` compilations per (batch rows, dtype) setting, no recompilation afterwards.
* A GPT's decode step (:class:`DecodeStep`, ``GPT.decode_step``): it writes at a device-side slot and attends over
  the whole preallocated cache under a mask, so all ``grid^2 - 1`` one-token steps are one graph (one compilation;
  compiling ``GPT.decode`` instead would specialise on the growing cache length, one graph per step), and so are
  all passes of a Jacobi window of fixed width.

On CUDA the inductor backend runs with ``mode="reduce-overhead"`` (CUDA graphs, as gpt-fast decodes). A captured step
mutates the cache buffers in place, which CUDA graphs allow only for inputs at static addresses: the caches of a
compiled sampler are marked so and reused from sample to sample (:func:`reusable_cache`) rather than reallocated.
The draws (top-k/top-p, multinomial, per-sample generators) stay outside the compiled region.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Union

import torch

from var.errors import ConfigError
from var.kernels.kv_cache import FullCache, KVCache

RECOMPILE_LIMIT = 64  # graphs per compiled function: the scales of a schedule times a few batch sizes


@dataclass(frozen=True)
class CompileSpec:
    """How a step is compiled. ``compile=True`` means the defaults; a string names the ``torch.compile`` backend
    (``"aot_eager"`` checks the traced graph quickly on a CPU)."""

    backend: str = "inductor"
    mode: str | None = None  # inductor only; None: "reduce-overhead" (CUDA graphs) on CUDA, "default" elsewhere
    dynamic: bool | None = False  # static shapes: one graph per VAR scale, one for every next-token decode step
    # (None: torch's automatic dynamic shapes, fewer compilations, kernels for symbolic sizes)

    def mode_on(self, device: torch.device) -> str | None:
        if self.backend != "inductor":
            return None
        return self.mode or ("reduce-overhead" if device.type == "cuda" else "default")

    def cuda_graphs(self, device: torch.device) -> bool:
        """Whether the compiled step replays CUDA graphs on ``device``."""
        return device.type == "cuda" and self.mode_on(device) in ("reduce-overhead", "max-autotune")


CompileArg = Union[bool, str, CompileSpec, None]


def compile_spec(compile: CompileArg) -> CompileSpec | None:
    """``False``/``None`` -> None (eager); ``True`` -> the defaults; a backend name or a :class:`CompileSpec`."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return CompileSpec()
    if isinstance(compile, str) and compile:
        return CompileSpec(backend=compile)
    if isinstance(compile, CompileSpec):
        return compile
    raise ConfigError(f"compile must be a bool, a torch.compile backend name or a CompileSpec, got {compile!r}")


_COMPILED: dict = {}


def compiled(fn: Callable, spec: CompileSpec, device: torch.device) -> Callable:
    """``torch.compile(fn)`` under ``spec`` for ``device`` (one wrapper per function, spec and device type; dynamo
    keys its graphs on ``fn``'s code and guards, so every model and cache of the same shapes shares them)."""
    key = (fn, spec, device.type)
    if key not in _COMPILED:
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6 name
        setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
        _COMPILED[key] = torch.compile(fn, backend=spec.backend, mode=spec.mode_on(device), dynamic=spec.dynamic)
    return _COMPILED[key]


_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def reusable_cache(model: torch.nn.Module, key, make: Callable[[], KVCache]) -> KVCache:
    """The cache ``make()`` built for ``model`` under ``key`` by an earlier compiled sample (cleared), else a new one.

    Its buffers are marked static addresses (with a guard: a different buffer would recompile, never replay a CUDA
    graph against a freed address). The cache lives as long as the model (:func:`release_caches` frees it)."""
    caches = _CACHES.setdefault(model, {})
    param = next(model.parameters())
    key = (key, param.dtype, param.device)  # a model moved or cast since gets a new cache
    cache = caches.get(key)
    if cache is None:
        cache = make()
        if not isinstance(cache, KVCache):
            raise ConfigError(f"compile=True needs the full preallocated cache (KVCache), got {type(cache).__name__}")
        for t in cache.k + cache.v:
            torch._dynamo.mark_static_address(t, guard=True)
        caches[key] = cache
    else:
        cache.clear()
    return cache


def release_caches(model: torch.nn.Module) -> None:
    """Free the caches that compiled samplers keep for ``model``."""
    _CACHES.pop(model, None)


def _bare(model):
    """The module under a ``torch.compile`` wrapper (its class holds the step functions compiled here)."""
    return getattr(model, "_orig_mod", model)


class ScaleStep:
    """VAR's scale step ``forward_scale(x_BlC, cond_BD, cache) -> logits [rows, pn*pn, V]``, eager or compiled."""

    def __init__(self, model, spec: CompileSpec | None):
        self.model, self.spec = model, spec
        device = model.head.weight.device
        # eager: the instance's own forward_scale (a wrapper set on the model, e.g. a benchmark's recompute
        # baseline, stays in effect); compiled: the class's function, traced once per shape
        self.fn = (lambda m, *args: m.forward_scale(*args)) if spec is None else compiled(
            type(_bare(model)).forward_scale, spec, device)
        self.mark_steps = spec is not None and spec.cuda_graphs(device)

    def new_cache(self, cache_policy, rows: int, device):
        """The cache of one sample: ``cache_policy.new_cache`` (eager); compiled, the full cache reused per
        (model, rows, device)."""
        if self.spec is None:
            return cache_policy.new_cache(self.model, rows, device=device)
        if not isinstance(cache_policy, FullCache):
            raise ConfigError(f"compile=True takes the full cache, got {cache_policy!r}: a compressed cache's "
                              "compaction has data-dependent shapes")
        return reusable_cache(self.model, ("scale", rows, device),
                              lambda: cache_policy.new_cache(self.model, rows, device=device))

    def __call__(self, x_BlC: torch.Tensor, cond_BD: torch.Tensor, cache) -> torch.Tensor:
        if self.mark_steps:  # the previous step's outputs were consumed: CUDA graphs may reuse their memory
            torch.compiler.cudagraph_mark_step_begin()
        return self.fn(self.model if self.spec is None else _bare(self.model), x_BlC, cond_BD, cache)


class DecodeStep:
    """A GPT's static-shape decode step (``GPT.decode_step``), eager or compiled: ``l`` tokens per row written at
    the cache's current length. It owns that length as a device tensor (advanced on the device; :meth:`rewind`
    after a truncation), checks room against the cache's host length and advances it."""

    def __init__(self, model, cache: KVCache, spec: CompileSpec | None):
        model = _bare(model)
        self.model, self.cache = model, cache
        device = cache.k[0].device
        self.fn = compiled(type(model).decode_step, spec, device) if spec is not None else type(model).decode_step
        self.mark_steps = spec is not None and spec.cuda_graphs(device)
        self.slot_1 = torch.full((1,), cache.length, dtype=torch.long, device=device)
        self._offsets: dict[int, torch.Tensor] = {}

    def __call__(self, idx_Bl: torch.Tensor, *, positions: torch.Tensor | None = None,
                 attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``idx_Bl [B, l]`` -> logits ``[B, l, V]``; ``positions`` / ``attn_mask`` as in ``GPT.decode_step``
        (defaults: consecutive positions at the slots, causal)."""
        l = idx_Bl.shape[1]
        self.cache.span(l)  # raises on overflow (host ints only)
        offsets = self._offsets.get(l)
        if offsets is None:
            offsets = self._offsets[l] = torch.arange(l, device=self.slot_1.device)
        if self.mark_steps:  # the previous step's outputs were consumed: CUDA graphs may reuse their memory
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.fn(self.model, idx_Bl, self.slot_1 + offsets, self.cache, positions, attn_mask)
        self.cache.advance(l)
        self.slot_1.add_(l)
        return logits

    def rewind(self, length: int, length_on_device: torch.Tensor | None = None) -> None:
        """Truncate the cache to ``length`` and move the write slot there (copied on the device from
        ``length_on_device`` when given: no host-to-device transfer)."""
        self.cache.truncate(length)
        if length_on_device is None:
            self.slot_1.fill_(length)
        else:
            self.slot_1.copy_(length_on_device.reshape(1))


def decode_cache(model, rows: int, spec: CompileSpec | None) -> KVCache:
    """The next-token cache of one sample: a new one (eager), the reused one (compiled)."""
    if spec is None:
        return model.new_kv_cache(rows)
    return reusable_cache(model, ("decode", rows), lambda: model.new_kv_cache(rows))
