"""Offline text-encoder builders for the text-to-image tests: a tiny random T5 and a word-level tokenizer."""
from pathlib import Path


from var.models.text_encoder import TextEncoder, random_t5_encoder

WORDS = ("a red blue green fox cat dog in the snow lighthouse sea square circle triangle big small on of "
         "picture photo").split()


def tiny_t5_encoder(seed: int = 0, d_model: int = 16, max_length: int = 16) -> TextEncoder:
    """A random ``T5EncoderModel`` (gated-GELU like flan-t5) with a word-level tokenizer; nothing downloaded."""
    return random_t5_encoder(WORDS, seed=seed, d_model=d_model, max_length=max_length)


def save_tiny_t5(directory: Path, **kwargs) -> Path:
    """Write :func:`tiny_t5_encoder` as a transformers directory (config, weights, tokenizer)."""
    enc = tiny_t5_encoder(**kwargs)
    enc.model.save_pretrained(directory)
    enc.tokenizer.save_pretrained(directory)
    return Path(directory)
