"""Bulk API 2.0 CSV: RFC 4180, UTF-8 without BOM, Salesforce's value formats, chunked by records and bytes.

Value rules (Salesforce "Prepare CSV Files" / "Valid Date Format"):

* ``None`` → ``null_as`` (default ``#N/A``, which *clears* the field); an empty string stays empty, which
  Bulk reads as "leave unchanged";
* dates ``YYYY-MM-DD``; datetimes ISO 8601 in UTC with milliseconds and ``Z`` (naive datetimes are taken as
  UTC); times ``HH:MM:SS.sssZ``;
* numbers in fixed notation (``Decimal``/``float`` never become ``1e+20``); booleans ``true``/``false``;
* a value is quoted when it holds a quote (doubled), the delimiter, CR or LF. The stdlib writer quotes only
  characters of its line terminator, so a lone CR under LF would stay bare and split the record on
  Salesforce's side: under LF the writer's terminator is ``CR U+FFFF LF`` (CR and LF in it make every CR or
  LF in a value quoted), replaced by ``LF`` afterwards — checked by counting, with a row-by-row fallback.

Converters are chosen once per column (from Data Cloud or Salesforce type names when given) and compiled
into one row function; rows are written in batches by the C ``csv`` writer.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import IO, Any

from sf_datacloud_sync.utils.results import csv_delimiter

LINE_TERMINATORS = {"LF": "\n", "CRLF": "\r\n"}
# Under LF: a terminator holding CR (so the C writer quotes values containing CR) that data is unlikely to hold.
_LF_SENTINEL = "\r\uffff\n"
_UTC = dt.UTC

_TEXT = {"varchar", "char", "string", "text", "textarea", "picklist", "multipicklist", "id", "reference", "email",
         "phone", "url", "combobox", "encryptedstring"}
_NUMBER = {"numeric", "decimal", "double", "float", "real", "currency", "percent", "number", "bigint", "integer",
           "int", "smallint", "long", "tinyint"}
_BOOL = {"bool", "boolean"}
_DATE = {"date"}
_DATETIME = {"timestamp", "timestamptz", "datetime", "timestamp with time zone", "timestamp without time zone"}
_TIME = {"time"}


# -- value formatting --------------------------------------------------------------------------------------------
def format_decimal(value: Decimal) -> str:
    """Fixed notation, no exponent (``Decimal('1E+20')`` → ``100000000000000000000``)."""
    if not value.is_finite():
        return str(value)  # NaN/Infinity: Salesforce rejects the row, visibly, instead of us guessing a value
    return format(value, "f")


def format_float(value: float) -> str:
    text = repr(value)
    if "e" in text or "E" in text:
        if text in ("inf", "-inf", "nan"):
            return text
        return format(Decimal(text), "f")
    if text.endswith(".0"):
        return text[:-2]
    return text


def format_datetime(value: dt.datetime) -> str:
    if value.tzinfo is not None:
        value = value.astimezone(_UTC).replace(tzinfo=None)
    return value.isoformat(timespec="milliseconds") + "Z"


def format_time(value: dt.time) -> str:
    return value.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def _datetime_text(value: str) -> str:
    """A timestamp string in Salesforce's form; unparseable text is passed on for Salesforce to judge."""
    if len(value) == 24 and value[10] == "T" and value[19] == "." and value[23] == "Z":
        return value  # already YYYY-MM-DDTHH:MM:SS.sssZ
    try:
        parsed = dt.datetime.fromisoformat(value.replace(" UTC", "+00:00"))
    except ValueError:
        return value
    return format_datetime(parsed)


def _date_text(value: str) -> str:
    if len(value) == 10:
        return value
    try:
        return dt.datetime.fromisoformat(value).date().isoformat()
    except ValueError:
        return value


def _number_text(value: str) -> str:
    if "e" in value or "E" in value:
        try:
            return format_decimal(Decimal(value))
        except ArithmeticError:
            return value
    return value


_BY_TYPE: dict[type, Callable[[Any], str]] = {
    bool: lambda v: "true" if v else "false",
    int: str,
    float: format_float,
    Decimal: format_decimal,
    dt.datetime: format_datetime,
    dt.date: dt.date.isoformat,
    dt.time: format_time,
}


def format_value(value: Any) -> str:
    """Any non-``None`` Python value as Bulk CSV text (dispatch on the exact type, then on subclasses)."""
    cls = value.__class__
    if cls is str:
        return value
    fmt = _BY_TYPE.get(cls)
    if fmt is not None:
        return fmt(value)
    for base, fmt in _BY_TYPE.items():  # subclasses: pendulum/pandas datetimes, IntEnum, ...
        if isinstance(value, base):
            return fmt(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8")
    return str(value)


def _number_value(v: Any) -> str:
    cls = v.__class__
    if cls is float:  # the common case (JSON numbers): repr is the shortest exact form
        text = float.__repr__(v)
        return text if "e" not in text else format_float(v)
    if cls is str:
        return _number_text(v)
    if cls is int:
        return int.__repr__(v)
    return format_value(v)


def _converter(type_name: str | None) -> Callable[[Any], str]:
    """The formatter for one column's non-``None`` values."""
    name = (type_name or "").strip().lower()
    if name.startswith("arrayof"):
        name = ""
    if name in _NUMBER:
        return _number_value
    if name in _BOOL:
        return lambda v: v.lower() if v.__class__ is str else "true" if v else "false"
    if name in _DATE:
        def date_value(v: Any) -> str:
            if v.__class__ is str:
                return _date_text(v)
            if isinstance(v, dt.datetime):
                return (v.astimezone(_UTC) if v.tzinfo else v).date().isoformat()
            return format_value(v)
        return date_value
    if name in _DATETIME:
        def datetime_value(v: Any) -> str:
            if v.__class__ is str:
                return _datetime_text(v)
            if isinstance(v, dt.date) and not isinstance(v, dt.datetime):
                return v.isoformat() + "T00:00:00.000Z"
            return format_value(v)
        return datetime_value
    if name in _TIME:
        return lambda v: v if v.__class__ is str else format_value(v)
    return format_value


def compile_row_converter(column_types: Sequence[str | None], null_as: str) -> Callable[[Sequence[Any]], tuple]:
    """One function turning a row into a tuple of CSV strings, specialised for these columns.

    Generated source keeps the per-value work inline (a ``None`` test and a type test for text columns) —
    the hot loop of a million-row transfer — the way ``collections.namedtuple`` generates its class.
    """
    n = len(column_types)
    if n == 0:
        raise ValueError("a CSV needs at least one column")
    names = {"N": null_as, "_fmt": format_value}
    parts = []
    for i, type_name in enumerate(column_types):
        if (type_name or "").strip().lower() in _TEXT:
            parts.append(f"N if v{i} is None else v{i} if v{i}.__class__ is str else _fmt(v{i})")
        else:
            names[f"c{i}"] = _converter(type_name)
            parts.append(f"N if v{i} is None else c{i}(v{i})")
    unpack = ", ".join(f"v{i}" for i in range(n)) + ("," if n == 1 else "")
    source = (f"def convert(row):\n    {unpack} = row\n    return (" + ", ".join(parts) + ("," if n == 1 else "")
              + ")\n")
    exec(source, names)  # noqa: S102 - generated from column positions only, never from data
    return names["convert"]  # type: ignore[return-value]


# -- encoder ----------------------------------------------------------------------------------------------------
class CsvEncoder:
    """Encode rows as Bulk API 2.0 CSV bytes.

    :param header: Salesforce field names (the header row), in row order.
    :param column_types: A type name per column (Data Cloud ``Varchar``/``Numeric``/``Date``/``TimestampTZ``/
        ``Bool``..., or Salesforce describe types); ``None`` → choose by each value's Python type.
    :param null_as: Text for ``None`` (``#N/A`` clears the field; ``""`` leaves it unchanged).
    :param line_ending: ``LF`` or ``CRLF`` (the job's ``lineEnding``).
    :param delimiter: Bulk ``columnDelimiter`` name (``COMMA``, ``TAB``, ``PIPE``, ``SEMICOLON``, ``CARET``,
        ``BACKQUOTE``).
    """

    def __init__(self, header: Sequence[str], column_types: Sequence[str | None] | None = None, *,
                 null_as: str = "#N/A", line_ending: str = "LF", delimiter: str = "COMMA") -> None:
        if line_ending not in LINE_TERMINATORS:
            raise ValueError(f"line_ending must be LF or CRLF; got {line_ending!r}")
        if not header:
            raise ValueError("the header needs at least one column")
        if column_types is not None and len(column_types) != len(header):
            raise ValueError(f"{len(column_types)} column types for {len(header)} header columns")
        self.header = list(header)
        self.width = len(self.header)
        self.line_ending = line_ending
        self.delimiter = csv_delimiter(delimiter)
        self._terminator = LINE_TERMINATORS[line_ending]
        self._convert = compile_row_converter(list(column_types or [None] * self.width), null_as)
        self._text = io.StringIO()
        writer_terminator = _LF_SENTINEL if line_ending == "LF" else self._terminator
        self._writer = csv.writer(self._text, delimiter=self.delimiter, quotechar='"', lineterminator=writer_terminator,
                                  quoting=csv.QUOTE_MINIMAL, doublequote=True, strict=True)
        self.header_bytes = self._utf8(self._text_of([tuple(self.header)]))

    def convert(self, row: Sequence[Any]) -> tuple:
        """The CSV strings of one row."""
        if len(row) != self.width:
            raise ValueError(f"row has {len(row)} values for {self.width} columns: {self.header}")
        return self._convert(row)

    def encode_rows(self, rows: Sequence[Sequence[Any]]) -> bytes:
        """UTF-8 CSV lines for ``rows`` (no header)."""
        try:
            converted = list(map(self._convert, rows))
        except ValueError:
            converted = [self.convert(r) for r in rows]  # names the problem if it is a row of the wrong width
        return self._utf8(self._text_of(converted))

    def _text_of(self, rows: Sequence[Sequence[Any]]) -> str:
        self._writer.writerows(rows)
        text = self._text.getvalue()
        self._text.seek(0)
        self._text.truncate()
        if self._terminator == "\n":
            if text.count(_LF_SENTINEL) == len(rows):
                text = text.replace(_LF_SENTINEL, "\n")
            else:  # a value holds the sentinel sequence itself: place the terminators row by row
                text = "".join(self._line(row) for row in rows)
        return text

    @staticmethod
    def _utf8(text: str) -> bytes:
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate from upstream JSON: replace it rather than lose the whole job.
            return text.encode("utf-8", "replace")

    def _line(self, row: Sequence[str]) -> str:
        self._writer.writerow(row)
        line = self._text.getvalue()
        self._text.seek(0)
        self._text.truncate()
        return line[: -len(_LF_SENTINEL)] + "\n"


# -- chunking ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CsvChunk:
    """One job's CSV: header + ``records`` rows, ``nbytes`` bytes (never more than the chunker's ``max_bytes``).

    ``data`` is ``bytes``, or a spooled temporary file positioned at 0 when the chunker spools.
    ``first_key``/``last_key`` are the keys of the first and last row, in input order.
    """

    data: bytes | IO[bytes]
    records: int
    first_key: Any
    last_key: Any
    nbytes: int


class _ChunkBuilder:
    def __init__(self, header: bytes, spool_threshold: int | None) -> None:
        self.header = header
        self.spool_threshold = spool_threshold
        self._reset()

    def _reset(self) -> None:
        self.parts: list[bytes] = []
        self.file: IO[bytes] | None = None
        if self.spool_threshold is not None:
            self.file = tempfile.SpooledTemporaryFile(max_size=self.spool_threshold)  # noqa: SIM115
            self.file.write(self.header)
        else:
            self.parts.append(self.header)
        self.nbytes = len(self.header)
        self.records = 0
        self.first_key: Any = None
        self.last_key: Any = None

    def add(self, data: bytes, records: int, first_key: Any, last_key: Any) -> None:
        if self.file is not None:
            self.file.write(data)
        else:
            self.parts.append(data)
        if self.records == 0:
            self.first_key = first_key
        self.last_key = last_key
        self.records += records
        self.nbytes += len(data)

    def take(self) -> CsvChunk:
        if self.file is not None:
            self.file.seek(0)
            data: bytes | IO[bytes] = self.file
        else:
            data = b"".join(self.parts)
        chunk = CsvChunk(data, self.records, self.first_key, self.last_key, self.nbytes)
        self._reset()
        return chunk


def _extend_equal_keys(chunk: _ChunkBuilder, source: Iterator[Sequence[Any]], encoder: CsvEncoder,
                       key_func: Callable[[Sequence[Any]], Any], max_records: int,
                       max_bytes: int) -> list[Sequence[Any]]:
    """Add the rows that share the full chunk's last key, so that no chunk ends inside a run of equal keys.

    A resume continues "after the last key" of the last uploaded chunk: a run of equal keys (duplicate external
    ids, NULL keys of one Account) cut in two would lose its second half. A run longer than another
    ``max_records`` rows, or one that would pass ``max_bytes``, is still cut (the chunk must stay bounded).
    :return: the row read past the run (the next chunk's first), if any.
    """
    for row in source:
        key = key_func(row)
        line = encoder.encode_rows([row]) if key == chunk.last_key else b""
        if not line or chunk.records >= 2 * max_records or chunk.nbytes + len(line) > max_bytes:
            return [row]
        chunk.add(line, 1, key, key)
    return []


def iter_chunks(rows: Iterable[Sequence[Any]], header: Sequence[str], max_records: int, max_bytes: int,
                key_index: int | None = None, key_func: Callable[[Sequence[Any]], Any] | None = None, *,
                column_types: Sequence[str | None] | None = None, null_as: str = "#N/A", line_ending: str = "LF",
                delimiter: str = "COMMA", batch_rows: int = 2_000,
                spool_threshold: int | None = None) -> Iterator[CsvChunk]:
    """Split ``rows`` into Bulk API 2.0 CSV chunks of at most ``max_records`` rows and ``max_bytes`` bytes.

    Rows keep their order; each chunk repeats the header (counted in ``max_bytes``). Rows are read lazily,
    so only the chunk being built is held. With a key (``key_index``/``key_func``) a chunk does not end between
    two rows with the same key: it takes the rest of that run, up to ``2 × max_records`` rows (see
    :func:`_extend_equal_keys`).

    :param rows: Row tuples in ``header`` order.
    :param header: Salesforce field names.
    :param max_records: Most rows per chunk.
    :param max_bytes: Most bytes per chunk, header included (Bulk API 2.0 accepts 100,000,000 per job).
    :param key_index: Position of the key column (for ``first_key``/``last_key``).
    :param key_func: Or a function computing a row's key.
    :param column_types: Type name per column, see :class:`CsvEncoder`.
    :param null_as: Text written for ``None``.
    :param line_ending: ``LF`` or ``CRLF``.
    :param delimiter: Bulk ``columnDelimiter`` name.
    :param batch_rows: Rows encoded per writer call (speed only; chunk limits stay exact).
    :param spool_threshold: When set, chunks are built in a ``SpooledTemporaryFile`` that moves to disk above
        this many bytes, and ``CsvChunk.data`` is that file.
    """
    if max_records < 1:
        raise ValueError("max_records must be at least 1")
    encoder = _chunk_encoder(header, column_types, max_bytes, null_as=null_as, line_ending=line_ending,
                             delimiter=delimiter)
    keyed = key_func is not None or key_index is not None
    if key_func is None:
        key_func = (lambda row: row[key_index]) if key_index is not None else (lambda row: None)
    chunk = _ChunkBuilder(encoder.header_bytes, spool_threshold)
    source = iter(rows)
    pending: list[Sequence[Any]] = []  # a row read ahead by _extend_equal_keys (never a chain of iterators)
    while True:
        batch = pending + list(itertools.islice(source, min(batch_rows, max_records - chunk.records) - len(pending)))
        pending = []
        if not batch:
            break
        for data, n, first, last in _fitting(encoder, batch, key_func, chunk, max_bytes):
            if data is None:
                yield chunk.take()
            else:
                chunk.add(data, n, first, last)
        if chunk.records >= max_records:
            if keyed:
                pending = _extend_equal_keys(chunk, source, encoder, key_func, max_records, max_bytes)
            yield chunk.take()
    if chunk.records:
        yield chunk.take()


@dataclass
class Lane:
    """One serial partition's rows as :func:`iter_lane_chunks` takes them.

    :param rows: Row tuples in header order, in the partition's key order.
    :param key_func: A row's key (its position in the partition).
    :param position: The key of the last row already sent (``None``: none yet); moves as rows are taken.
    :param sent: Rows already sent; grows as rows are taken.
    :param expected: Rows the lane is expected to hold in all (orders the lanes of a step; never trusted for counts).
    """

    rows: Iterable[Sequence[Any]]
    key_func: Callable[[Sequence[Any]], Any]
    position: Any = None
    sent: int = 0
    expected: int = 0

    @property
    def mark(self) -> dict[str, Any]:
        """Where the lane resumes: ``{"after": key, "sent": rows}``."""
        return {"after": self.position, "sent": self.sent}


def iter_lane_chunks(lanes: Sequence[Lane], header: Sequence[str], batch_records: int, max_bytes: int, *,
                     column_types: Sequence[str | None] | None = None, null_as: str = "#N/A",
                     line_ending: str = "LF", delimiter: str = "COMMA", batch_rows: int = 2_000,
                     spool_threshold: int | None = None) -> Iterator[CsvChunk]:
    """One chunk per step of several serial partitions: up to ``batch_records`` rows of each lane, one after the other.

    Salesforce cuts a job's CSV into internal batches of 10,000 records in file order and runs them side by side. With
    ``batch_records`` that size, each lane's rows of a step are one batch of their own, so two batches of one lane
    never run at once (they are in consecutive jobs, which the caller paces). Lanes expected to fill a whole batch
    come first: a lane that ends within a step can only push the ones after it across a batch boundary, and those
    are the other lanes ending in the same step (their few rows in a neighbouring batch may wait for a row lock).

    A chunk's ``first_key`` and ``last_key`` are the list of every lane's :attr:`Lane.mark` after its first and last
    rows: where each lane resumes once the chunk is at Salesforce. A step over ``max_bytes`` is cut where it
    reaches it and goes on in the next chunk.
    """
    if batch_records < 1:
        raise ValueError("batch_records must be at least 1")
    encoder = _chunk_encoder(header, column_types, max_bytes, null_as=null_as, line_ending=line_ending,
                             delimiter=delimiter)
    sources = [iter(lane.rows) for lane in lanes]
    live = list(range(len(lanes)))
    chunk = _ChunkBuilder(encoder.header_bytes, spool_threshold)
    while live:
        left = {i: lanes[i].expected - lanes[i].sent for i in live}
        for i in sorted(live, key=lambda i: (left[i] < batch_records, -left[i], i)):
            lane, taken = lanes[i], 0
            while taken < batch_records:
                rows = list(itertools.islice(sources[i], min(batch_rows, batch_records - taken)))
                if not rows:
                    live.remove(i)
                    break
                taken += len(rows)
                for data, n, _, last in _fitting(encoder, rows, lane.key_func, chunk, max_bytes):
                    if data is None:
                        yield chunk.take()
                        continue
                    lane.position = last
                    lane.sent += n
                    marks = [x.mark for x in lanes]
                    chunk.add(data, n, marks, marks)
        if chunk.records:
            yield chunk.take()


def _chunk_encoder(header: Sequence[str], column_types: Sequence[str | None] | None, max_bytes: int,
                   **options: Any) -> CsvEncoder:
    encoder = CsvEncoder(header, column_types, **options)
    if len(encoder.header_bytes) >= max_bytes:
        raise ValueError(f"the header alone ({len(encoder.header_bytes)} bytes) does not fit in max_bytes={max_bytes}")
    return encoder


def _fitting(encoder: CsvEncoder, rows: list[Sequence[Any]], key_func: Callable[[Sequence[Any]], Any],
             chunk: _ChunkBuilder, max_bytes: int) -> Iterator[tuple[bytes | None, int, Any, Any]]:
    """``rows`` as encoded pieces ``(data, rows, first key, last key)`` that fit the chunk; ``(None, 0, None, None)``
    where the chunk is full and must be taken first."""
    data = encoder.encode_rows(rows)
    if chunk.nbytes + len(data) <= max_bytes:
        yield data, len(rows), key_func(rows[0]), key_func(rows[-1])
        return
    for row in rows:  # the rows would overflow the byte limit: place them one by one (once per chunk at most)
        line = encoder.encode_rows([row])
        if chunk.nbytes + len(line) > max_bytes:
            if len(encoder.header_bytes) + len(line) > max_bytes:
                raise ValueError(f"a row of {len(line)} bytes (key {key_func(row)!r}) does not fit in "
                                 f"max_bytes={max_bytes} with the header")
            yield None, 0, None, None
        key = key_func(row)
        yield line, 1, key, key
