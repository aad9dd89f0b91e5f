"""JSON as strict parsers read it, for every file evaluate/ writes (metrics.json, sweep.json, head.json).

Python's json writes NaN and Infinity as bare tokens that are not JSON (jq, JavaScript and json.loads with
parse_constant refuse them). A value that could not be computed belongs in the output as null, with its
reason beside it where it was computed; this is the last guard: non-finite floats become null and the
writer refuses (allow_nan=False) anything that slipped past.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def finite(value: Any) -> Any:
    """`value` with every NaN or ±Inf float (nested in dicts, lists, tuples, arrays) as None, and numpy
    scalars and arrays as the Python values they hold."""
    if isinstance(value, dict):
        return {(k.item() if isinstance(k, np.generic) else k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, np.ndarray):
        return finite(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    return value


def dumps(value: Any, indent: int | None = 2) -> str:
    """Strict JSON text of `value`: non-finite floats as null; other objects (paths, dates) as their str."""
    return json.dumps(finite(value), indent=indent, allow_nan=False, default=str)
