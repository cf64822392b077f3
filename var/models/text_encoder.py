"""T5 text encoder for the text-to-image families (Infinity, LlamaGen T2I), via the optional ``transformers``.

``transformers`` is imported only when an encoder is built (``pip install "var-toolkit[t2i]"``), never at import
time of this module. The released models use the encoder of ``google/flan-t5-xl`` (2048-d features)::

    enc = TextEncoder.from_pretrained("google/flan-t5-xl", device="cuda", dtype=torch.float16)
    emb = enc.encode(["a red fox in the snow", "a lighthouse"])   # PromptEmbeddings
    emb.features_BNC   # [B, N, 2048] fp32, zero at padding; N = longest prompt in tokens (or max_length)
    emb.mask_BN        # [B, N] bool, True at real tokens (the T5 end-of-sequence token included)

Evaluation runs can precompute the embeddings once: :meth:`PromptEmbeddings.save` / :meth:`PromptEmbeddings.load`
(one safetensors file with the prompts in its metadata), or :class:`PromptEmbeddingCache` (one file per prompt,
keyed by encoder name, max length and prompt text, so a repeated prompt is encoded once).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from var.errors import ConfigError, MissingDependencyError, TextEncoderError
from var.utils.files import atomic_path

T5_MAX_LENGTH = 512  # Infinity's tokenizer max_length (LlamaGen T2I uses 120)


def require_transformers():
    """Import ``transformers`` or raise :class:`MissingDependencyError` saying which extra installs it."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise MissingDependencyError(
            'the text encoder needs transformers: pip install "var-toolkit[t2i]"') from e
    return transformers


@dataclass
class PromptEmbeddings:
    """Text features of a batch of prompts, zero-padded to a common length.

    ``features_BNC`` float ``[B, N, C]``; ``lengths_B`` int64 ``[B]`` real tokens per prompt (the first
    ``lengths_B[b]`` rows of prompt ``b``); ``prompts`` the source texts when known.
    """

    features_BNC: torch.Tensor
    lengths_B: torch.Tensor
    prompts: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.features_BNC.ndim != 3 or self.lengths_B.shape != self.features_BNC.shape[:1]:
            raise ConfigError(f"features must be [B, N, C] with one length per row, got "
                              f"{tuple(self.features_BNC.shape)} and lengths {tuple(self.lengths_B.shape)}")
        if len(self.lengths_B) and (int(self.lengths_B.min()) < 1
                                    or int(self.lengths_B.max()) > self.features_BNC.shape[1]):
            raise ConfigError(f"prompt lengths {self.lengths_B.tolist()} outside [1, {self.features_BNC.shape[1]}]")
        if self.prompts is not None:
            self.prompts = tuple(self.prompts)
            if len(self.prompts) != len(self):
                raise ConfigError(f"{len(self.prompts)} prompts for {len(self)} embeddings")

    def __len__(self) -> int:
        return self.features_BNC.shape[0]

    @property
    def mask_BN(self) -> torch.Tensor:
        """``[B, N]`` bool, True at real tokens."""
        n = self.features_BNC.shape[1]
        return torch.arange(n, device=self.lengths_B.device) < self.lengths_B[:, None]

    def to(self, device=None, dtype: torch.dtype | None = None) -> "PromptEmbeddings":
        return PromptEmbeddings(self.features_BNC.to(device=device, dtype=dtype), self.lengths_B.to(device),
                                self.prompts)

    def select(self, rows: Sequence[int]) -> "PromptEmbeddings":
        """The embeddings of ``rows`` (trimmed to their longest prompt)."""
        rows = list(rows)
        lengths = self.lengths_B[rows]
        n = int(lengths.max()) if rows else 1
        prompts = None if self.prompts is None else tuple(self.prompts[r] for r in rows)
        return PromptEmbeddings(self.features_BNC[rows, :n], lengths, prompts)

    @staticmethod
    def concat(parts: Sequence["PromptEmbeddings"]) -> "PromptEmbeddings":
        """Stack several batches (padding to the longest); prompts kept only when every part has them."""
        if not parts:
            raise ConfigError("concat needs at least one PromptEmbeddings")
        n = max(p.features_BNC.shape[1] for p in parts)
        feats = torch.cat([torch.nn.functional.pad(p.features_BNC, (0, 0, 0, n - p.features_BNC.shape[1]))
                           for p in parts])
        prompts = None
        if all(p.prompts is not None for p in parts):
            prompts = tuple(s for p in parts for s in p.prompts)
        return PromptEmbeddings(feats, torch.cat([p.lengths_B for p in parts]), prompts)

    def compact(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Padding dropped: ``(features [sum(lengths), C], cu_seqlens [B + 1] int32)`` (flash-attn varlen form)."""
        feats = self.features_BNC[self.mask_BN]
        cu = torch.nn.functional.pad(self.lengths_B.cumsum(0), (1, 0)).to(torch.int32)
        return feats, cu

    # ---- disk --------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write one safetensors file (features fp32/fp16 as held, lengths, prompts in the metadata)."""
        from safetensors.torch import save_file

        meta = {"format": "var.PromptEmbeddings"}
        if self.prompts is not None:
            meta["prompts"] = json.dumps(list(self.prompts))
        with atomic_path(path) as tmp:  # ranks of a distributed run may fill one cache together
            save_file({"features_BNC": self.features_BNC.contiguous().cpu(), "lengths_B": self.lengths_B.cpu()},
                      str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device=None) -> "PromptEmbeddings":
        """Read a file written by :meth:`save`; raises :class:`TextEncoderError` for any other file."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise TextEncoderError(f"prompt embeddings file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "var.PromptEmbeddings" or set(f.keys()) != {"features_BNC", "lengths_B"}:
                    raise TextEncoderError(f"{path} is not a prompt embeddings file (written by PromptEmbeddings.save)")
                feats, lengths = f.get_tensor("features_BNC"), f.get_tensor("lengths_B")
        except TextEncoderError:
            raise
        except Exception as e:
            raise TextEncoderError(f"cannot read prompt embeddings {path}: {e}") from e
        prompts = json.loads(meta["prompts"]) if "prompts" in meta else None
        return cls(feats, lengths, prompts).to(device)


class TextEncoder:
    """A ``transformers`` encoder (``T5EncoderModel``) and its tokenizer: prompts -> :class:`PromptEmbeddings`.

    ``max_length`` truncates long prompts (in tokens, end-of-sequence included). ``pad_to_max_length`` pads the
    features to ``max_length`` rows instead of the longest prompt of the batch (same values at real tokens).
    """

    def __init__(self, model, tokenizer, *, max_length: int = T5_MAX_LENGTH, name: str = "custom"):
        if max_length < 1:
            raise ConfigError(f"max_length must be >= 1, got {max_length}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length, self.name = max_length, name

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, device="cpu", dtype: torch.dtype = torch.float32,
                        max_length: int = T5_MAX_LENGTH, local_files_only: bool = False) -> "TextEncoder":
        """Load ``T5EncoderModel`` and ``AutoTokenizer`` from a hub name (e.g. ``google/flan-t5-xl``) or a local
        directory. Raises :class:`MissingDependencyError` without transformers, :class:`TextEncoderError` when
        nothing loadable is there."""
        transformers = require_transformers()
        src = str(name_or_path)
        if Path(src).suffix in (".pth", ".pt", ".safetensors", ".bin") and Path(src).is_file():
            raise TextEncoderError(f"{src} is a weights file; the text encoder is a transformers directory or hub "
                                   f"name holding config.json, the weights and the tokenizer (e.g. google/flan-t5-xl)")
        if src.startswith(("/", "./", "../", "~")) and not Path(src).expanduser().exists():
            raise TextEncoderError(f"no text encoder at {src}: the directory does not exist")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(src, local_files_only=local_files_only)
            # transformers >= 4.56 names the argument dtype; older releases call it torch_dtype
            key = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
            model = transformers.T5EncoderModel.from_pretrained(src, local_files_only=local_files_only,
                                                                **{key: dtype})
        except (OSError, ValueError) as e:
            raise TextEncoderError(f"cannot load a T5 text encoder from {src!r}: {e}") from e
        return cls(model.to(device), tokenizer, max_length=max_length, name=src)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def feature_dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], *, pad_to_max_length: bool = False) -> PromptEmbeddings:
        """Features of ``prompts`` (fp32, zero at padding) and their token counts."""
        if isinstance(prompts, str):
            raise ConfigError("encode takes a list of prompts, not one string")
        prompts = list(prompts)
        if not prompts:
            raise ConfigError("encode needs at least one prompt")
        tok = self.tokenizer(prompts, max_length=self.max_length, truncation=True, return_tensors="pt",
                             padding="max_length" if pad_to_max_length else "longest")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        feats = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        feats = feats * mask.unsqueeze(-1).to(feats.dtype)  # padding rows carry T5 outputs: zero them
        return PromptEmbeddings(feats, mask.sum(-1).long(), tuple(prompts))


def random_t5_encoder(words: Sequence[str], *, seed: int = 0, d_model: int = 16, max_length: int = 16,
                      name: str = "tiny-t5") -> TextEncoder:
    """A random-weight ``T5EncoderModel`` (gated-GELU like flan-t5, 2 layers) built from a ``transformers`` config,
    with a word-level tokenizer over ``words`` (others map to ``<unk>``): nothing is downloaded. For tests and CPU
    benchmarks of the text-to-image families, never for images."""
    transformers = require_transformers()
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<pad>", "</s>", "<unk>", *words]))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = transformers.T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=4, num_heads=4,
                                       d_ff=2 * d_model, num_layers=2, feed_forward_proj="gated-gelu",
                                       relative_attention_num_buckets=8, relative_attention_max_distance=16)
        model = transformers.T5EncoderModel(config)
    return TextEncoder(model, tokenizer, max_length=max_length, name=name)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class PromptEmbeddingCache:
    """Prompt embeddings stored on disk, one safetensors file per (encoder, max length, prompt).

    ``cache.encode(prompts)`` returns the cached rows and encodes (then stores) only the missing ones; with
    ``encoder=None`` every prompt must already be cached (:class:`TextEncoderError` names the first one missing).
    """

    def __init__(self, directory: str | Path, encoder: TextEncoder | None = None, *, encoder_name: str | None = None,
                 max_length: int | None = None):
        self.directory = Path(directory)
        self.encoder = encoder
        self.encoder_name = encoder_name or (encoder.name if encoder else None)
        self.max_length = max_length or (encoder.max_length if encoder else None)
        if self.encoder_name is None or self.max_length is None:
            raise ConfigError("PromptEmbeddingCache without an encoder needs encoder_name and max_length")

    def path(self, prompt: str) -> Path:
        key = json.dumps([self.encoder_name, self.max_length, prompt])
        return self.directory / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors")

    def encode(self, prompts: Sequence[str]) -> PromptEmbeddings:
        prompts = list(prompts)
        missing = [p for p in dict.fromkeys(prompts) if not self.path(p).is_file()]
        if missing:
            if self.encoder is None:
                raise TextEncoderError(f"prompt not in the embedding cache {self.directory} and no text encoder "
                                       f"given: {missing[0]!r}")
            self.directory.mkdir(parents=True, exist_ok=True)
            fresh = self.encoder.encode(missing)
            for i in range(len(missing)):
                fresh.select([i]).save(self.path(missing[i]))
        parts = [PromptEmbeddings.load(self.path(p)) for p in prompts]
        for p, part in zip(prompts, parts):
            if part.prompts != (p,):  # a hash collision or a hand-edited file
                raise TextEncoderError(f"cache file {self.path(p)} holds {part.prompts}, expected {p!r}")
        return PromptEmbeddings.concat(parts)
