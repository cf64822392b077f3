"""Range checks of numeric settings: a value outside its range is a :class:`~var.errors.ConfigError` naming the
setting, never a run that "succeeds" with wrong numbers (``ema_decay=1.5`` used to export inf weights)."""
from __future__ import annotations

import math

from var.errors import ConfigError


def check_range(name: str, value, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False) -> None:
    """Require a finite number ``value`` in the interval given by ``low``/``high`` (open ends when asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be in {lo}, {hi}, got {value!r}")


def check_fields(obj, ranges: dict) -> None:
    """``check_range`` every field of a dataclass named in ``ranges`` (``name -> (low, high, low_open,
    high_open)``); tuples are checked element-wise."""
    for name, (low, high, low_open, high_open) in ranges.items():
        value = getattr(obj, name)
        for v in (value if isinstance(value, (tuple, list)) else (value,)):
            check_range(name, v, low, high, low_open=low_open, high_open=high_open)


# common intervals as (low, high, low_open, high_open)
POSITIVE = (0, None, True, False)
NON_NEGATIVE = (0, None, False, False)
AT_LEAST_ONE = (1, None, False, False)
FRACTION = (0, 1, False, False)          # [0, 1]
PROBABILITY_BELOW_ONE = (0, 1, False, True)  # [0, 1)
