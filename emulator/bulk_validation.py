"""Bulk API 2.0 CSV semantics: header → per-column converters, value rules and Salesforce's ``sf__Error`` text.

A header is compiled once per job into a :class:`Plan`; each data row is then converted with one call per
column. Conventions (``salesforce_api.md`` §4.13):

* an empty value means "leave the field alone" (:data:`IGNORE`): unchanged on update, unset on insert;
* ``#N/A`` sets the field to null (and is ``REQUIRED_FIELD_MISSING`` for a required field);
* ``Rel.Field`` columns (``Account.ExternalId__c``) name a parent by an indexed field of the parent object;
* a header cell that names no field fails the whole job: ``InvalidBatch : Field name not found : X``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import repeat
from typing import Any, NamedTuple

from .ids import PREFIX, case_safe
from .schema import STAGES, Field, SObject, get_object

IgnoreType = type("Ignore", (), {"__repr__": lambda self: "IGNORE"})
IGNORE: Any = IgnoreType()
NA = "#N/A"
_SPECIAL_VALUES: dict[str, Any] = {"": IGNORE, NA: None}

DELIMITERS = {"BACKQUOTE": "`", "CARET": "^", "COMMA": ",", "PIPE": "|", "SEMICOLON": ";", "TAB": "\t"}
LINE_ENDINGS = {"LF": "\n", "CRLF": "\r\n"}
OPERATIONS = ("insert", "update", "upsert", "delete", "hardDelete")

STAGE_FLAGS = {name: (prob, closed, won) for name, prob, closed, won in STAGES}

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")
_ID = re.compile(r"[a-zA-Z0-9]{15}(?:[a-zA-Z0-9]{3})?")
_DATETIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,3}))?(Z|[+-]\d{2}:?\d{2})?")
_XSD_TYPE = {"currency": "double", "percent": "double", "double": "double", "int": "int", "boolean": "boolean",
             "date": "date", "datetime": "dateTime"}


class RowError(Exception):
    """A row-level failure, rendered as ``CODE:message:Field1,Field2 --`` (or ``CODE:message:--``)."""

    def __init__(self, code: str, message: str, fields: tuple[str, ...] | list[str] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = tuple(fields)

    def text(self) -> str:
        return f"{self.code}:{self.message}:{','.join(self.fields)} --" if self.fields else \
            f"{self.code}:{self.message}:--"


class HeaderError(Exception):
    """The whole job fails; ``str(exc)`` is the job's ``errorMessage``."""


def required_missing(names: list[str]) -> RowError:
    return RowError("REQUIRED_FIELD_MISSING", f"Required fields are missing: [{', '.join(names)}]", names)


def lock_error(parent_ids: list[str], n_records: int) -> RowError:
    """Salesforce names the records it could not lock, ten at most, then how many more."""
    shown = ", ".join(parent_ids[:10])
    more = f", ... ({len(parent_ids) - 10} more)" if len(parent_ids) > 10 else ""
    return RowError("UNABLE_TO_LOCK_ROW",
                    f"unable to obtain exclusive access to this record or {n_records} records: {shown}{more}")


def normalise_id(value: str, prefixes: tuple[str, ...]) -> str | None:
    """The 18-character form of a 15/18-character id with one of ``prefixes``, else ``None``."""
    if not _ID.fullmatch(value) or value[:3] not in prefixes:
        return None
    return case_safe(value[:15]) if len(value) == 15 else value[:15] + value[15:].upper()


def format_datetime(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}+0000"


# -- converters -------------------------------------------------------------------------------------------------
def _type_error(col: int, value: str, f: Field, header: str) -> RowError:
    # Real text: "INVALID_FIELD:Failed to deserialize field at col 0. Due to, '2018-09-28' is not a valid value for
    # the type xsd:dateTime:CreatedDate --" (salesforce_api.md via peers.md [I-snow793]).
    return RowError("INVALID_FIELD", f"Failed to deserialize field at col {col}. Due to, '{value}' is not a valid "
                    f"value for the type xsd:{_XSD_TYPE.get(f.type, 'string')}", (header,))


ColumnFast = Callable[[list[str]], list[Any] | None]
_NUMBER_CHARS = re.compile(r"[0-9.+\-eE]*")  # what a plain number (``_NUMBER``) is made of
_DATE_CHARS = frozenset("0123456789-")


def _fast_text(limit: int, allowed: frozenset[str] | None) -> ColumnFast:
    """All values fit (and are allowed): the column converts to itself without a per-value call."""
    def fast(vals: list[str]) -> list[Any] | None:
        if max(map(len, vals)) > limit:
            return None
        if allowed is not None and not allowed.issuperset(vals):
            return None
        return vals
    return fast


def _fast_number(low: float, high: float, inclusive_high: bool, scale: int) -> ColumnFast:
    # A plain decimal with at most ``scale`` fractional digits parses to a float that round(x, scale) returns
    # unchanged (the nearest double to a decimal d rounds back to d): most columns can skip the rounding.
    more_digits = re.compile(r"[eE]|\.\d{" + str(scale + 1) + "}")

    def fast(vals: list[str]) -> list[Any] | None:
        distinct = set(vals)
        if len(distinct) * 4 > len(vals):
            distinct = vals  # mostly different values: no point in converting each value once
        if not _NUMBER_CHARS.fullmatch("".join(distinct)):
            return None
        try:
            nums = list(map(float, distinct))
        except ValueError:
            return None
        hi, lo = max(nums), min(nums)
        if lo < low or hi > high or (hi == high and not inclusive_high):
            return None
        if more_digits.search(" ".join(distinct)) is not None:  # (spaces: no digit run spans two values)
            nums = list(map(round, nums, repeat(scale, len(nums))))
        if distinct is vals:
            return nums
        number = dict(zip(distinct, nums, strict=True))
        return list(map(number.__getitem__, vals))
    return fast


def _fast_date(vals: list[str]) -> list[Any] | None:
    if min(map(len, vals)) != 10 or max(map(len, vals)) != 10:
        return None
    distinct = set(vals)  # a column has few distinct dates: check each once
    if not _DATE_CHARS.issuperset("".join(distinct)):
        return None
    try:
        # 10 characters of digits and dashes that fromisoformat accepts can only be YYYY-MM-DD.
        for _ in map(date.fromisoformat, distinct):
            pass
    except ValueError:
        return None
    return vals


def _make_fast(f: Field, obj: SObject) -> ColumnFast | None:
    t = f.type
    if t in ("string", "textarea", "email", "phone", "url", "picklist", "combobox", "multipicklist"):
        return _fast_text(f.length or 255, frozenset(f.picklist) if (t == "picklist" and f.restricted) else None)
    if t in ("currency", "percent", "double"):
        bound = 10.0 ** (f.precision - f.scale) if f.precision else float("inf")
        prob = obj.name == "Opportunity" and f.name == "Probability"
        low, high = (0.0, 100.0) if prob else (-bound, bound)
        return _fast_number(low, high, prob, f.scale)
    if t == "date":
        return _fast_date
    return None


def _make_converter(f: Field, col: int, header: str, obj: SObject) -> Callable[[str], Any]:
    label, name = f.label, f.name
    t = f.type
    if t in ("string", "textarea", "email", "phone", "url", "picklist", "combobox", "multipicklist"):
        limit = f.length or 255
        allowed = frozenset(f.picklist) if (t == "picklist" and f.restricted) else None

        def conv_text(v: str) -> str:
            if len(v) > limit:
                raise RowError("STRING_TOO_LONG", f"{label}: data value too large: {v} (max length={limit})", (name,))
            if allowed is not None and v not in allowed:
                raise RowError("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                               f"{label}: bad value for restricted picklist field: {v}", (name,))
            return v
        return conv_text
    if t in ("currency", "percent", "double"):
        scale = f.scale
        bound = 10.0 ** (f.precision - f.scale) if f.precision else float("inf")
        # Opportunity.Probability is a percentage Salesforce keeps between 0 and 100.
        low, high = (0.0, 100.0) if (obj.name == "Opportunity" and name == "Probability") else (-bound, bound)
        inclusive_high = obj.name == "Opportunity" and name == "Probability"

        def conv_number(v: str) -> float:
            if not _NUMBER.fullmatch(v):
                raise _type_error(col, v, f, header)
            x = float(v)
            if x < low or x > high or (x == high and not inclusive_high):
                raise RowError("NUMBER_OUTSIDE_VALID_RANGE",
                               f"{label}: value outside of valid range on numeric field: {v}", (name,))
            return round(x, scale)
        return conv_number
    if t == "int":
        def conv_int(v: str) -> int:
            if not _INTEGER.fullmatch(v):
                raise _type_error(col, v, f, header)
            return int(v)
        return conv_int
    if t == "boolean":
        def conv_bool(v: str) -> int:
            lv = v.lower()
            if lv in ("true", "1"):
                return 1
            if lv in ("false", "0"):
                return 0
            raise _type_error(col, v, f, header)
        return conv_bool
    if t == "date":
        def conv_date(v: str) -> str:
            if len(v) != 10 or v[4] != "-" or v[7] != "-":
                raise _type_error(col, v, f, header)
            try:
                date.fromisoformat(v)
            except ValueError:
                raise _type_error(col, v, f, header) from None
            return v
        return conv_date
    if t == "datetime":
        def conv_datetime(v: str) -> str:
            m = _DATETIME.fullmatch(v)
            if not m:
                raise _type_error(col, v, f, header)
            y, mo, d, h, mi, s, ms, tz = m.groups()
            try:
                dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), int((ms or "0").ljust(3, "0")) * 1000)
            except ValueError:
                raise _type_error(col, v, f, header) from None
            if tz and tz != "Z":
                sign = 1 if tz[0] == "+" else -1
                digits = tz[1:].replace(":", "")
                dt -= sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
            return format_datetime(dt.replace(tzinfo=UTC))
        return conv_datetime
    if t in ("reference", "id"):
        targets = f.reference_to if t == "reference" else (obj.name,)
        prefixes = tuple(PREFIX[o] for o in targets if o in PREFIX)

        def conv_id(v: str) -> str:
            norm = normalise_id(v, prefixes)
            if norm is None:
                raise RowError("MALFORMED_ID", f"{label}: id value of incorrect type: {v}", (name,))
            return norm
        return conv_id
    return lambda v: v


# -- the plan ------------------------------------------------------------------------------------------------------
class Converted(NamedTuple):
    """:meth:`Plan.convert_columns`' result."""

    cols: list[list[Any]]  # converted values per column
    errors: dict[int, RowError]  # row -> its first failure
    raw: list[tuple[str, ...]]  # the values as read, per column
    odd: dict[int, list[str]]  # rows with more or fewer values than the header (blanks in ``raw``)


@dataclass
class Relationship:
    """A ``Rel.Field`` column: the parent is found by ``lookup_field`` on ``target``; the id goes into ``field``."""

    column: int
    header: str
    field: Field
    target: SObject
    lookup_field: Field


@dataclass
class Plan:
    """What one job's header means for the object and operation, compiled once."""

    obj: SObject
    operation: str
    header: list[str]
    key_field: Field | None  # upsert key / Id for update and delete
    key_column: int | None
    write_fields: list[Field] = field(default_factory=list)  # one per column (the reference field for Rel.Field)
    converters: list[Callable[[str], Any]] = field(default_factory=list)
    fast: list[ColumnFast | None] = field(default_factory=list)
    relationships: list[Relationship] = field(default_factory=list)
    reference_columns: list[tuple[int, Field]] = field(default_factory=list)  # direct lookup ids to verify
    not_createable: list[int] = field(default_factory=list)
    not_updateable: list[int] = field(default_factory=list)
    required_on_create: list[Field] = field(default_factory=list)
    non_nillable_columns: list[int] = field(default_factory=list)

    @property
    def ncols(self) -> int:
        return len(self.header)

    def convert_rows(self, rows: list[list[str]]) -> tuple[list[list[Any] | None], dict[int, RowError]]:
        """Convert many rows column by column (C-level fast paths); ``(values per row, errors by row index)``.

        A row's error is its first bad value in header order, as :meth:`convert` reports it.
        """
        ncols = len(self.converters)
        errors: dict[int, RowError] = {}
        good = [i for i, r in enumerate(rows) if len(r) == ncols]
        if len(good) != len(rows):
            for i, r in enumerate(rows):
                if len(r) != ncols:
                    errors[i] = RowError("INVALID_FIELD", f"Row has {len(r)} values but the header has {ncols} "
                                         "columns")
            grows = [rows[i] for i in good]
        else:
            grows = rows
        out: list[list[Any] | None] = [None] * len(rows)
        if not grows:
            return out, errors
        col_errors: dict[int, tuple[int, RowError]] = {}
        converted = []
        for ci, col in enumerate(zip(*grows, strict=True)):
            present = set(col)
            specials = "" in present or NA in present
            if specials:
                idx = [i for i, v in enumerate(col) if v and v != NA]
                vals = [col[i] for i in idx]
            else:
                idx = None
                vals = list(col)
            fast = self.fast[ci]
            res = fast(vals) if (fast is not None and vals) else (vals if not vals else None)
            if res is None:
                conv = self.converters[ci]
                res = []
                for j, v in enumerate(vals):
                    try:
                        res.append(conv(v))
                    except RowError as exc:
                        res.append(IGNORE)
                        ri = idx[j] if idx is not None else j
                        if ri not in col_errors:
                            col_errors[ri] = (ci, exc)
            if idx is not None:
                full: list[Any] = [IGNORE if not v else None for v in col]
                for j, v in zip(idx, res, strict=True):
                    full[j] = v
                res = full
            converted.append(res)
        rows_out = list(map(list, zip(*converted, strict=True)))
        for gi, ri in enumerate(good):
            out[ri] = rows_out[gi]
        for gi, (_, exc) in col_errors.items():
            ri = good[gi]
            out[ri] = None
            errors[ri] = exc
        return out, errors

    def convert_columns(self, rows: list[list[str]]) -> Converted:
        """Like :meth:`convert_rows`, but column by column: the shape the fast path of the engine writes from.

        Returns the converted values per column (a failed row keeps placeholders, ``IGNORE``), the errors by row
        index, the raw values per column and the rows that do not have one value per column (whose raw values are
        blanks)."""
        ncols = len(self.converters)
        errors: dict[int, RowError] = {}
        odd: dict[int, list[str]] = {}
        if not rows:
            return Converted([[] for _ in range(ncols)], errors, [() for _ in range(ncols)], odd)
        if min(map(len, rows)) != ncols or max(map(len, rows)) != ncols:
            blank = [""] * ncols
            fixed = []
            for i, r in enumerate(rows):
                if len(r) != ncols:
                    errors[i] = RowError("INVALID_FIELD", f"Row has {len(r)} values but the header has {ncols} "
                                         "columns")
                    odd[i] = r
                    fixed.append(blank)
                else:
                    fixed.append(r)
            rows = fixed
        raw = list(zip(*rows, strict=True))
        cols: list[list[Any]] = []
        for ci, col in enumerate(raw):
            values, col_errors = self._convert_column(ci, col)
            for ri, exc in col_errors.items():
                if ri not in errors:  # a row's error is its first bad value in header order
                    errors[ri] = exc
            cols.append(values)
        return Converted(cols, errors, raw, odd)

    def _convert_column(self, ci: int, col: Sequence[str]) -> tuple[list[Any], dict[int, RowError]]:
        """One column's values (``IGNORE`` for empty and failed values, ``None`` for ``#N/A``) and its errors."""
        specials = "" in col or NA in col
        vals: Sequence[str] = [v for v in col if v and v != NA] if specials else col
        fast = self.fast[ci]
        res = fast(vals) if (fast is not None and vals) else (vals if not vals else None)
        errs: dict[int, RowError] = {}
        if res is None:
            conv = self.converters[ci]
            where = [i for i, v in enumerate(col) if v and v != NA] if specials else range(len(col))
            res = []
            append = res.append
            for ri, v in zip(where, vals, strict=True):
                try:
                    append(conv(v))
                except RowError as exc:
                    append(IGNORE)
                    errs[ri] = exc
        if not specials:
            return (res if isinstance(res, list) else list(res)), errs
        if res is vals:  # unchanged values: only the special ones map to something else
            return list(map(_SPECIAL_VALUES.get, col, col)), errs
        it = iter(res)
        special = _SPECIAL_VALUES
        return [special[v] if v in special else next(it) for v in col], errs

    def convert(self, row: list[str]) -> list[Any]:
        """Convert one CSV row; raises :class:`RowError` on the first bad value."""
        if len(row) != len(self.converters):
            raise RowError("INVALID_FIELD", f"Row has {len(row)} values but the header has {len(self.converters)} "
                           "columns")
        out = []
        append = out.append
        for conv, v in zip(self.converters, row, strict=True):
            if not v:
                append(IGNORE)
            elif v == NA:
                append(None)
            else:
                append(conv(v))
        return out


def _resolve_column(obj: SObject, raw: str) -> tuple[Field, Relationship | None] | None:
    name = raw
    if "." in name:
        rel_name, _, lookup = name.partition(".")
        if ":" in rel_name:  # polymorphic form "ObjectType:Relationship.Field"
            _, _, rel_name = rel_name.partition(":")
        for f in obj.fields:
            if f.relationship_name and f.relationship_name.lower() == rel_name.lower():
                target = get_object(f.reference_to[0]) if f.reference_to else None
                lf = target.field(lookup) if target else None
                if target is not None and lf is not None and (lf.id_lookup or lf.external_id):
                    return f, Relationship(-1, raw, f, target, lf)
        return None
    f = obj.field(name)
    return (f, None) if f is not None else None


def compile_plan(obj: SObject, operation: str, header: list[str], key_name: str | None) -> Plan:
    """Raises :class:`HeaderError` when the job cannot run at all."""
    key_field = obj.field(key_name) if key_name else None
    if operation in ("update", "delete", "hardDelete"):
        key_field = obj.field("Id")
    plan = Plan(obj, operation, header, key_field, None)
    seen: set[str] = set()
    for i, raw in enumerate(header):
        resolved = _resolve_column(obj, raw)
        if resolved is None:
            raise HeaderError(f"InvalidBatch : Field name not found : {raw}")
        f, rel = resolved
        lowered = raw.lower()
        if lowered in seen:
            raise HeaderError(f"InvalidBatch : Duplicate field name : {raw}")
        seen.add(lowered)
        plan.write_fields.append(f)
        if rel is not None:
            rel.column = i
            plan.relationships.append(rel)
            lf = rel.lookup_field
            limit = lf.length or 255

            def conv_lookup(v: str, _limit: int = limit, _lf: Field = lf, _h: str = raw) -> str:
                if len(v) > _limit:
                    raise RowError("STRING_TOO_LONG", f"{_lf.label}: data value too large: {v} (max length={_limit})",
                                   (_h,))
                return v
            plan.converters.append(conv_lookup)
            plan.fast.append(_fast_text(limit, None))
        else:
            plan.converters.append(_make_converter(f, i, raw, obj))
            plan.fast.append(_make_fast(f, obj))
            if f.type == "reference":
                plan.reference_columns.append((i, f))
        if key_field is not None and rel is None and f.name == key_field.name:
            plan.key_column = i
        is_key_id = f.name == "Id" and key_field is not None and key_field.name == "Id"
        if not f.createable and not is_key_id:
            plan.not_createable.append(i)
        if not f.updateable and not is_key_id and not (key_field is not None and f.name == key_field.name):
            plan.not_updateable.append(i)
        if not f.nillable and f.name != "Id":
            plan.non_nillable_columns.append(i)
    plan.required_on_create = [f for f in obj.fields if f.required_on_create]
    if operation in ("delete", "hardDelete") and plan.key_column is None:
        raise HeaderError("InvalidBatch : Field name not found : Id")
    return plan
