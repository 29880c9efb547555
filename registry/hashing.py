"""Canonical JSON and its sha256.

Why: recipes and evaluation protocols are compared by content. JSON columns cannot be compared
portably in SQL (PostgreSQL's ``json`` has no equality operator), so the store keeps a sha256 of a
canonical encoding next to them and compares that instead.
"""

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> str:
    """Encode ``value`` so that equal data always gives the same text (sorted keys, no spaces).

    NaN and infinities are refused: they are not JSON and would not round-trip through the
    database.
    """
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def json_sha256(value: Any) -> str:
    """Hex sha256 of ``canonical_json(value)``."""
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()
