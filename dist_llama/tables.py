"""How numbers read in the markdown this project writes (model cards, run reports)."""

from __future__ import annotations

import math


def format_value(value, digits: int = 4) -> str:
    """n/a for missing, fixed decimals for floats, thousands separators for counts, text as is."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
