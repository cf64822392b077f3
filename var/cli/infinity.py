"""The Infinity family on the command line: arguments, loading and prompt handling shared by the ``var-*`` tools
(``--prompt``, ``--prompts-file`` and ``--text-encoder`` are var-sample's, shared with the LlamaGen T2I family).

``var-sample --family infinity --vae infinity_vae_d32reg.pth --model infinity_2b_reg.pth
--text-encoder google/flan-t5-xl --prompt "a red fox in the snow" [--prompts-file F] [--h-div-w 1.0]``
"""
from __future__ import annotations

import argparse
from pathlib import Path

from var.cli.sampling import per_scale_type
from var.errors import ConfigError, TextEncoderError



def add_infinity_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("text-to-image Infinity (--family infinity)")
    g.add_argument("--model", help="Infinity transformer: infinity_2b_reg.pth, .safetensors or saved directory "
                                   "(--vae is then the BSQ VAE: infinity_vae_d32reg.pth ...)")
    g.add_argument("--embedding-cache", help="folder of precomputed prompt embeddings: read, and written for prompts "
                                             "not in it (--text-encoder names them; it is loaded only then)")
    g.add_argument("--negative-prompt", action="append", default=None,
                   help="negative prompt(s): one for all prompts or one per prompt (default: the learned "
                        "unconditional text)")
    g.add_argument("--h-div-w", type=float, default=1.0,
                   help="aspect ratio h/w (nearest of the templates; default 1.0)")
    g.add_argument("--pixels", default="1M", choices=("0.06M", "0.25M", "0.60M", "1M"),
                   help="image size: 256, 512, 768 or 1024 px for 1:1 (default 1M)")
    g.add_argument("--cfg-list", type=per_scale_type(float), default=None,
                   help="guidance, one value for all scales or one per scale (comma-separated): Infinity's "
                        "cfg cond + (1 - cfg) uncond, 1 = none (default 3)")
    g.add_argument("--tau-list", type=per_scale_type(float), default=None,
                   help="temperature, one value or one per scale (comma-separated; default 1)")
    g.add_argument("--cfg-insertion-layer", type=int, default=0,
                   help="0: guidance on the logits; -k: on the hidden states after block depth - k")
    g.add_argument("--gumbel", action="store_true", help="draw bits with the Gumbel-max trick")


def negative_prompts(args, num_prompts: int) -> list[str] | None:
    neg = args.negative_prompt
    if not neg:
        return None
    if len(neg) == 1:
        return neg * num_prompts
    if len(neg) != num_prompts:
        raise ConfigError(f"{len(neg)} negative prompts for {num_prompts} prompts: give one, or one per prompt")
    return list(neg)


def check_text_source(args) -> None:
    """A missing ``--text-encoder`` fails before any model is loaded."""
    if not args.text_encoder:
        if args.embedding_cache:
            raise TextEncoderError("--embedding-cache without --text-encoder needs the encoder's name: give "
                                   "--text-encoder (nothing is encoded for prompts already cached)")
        raise TextEncoderError("--family infinity needs --text-encoder (google/flan-t5-xl or a local directory)")


def load_text_source(args, device):
    """A callable ``prompts -> PromptEmbeddings``: the text encoder, through the embedding cache when given (the
    encoder is then loaded only if a prompt is missing from the cache: an evaluation rerun never loads it)."""
    from var.models.text_encoder import T5_MAX_LENGTH, PromptEmbeddingCache, TextEncoder

    check_text_source(args)
    if not args.embedding_cache:
        return TextEncoder.from_pretrained(args.text_encoder, device=device).encode
    cache = PromptEmbeddingCache(args.embedding_cache, encoder_name=args.text_encoder, max_length=T5_MAX_LENGTH)

    def encode(prompts):
        if cache.encoder is None and not all(cache.path(p).is_file() for p in prompts):
            cache.encoder = TextEncoder.from_pretrained(args.text_encoder, device=device)
        return cache.encode(prompts)
    return encode


def load_infinity_models(args):
    """``(vae, model, description)`` from ``--vae`` / ``--model`` (strict loads)."""
    from var.hub import load_infinity

    if not (args.vae and args.model):
        raise ConfigError("--family infinity needs --vae (infinity_vae_d*.pth) and --model (infinity_*.pth)")
    vae, model = load_infinity(args.vae, args.model, device=args.device)
    return vae, model, Path(args.model).name


def check_text_encoder(model, emb) -> None:
    if emb.features_BNC.shape[-1] != model.config.text_channels:
        raise TextEncoderError(f"the text encoder gives {emb.features_BNC.shape[-1]}-d features, the model expects "
                               f"{model.config.text_channels} (flan-t5-xl: 2048)")
