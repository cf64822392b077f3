"""Offline text-encoder builders for the text-to-image tests: a tiny random T5 and a word-level tokenizer."""
from pathlib import Path

import torch

from var.models.text_encoder import TextEncoder, require_transformers

WORDS = ("a red blue green fox cat dog in the snow lighthouse sea square circle triangle big small on of "
         "picture photo").split()


def tiny_t5_encoder(seed: int = 0, d_model: int = 16, max_length: int = 16) -> TextEncoder:
    """A random ``T5EncoderModel`` (gated-GELU like flan-t5) with a word-level tokenizer; nothing downloaded."""
    transformers = require_transformers()
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=4, num_heads=4, d_ff=2 * d_model,
                                   num_layers=2, feed_forward_proj="gated-gelu",
                                   relative_attention_num_buckets=8, relative_attention_max_distance=16)
    return TextEncoder(transformers.T5EncoderModel(config), tokenizer, max_length=max_length, name="tiny-t5")


def save_tiny_t5(directory: Path, **kwargs) -> Path:
    """Write :func:`tiny_t5_encoder` as a transformers directory (config, weights, tokenizer)."""
    enc = tiny_t5_encoder(**kwargs)
    enc.model.save_pretrained(directory)
    enc.tokenizer.save_pretrained(directory)
    return Path(directory)
