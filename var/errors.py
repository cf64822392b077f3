"""Named exceptions raised for bad input, so callers can catch precisely what went wrong."""


class VarError(Exception):
    """Base class of every error raised by this package on bad input."""


class CheckpointError(VarError):
    """A checkpoint file is missing, unreadable, corrupt or belongs to another model."""


class CheckpointMismatchError(CheckpointError):
    """A state dict does not match the model: lists missing/unexpected keys and shape mismatches."""

    def __init__(self, what: str, missing=(), unexpected=(), mismatched=()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        has_lists = bool(self.missing or self.unexpected or self.mismatched)
        lines = [f"checkpoint does not match {what}" + (":" if has_lists else "")]
        for title, items in (("missing keys", self.missing), ("unexpected keys", self.unexpected),
                             ("shape mismatches", self.mismatched)):
            if items:
                shown = ", ".join(str(i) for i in items[:12])
                more = f" ... (+{len(items) - 12} more)" if len(items) > 12 else ""
                lines.append(f"  {title} ({len(items)}): {shown}{more}")
        super().__init__("\n".join(lines))


class NonFiniteWeightsError(CheckpointError):
    """A checkpoint holds NaN or infinite weights (the message names the tensors): it would decode black images."""


class ImageSizeError(VarError):
    """An image batch has the wrong shape or size for the tokenizer."""


class ClassIdError(VarError):
    """A class label is outside the model's range."""


class NonFiniteLogitsError(VarError):
    """A forward pass produced NaN or infinite logits (bad weights, overflow in low precision, ...)."""


class NonFiniteImagesError(VarError):
    """Decoded images hold NaN or infinite values (NaN/inf tokenizer weights or codebook entries, overflow)."""


class ConfigError(VarError):
    """A configuration value or sampler argument is out of range."""


class MissingDependencyError(VarError):
    """An optional dependency (an extra such as ``[t2i]``) is needed for this feature and is not installed."""


class TextEncoderError(VarError):
    """A text encoder or a prompt-embedding file is missing, unreadable, or not what was asked for."""


class AspectRatioError(ConfigError):
    """An aspect ratio has no scale-schedule template (Infinity covers h/w from 1/3 to 3)."""


class PromptError(VarError):
    """A text prompt is empty, too long for the model, or uses words the model does not know."""


class UnsupportedCacheError(ConfigError):
    """A sampler was given a KV cache it cannot work with (e.g. SJD needs the dense cache's K/V buffers)."""
