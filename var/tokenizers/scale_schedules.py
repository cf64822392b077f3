"""Infinity's dynamic-resolution scale schedules: one token-grid list per aspect-ratio template, each built as a
:class:`~var.utils.scales.ScaleSchedule`.

A schedule is a list of ``(h, w)`` token grids, coarse to fine; pixels = final grid x 16 (the VAE stride). Each
template ``h/w`` has 13 scales at 1M pixels (1024 x 1024 for 1:1); smaller sizes take the first 7 / 10 / 12 scales
("0.06M" 256 px, "0.25M" 512 px, "0.60M" 768 px, "1M" 1024 px). Templates for ``w/h`` swap ``h`` and ``w``.

The transformer's 2-D RoPE places every scale on the template's 1M final grid (``ScaleSchedule.rope_grid``), also at
256 or 512 px: positions are ``round(i * H / h)``, ``round(j * W / w)``.
"""
from __future__ import annotations

import math

from var.errors import AspectRatioError, ConfigError
from var.utils.scales import ScaleSchedule

PIXEL_SCALES = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}  # number of scales per total-pixel budget

# h/w -> the 13 token grids (h, w) of that template (Infinity's released table)
_RATIO_TO_GRIDS = {
    1.000: [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40),
            (48, 48), (64, 64)],
    1.250: [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36),
            (55, 44), (70, 56)],
    1.333: [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36),
            (60, 45), (72, 54)],
    1.500: [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32),
            (63, 42), (78, 52)],
    1.750: [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32),
            (70, 40), (84, 48)],
    2.000: [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30),
            (74, 37), (90, 45)],
    2.500: [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26),
            (80, 32), (100, 40)],
    3.000: [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24),
            (90, 30), (111, 37)],
}


def _all_templates() -> dict[float, list[tuple[int, int]]]:
    table = {}
    for ratio, grids in _RATIO_TO_GRIDS.items():
        table[ratio] = grids
        if ratio != 1.0:  # the original keys the swapped template by int(1/r * 1000) / 1000
            table[int(1 / ratio * 1000) / 1000] = [(w, h) for h, w in grids]
    return table


TEMPLATES: dict[float, list[tuple[int, int]]] = _all_templates()


def nearest_template(h_div_w: float, *, tolerance: float = 0.05) -> float:
    """The template ratio nearest ``h_div_w`` (the original's rule); :class:`AspectRatioError` when even the
    nearest is more than ``tolerance`` (relative) away, i.e. the ratio is outside Infinity's 1:3 .. 3:1 range."""
    if not (h_div_w > 0 and math.isfinite(h_div_w)):
        raise AspectRatioError(f"aspect ratio h/w must be a positive number, got {h_div_w}")
    best = min(TEMPLATES, key=lambda r: abs(h_div_w - r))
    if abs(h_div_w / best - 1) > tolerance:
        raise AspectRatioError(f"no scale-schedule template for h/w = {h_div_w:g}: the nearest is {best:g}; "
                               f"templates: {', '.join(f'{r:g}' for r in sorted(TEMPLATES))}")
    return best


def dynamic_schedule(h_div_w: float = 1.0, pixels: str = "1M", *, tolerance: float = 0.05) -> ScaleSchedule:
    """Schedule of the template nearest ``h_div_w`` at ``pixels`` ("0.06M", "0.25M", "0.60M", "1M")."""
    if pixels not in PIXEL_SCALES:
        raise ConfigError(f"pixels must be one of {list(PIXEL_SCALES)}, got {pixels!r}")
    grids = TEMPLATES[nearest_template(h_div_w, tolerance=tolerance)]
    return ScaleSchedule(tuple(grids[:PIXEL_SCALES[pixels]]), rope_grid=grids[-1])
