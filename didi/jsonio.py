"""JSON that strict readers accept: no NaN/Infinity, which Python's json writes by default and JSON forbids.

Where a figure can be undefined (an accuracy over no examples, a search metric of a run that took no step),
the code that makes it writes null and a reason beside it; `dumps` is the guard behind that: any non-finite
float left is written as null with `<key>_not_finite` naming what it was.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """A copy of `obj` with every non-finite float replaced by None (and its reason beside it in a dict)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = None
                out.setdefault(f"{k}_not_finite", repr(v))
            else:
                out[k] = finite(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` of `finite(obj)`, refusing any NaN that is still left (allow_nan=False)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
