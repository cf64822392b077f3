"""Samplers: next-scale (VAR) and the next-token family; shared logits processing in ``var.samplers.logits``."""
from var.samplers.calibration import calibrate
from var.samplers.jacobi import sample_gsd, sample_jacobi, sample_lantern, sample_mcsjd, sample_sjd
from var.samplers.neighbor import sample_zipar
from var.samplers.next_scale import sample_next_scale
from var.samplers.next_token import sample_next_token
from var.samplers.stats import SampleOutput, SamplerStats

__all__ = ["sample_next_scale", "sample_next_token", "sample_sjd", "sample_mcsjd", "sample_lantern", "sample_gsd",
           "sample_jacobi", "sample_zipar", "SampleOutput", "SamplerStats", "calibrate"]
