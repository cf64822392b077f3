"""Samplers: next-scale (VAR, CoDe), the next-token family (LlamaGen, SJD, MC-SJD, LANTERN, GSD, ZipAR, NAR, CTF)
and text-to-image Infinity; the list of them with their settings is ``var.samplers.registry``; shared logits
processing in ``var.samplers.logits``."""
from var.samplers.calibration import calibrate
from var.samplers.coarse_to_fine import sample_coarse_to_fine
from var.samplers.collaborative import sample_collaborative
from var.samplers.infinity import sample_infinity
from var.samplers.jacobi import sample_gsd, sample_jacobi, sample_lantern, sample_mcsjd, sample_sjd
from var.samplers.neighbor import sample_zipar
from var.samplers.neighbor_nar import sample_nar
from var.samplers.next_scale import sample_next_scale
from var.samplers.next_token import sample_next_token
from var.samplers.stats import SampleOutput, SamplerStats

__all__ = ["sample_next_scale", "sample_collaborative", "sample_next_token", "sample_sjd", "sample_mcsjd",
           "sample_lantern", "sample_gsd", "sample_jacobi", "sample_zipar", "sample_nar", "sample_coarse_to_fine",
           "sample_infinity",
           "SampleOutput", "SamplerStats", "calibrate"]
