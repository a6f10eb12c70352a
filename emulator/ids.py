"""Salesforce-shaped record ids (15 characters plus the 3-character case-safe suffix)."""

from __future__ import annotations

import itertools
import threading

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SUFFIX = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"

# Key prefixes of the objects the emulator serves.
PREFIX = {
    "Account": "001",
    "Opportunity": "006",
    "User": "005",
    "Organization": "00D",
    "IngestJob": "750",
    "QueryJob": "750",
    "QueryLocator": "01g",
    "ConnectedApp": "0H4",
}


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_BASE62[r])
    return "".join(reversed(out))


def case_safe(id15: str) -> str:
    """Append Salesforce's 3-character checksum that makes a 15-character id case-insensitive."""
    suffix = ""
    for chunk in (id15[0:5], id15[5:10], id15[10:15]):
        bits = sum(1 << i for i, ch in enumerate(chunk) if "A" <= ch <= "Z")
        suffix += _SUFFIX[bits]
    return id15 + suffix


def make_id(prefix: str, number: int, pod: str = "5g") -> str:
    """Build an 18-character id from a 3-character key prefix and a serial number."""
    return case_safe(prefix + pod + _base62(number, 10))


class IdSequence:
    """Thread-safe serial ids for one key prefix, starting after ``start``."""

    def __init__(self, prefix: str, start: int = 0) -> None:
        self.prefix = prefix
        self._counter = itertools.count(start + 1)
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            return make_id(self.prefix, next(self._counter))

    def next_block(self, n: int) -> list[str]:
        with self._lock:
            return [make_id(self.prefix, next(self._counter)) for _ in range(n)]
