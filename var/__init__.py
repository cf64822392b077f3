"""var: visual autoregressive image generation (VAR next-scale and next-token models, samplers, KV caches)."""

__version__ = "0.1.0"

from var import errors  # noqa: F401  (named exceptions are part of the public API)
