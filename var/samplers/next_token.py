"""Plain next-token sampling for class-conditional GPTs (LlamaGen's ``generate``), and the pieces that the
parallel samplers (:mod:`var.samplers.jacobi`, :mod:`var.samplers.neighbor`) share with it.

CFG follows LlamaGen and keeps its name, ``cfg_scale``: the batch is ``[cond; uncond]`` (null class =
``num_classes``) and the guided logits are ``uncond + cfg_scale * (cond - uncond)``; ``cfg_scale = 1`` is
conditional-only and skips the unconditional half (``cfg=`` still works, with a DeprecationWarning). Then
temperature, top-k and top-p (all from :mod:`var.samplers.logits`, the one shared processor).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch

from var.errors import ConfigError
from var.models.conditioning import CaptionCondition
from var.models.compiled import CompileArg, DecodeStep, compile_spec, decode_cache
from var.samplers.logits import (FiniteCheck, GeneratorArg, apply_cfg, check_guidance, check_sampling_args,
                                 multinomial, processed_logits)
from var.samplers.next_scale import as_label_tensor
from var.samplers.stats import SampleOutput, SamplerStats


@dataclass
class TokenProcessor:
    """CFG + temperature + top-k/top-p: model logits over ``rows`` (``2B`` with CFG) -> probabilities ``[B, .., V]``.

    Every sampler of the next-token family computes its target (and draft) distributions through this one object,
    which is what keeps the speculative samplers exact.
    """

    batch: int
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    cfg_interval: int = -1  # LlamaGen/NAR: guidance only for the first tokens (-1: everywhere); see guided_tokens
    # the finiteness check of every probs() call: immediate by default; a sampler that reads it back once
    # (after its loop or with a read-back it makes anyway) sets a deferred FiniteCheck()
    finite: FiniteCheck = field(default_factory=lambda: FiniteCheck(deferred=False))

    def __post_init__(self):
        check_sampling_args(self.top_k, self.top_p, self.temperature)
        check_guidance(self.cfg_scale, 1.0, "LlamaGen convention: 1 = no guidance", name="cfg_scale")
        if isinstance(self.cfg_interval, bool) or not isinstance(self.cfg_interval, int) or self.cfg_interval < -1:
            raise ConfigError(f"cfg_interval must be an int >= -1 (-1 = guide every token), got {self.cfg_interval!r}")

    def guided_tokens(self, generated_before):
        """Whether the token(s) drawn after ``generated_before`` tokens are guided (bool or tensor): LlamaGen's
        rule, guidance while ``generated_before <= cfg_interval + 1`` (its decode step ``i`` follows ``i + 1``
        tokens and drops guidance when ``i > cfg_interval``); always with ``cfg_interval = -1``."""
        if self.cfg_interval < 0:
            return True
        return generated_before <= self.cfg_interval + 1

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0

    def double(self, x: torch.Tensor) -> torch.Tensor:
        """Repeat per-image inputs (tokens, positions, masks) for the unconditional half."""
        return torch.cat((x, x)) if self.guided else x

    def probs(self, logits_rV: torch.Tensor, where: str = "", guided=True) -> torch.Tensor:
        """``[rows, ..., V]`` logits -> ``[B, ..., V]`` fp32 sampling distribution. ``guided``: bool, or a bool
        tensor broadcastable to ``[B, ...]`` (per position; unguided positions use the conditional logits, as the
        releases do past ``cfg_interval``)."""
        self.finite.update(logits_rV, where or "next-token logits")
        logits = logits_rV.float()
        if self.guided:
            weight = self.cfg_scale
            if isinstance(guided, torch.Tensor):
                weight = torch.where(guided, self.cfg_scale, 1.0).to(logits.device)[..., None]
            elif not guided:
                weight = 1.0
            logits = apply_cfg(logits[: self.batch], logits[self.batch:], weight)
        return processed_logits(logits, temperature=self.temperature, top_k=self.top_k,
                                top_p=self.top_p).softmax(dim=-1)


def check_pair(model, tokenizer) -> None:
    """Raise :class:`ConfigError` if the tokenizer's codebook does not match the model's vocabulary."""
    if tokenizer is not None and tokenizer.vocab_size != model.vocab_size:
        raise ConfigError(f"tokenizer (V {tokenizer.vocab_size}) does not match the model (V {model.vocab_size})")


def legacy_cfg_scale(cfg_scale: float, cfg: float | None) -> float:
    """``cfg_scale``, or the deprecated ``cfg=`` keyword of the next-token samplers when it was given."""
    if cfg is None:
        return cfg_scale
    warnings.warn("next-token samplers take cfg_scale= (LlamaGen's guidance scale, 1 = none); cfg= is deprecated",
                  DeprecationWarning, stacklevel=4)
    return cfg


def as_condition(model, cond):
    """Class ids (sequence or tensor) -> LongTensor on the model's device; a caption condition is moved there."""
    device = model.output.weight.device
    if isinstance(cond, CaptionCondition):
        return cond.to(device)
    return as_label_tensor(cond, device)


def prepare(model, tokenizer, cond, cfg_scale, temperature, top_k, top_p, cfg_interval: int = -1, *,
            cfg: float | None = None):
    """Validated ``(condition, processor, model rows)`` shared by all next-token samplers. The condition is class
    ids ``[B]`` or a :class:`~var.models.conditioning.CaptionCondition` (text-to-image GPT); samplers only use
    ``len()`` and ``.device`` of it and hand the rows (with the CFG null half) to ``model.prefill``. ``cfg`` is the
    deprecated name of ``cfg_scale``."""
    check_pair(model, tokenizer)
    cond = as_condition(model, cond)
    model.check_condition(cond)
    proc = TokenProcessor(len(cond), legacy_cfg_scale(cfg_scale, cfg), temperature, top_k, top_p, cfg_interval)
    return cond, proc, model.condition_rows(cond, proc.guided)


def finish(model, tokenizer, tokens_BN: torch.Tensor, stats: SamplerStats, t0: float, decode: bool,
           cache=None) -> SampleOutput:
    """Decode ``[B, N]`` tokens (images in [0, 1]), fold in ``cache``'s byte peaks and stamp the wall time."""
    stats.tokens = model.seq_len
    if cache is not None:
        stats.track_kv(cache)
    images = None
    if decode and tokenizer is not None:
        g = model.config.grid_size
        images = tokenizer.decode([tokens_BN.view(-1, g, g)]).float().add(1).mul(0.5)
    stats.wall_time_s = time.perf_counter() - t0
    return SampleOutput(images=images, tokens=tokens_BN, stats=stats)


@torch.no_grad()
def sample_next_token(model, tokenizer, labels_B, *, cfg_scale: float = 2.0, top_k: int = 0, top_p: float = 0.0,
                      temperature: float = 1.0, cfg_interval: int = -1, generator: GeneratorArg = None,
                      decode: bool = True, cfg: float | None = None, compile: CompileArg = False) -> SampleOutput:
    """One forward pass per token over a preallocated KV cache (the reference the other samplers must match).

    Args:
        model: a :class:`~var.models.gpt.GPT`; tokenizer: its :class:`~var.tokenizers.SingleScaleVQ` (None: no
            images).
        labels_B: class ids ``[B]`` in ``[0, num_classes]`` (``num_classes`` = unconditional), or a
            :class:`~var.models.conditioning.CaptionCondition` for a text-to-image GPT (CFG: its null caption).
        cfg_scale: LlamaGen guidance scale (1 = none; ``cfg`` is its deprecated name).
        top_k / top_p / temperature: shared logits filtering (0 disables).
        cfg_interval: LlamaGen's: guide only while at most ``cfg_interval + 1`` tokens are generated (-1: always).
        generator: one ``torch.Generator`` or one per sample (then a batch of N equals N single runs).
        compile: compile the one-token decode step (:mod:`var.models.compiled`: the static-shape
            ``GPT.decode_step``, one graph for every step, CUDA graphs on CUDA; the cache is kept for the next
            sample of that batch size); ``True``, or a ``torch.compile`` backend name. The draws stay eager.
    Returns:
        :class:`SampleOutput`: ``images [B, 3, H, W]`` in [0, 1], ``tokens [B, N]`` (raster order), stats.
    """
    t0 = time.perf_counter()
    labels_B, proc, rows = prepare(model, tokenizer, labels_B, cfg_scale, temperature, top_k, top_p, cfg_interval,
                                   cfg=cfg)
    proc.finite = FiniteCheck()  # read back once, after the loop: no host synchronisation per token
    B, N = len(labels_B), model.seq_len
    spec = compile_spec(compile)
    kv_cache = decode_cache(model, len(rows), spec)
    stats = SamplerStats(peak_kv_cache_bytes=kv_cache.nbytes())
    tokens = torch.empty(B, N, dtype=torch.long, device=labels_B.device)
    logits = model.prefill(rows, kv_cache)
    step = DecodeStep(model, kv_cache, spec) if spec is not None else (lambda idx: model.decode(idx, kv_cache))
    for i in range(N):
        stats.forward_passes += 1
        probs = proc.probs(logits[:, -1], f"token {i}", proc.guided_tokens(i))
        tokens[:, i] = multinomial(probs, generator, finite=proc.finite)
        if i + 1 < N:
            logits = step(proc.double(tokens[:, i:i + 1]))
    proc.finite.raise_if_failed()
    return finish(model, tokenizer, tokens, stats, t0, decode, cache=kv_cache)

