"""Bulk API 2.0 result files: streaming RFC 4180 parsing and the ``sf__Error`` format.

Result CSVs (``successfulResults``, ``failedResults``, ``unprocessedrecords``) can be as large as the job and
carry multi-line values (an ``sf__Error`` message, a description with line breaks), so they are parsed as a
stream with a real CSV reader, never split on newlines.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from typing import IO, NamedTuple

# Salesforce fields hold up to 131,072 characters; error texts add to that. The stdlib default is 131,072.
_FIELD_LIMIT = 16 * 1024 * 1024
_TRAILER = re.compile(r"\s*--\s*$")

DELIMITERS = {"COMMA": ",", "TAB": "\t", "PIPE": "|", "SEMICOLON": ";", "CARET": "^", "BACKQUOTE": "`"}


class SfError(NamedTuple):
    """One ``sf__Error`` value split into its parts."""

    code: str
    message: str
    fields: list[str]


def parse_sf_error(value: str) -> SfError:
    """Split ``"CODE:message:Field1,Field2 --"`` into ``(code, message, fields)``.

    The message may itself contain colons and line breaks; the field list is what follows the last colon
    before the closing ``--``. A value not in that shape comes back as ``("", value, [])``.

    >>> parse_sf_error("REQUIRED_FIELD_MISSING:Required fields are missing: [Name]:Name --")
    SfError(code='REQUIRED_FIELD_MISSING', message='Required fields are missing: [Name]', fields=['Name'])
    """
    text = value.strip()
    code, sep, rest = text.partition(":")
    if not sep or not code or not re.fullmatch(r"[A-Za-z0-9_]+", code):
        return SfError("", text, [])
    trailer = _TRAILER.search(rest)
    if trailer is None:
        return SfError(code, rest.strip(), [])
    body = rest[: trailer.start()]
    message, sep, fields = body.rpartition(":")
    if not sep:  # "CODE:message --" without a field part
        return SfError(code, body.strip(), [])
    return SfError(code, message.strip(), [f.strip() for f in fields.split(",") if f.strip()])


def csv_delimiter(column_delimiter: str) -> str:
    """The character of a Bulk API ``columnDelimiter`` name (``COMMA`` → ``,``)."""
    try:
        return DELIMITERS[column_delimiter.upper()]
    except KeyError:
        raise ValueError(f"column delimiter must be one of {', '.join(DELIMITERS)}; got {column_delimiter!r}") \
            from None


class ChunkStream(io.RawIOBase):
    """A readable binary stream over an iterator of byte chunks (e.g. ``requests``' ``iter_content``)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:  # type: ignore[override]
        while not self._buf:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._buf = memoryview(chunk)
        n = min(len(target), len(self._buf))
        target[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def iter_csv_records(stream: IO[bytes], delimiter: str = ",") -> Iterator[dict[str, str]]:
    """Rows of a UTF-8 CSV byte stream as dicts keyed by the header, read incrementally.

    A UTF-8 byte-order mark before the header is dropped (it would otherwise stick to the first column name).
    An empty stream yields nothing.
    """
    if csv.field_size_limit() < _FIELD_LIMIT:
        csv.field_size_limit(_FIELD_LIMIT)
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")  # type: ignore[arg-type]
    try:
        reader = csv.reader(text, delimiter=delimiter, strict=False)
        header = next(reader, None)
        if header is None:
            return
        width = len(header)
        for row in reader:
            if not row:
                continue
            if len(row) != width:  # never pair values with the wrong column names
                raise ValueError(f"CSV record on line {reader.line_num} has {len(row)} values for {width} columns")
            yield dict(zip(header, row, strict=True))
    finally:
        text.detach()
