"""Samplers: next-scale (VAR) and the next-token family; shared logits processing in ``var.samplers.logits``."""
from var.samplers.next_scale import sample_next_scale
from var.samplers.next_token import sample_next_token
from var.samplers.stats import SampleOutput, SamplerStats

__all__ = ["sample_next_scale", "sample_next_token", "SampleOutput", "SamplerStats"]
