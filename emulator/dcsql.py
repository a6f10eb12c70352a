"""Data 360 SQL (Hyper, PostgreSQL dialect) on SQLite: translation, parameter binding and error mapping.

The Data Cloud query APIs run PostgreSQL-flavoured SQL. This module rewrites the subset a Data Cloud reader needs
into SQLite and reports errors the way Hyper words them:

* identifiers: ``"Quoted"`` names are exact-case (a wrong case is an error, as in Hyper), unquoted names resolve
  case-insensitively and are echoed as written; quoted names are emitted as SQLite back-quoted identifiers because
  SQLite would silently read an unknown ``"name"`` as a string literal;
* ``:name`` placeholders are bound as SQLite named parameters, typed by ``sqlParameters`` (values never enter the
  SQL text);
* ``ORDER BY`` gets PostgreSQL's NULL placement (NULLS LAST for ASC, FIRST for DESC) wherever no NULLS is given;
* ``LIMIT ALL``, ``OFFSET n ROWS``, ``FETCH FIRST n ROWS ONLY``, ``x::type``, ``CAST(x AS type)``, ``ILIKE``,
  ``IS [NOT] DISTINCT FROM``, ``MOD``, ``percentile_disc/percentile_cont ... WITHIN GROUP (ORDER BY ...)``,
  ``generate_series(a, b[, step])`` in FROM and a few PostgreSQL string functions;
* only read-only single statements run: the DMO connection is opened ``mode=ro`` and an authorizer allows
  nothing but reads of the Data Cloud tables.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from .schema import DMO_COLUMNS, DMO_NAME

# Tables a query may read: name -> {column: Data Cloud type}.
CATALOG: dict[str, dict[str, str]] = {DMO_NAME: dict(DMO_COLUMNS)}
# Data Cloud "Number" fields are decimal(38, 18): the v2 API prints them with 18 decimals.
NUMERIC_PRECISION = 38
NUMERIC_SCALE = 18
# The timestamp format the DMO stores (``seed.py``); TimestampTZ parameters are normalised to it so that text
# comparison orders correctly.
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.{ms}Z"

_KNOWN_NAMES = set(CATALOG) | {c for cols in CATALOG.values() for c in cols}
_KNOWN_LOWER = {n.lower(): n for n in _KNOWN_NAMES}
_TABLES_LOWER = {t.lower() for t in CATALOG}


class SqlError(Exception):
    """A query the engine rejects; rendered as ``{"errorMessage", "customerDetail", "customerHint"}``."""

    def __init__(self, message: str, detail: str = "", hint: str = "", sqlstate: str = "42601") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint
        self.sqlstate = sqlstate

    def details(self) -> dict[str, str]:
        return {"errorMessage": self.message, "customerDetail": self.detail, "customerHint": self.hint}


# -- tokens --------------------------------------------------------------------------------------------------------

@dataclass
class Tok:
    kind: str  # ident, qident, str, num, param, op, punct, alias (generated), raw (generated SQLite text)
    text: str

    @property
    def upper(self) -> str:
        return self.text.upper() if self.kind == "ident" else ""

    def is_kw(self, *words: str) -> bool:
        return self.kind == "ident" and self.text.upper() in words


_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>--[^\n]*|/\*.*?\*/)
  | (?P<estr>[eE]'(?:[^'\\]|\\.|'')*')
  | (?P<str>'(?:[^']|'')*')
  | (?P<qident>"(?:[^"]|"")+")
  | (?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<op>::|<=|>=|<>|!=|\|\||[-+*/%<>=])
  | (?P<param>:[A-Za-z_][A-Za-z0-9_]*)
  | (?P<ident>[A-Za-z_\u0080-\uffff][A-Za-z0-9_$\u0080-\uffff]*)
  | (?P<punct>[(),;.])
""", re.S | re.X)

_E_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "\\": "\\", "'": "'", '"': '"'}


def tokenize(sql: str) -> list[Tok]:
    """Significant tokens of ``sql`` (whitespace and comments dropped)."""
    out: list[Tok] = []
    pos = 0
    n = len(sql)
    while pos < n:
        m = _TOKEN_RE.match(sql, pos)
        if m is None:
            ch = sql[pos]
            if ch in "'\"" or sql.startswith("/*", pos):
                what = {"'": "quoted string", '"': "quoted identifier"}.get(ch, "/* comment")
                raise SqlError(f"unterminated {what} at or near \"{sql[pos:pos + 20]}\"", sqlstate="42601")
            raise SqlError(f'syntax error at or near "{ch}"', sqlstate="42601")
        kind = m.lastgroup or ""
        text = m.group()
        pos = m.end()
        if kind in ("ws", "comment"):
            continue
        if kind == "estr":  # PostgreSQL escape string: decode the backslash escapes into a plain literal
            body = text[2:-1].replace("''", "'")
            body = re.sub(r"\\(.)", lambda e: _E_ESCAPES.get(e.group(1), e.group(1)), body)
            kind, text = "str", "'" + body.replace("'", "''") + "'"
        out.append(Tok(kind, text))
    return out


def _unquote(tok: Tok) -> str:
    return tok.text[1:-1].replace('""', '"') if tok.kind == "qident" else tok.text


def _backquote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _render(toks: Iterable[Tok]) -> str:
    parts: list[str] = []
    for t in toks:
        if t.kind == "qident":
            parts.append(_backquote(_unquote(t)))
        elif t.kind == "alias":
            parts.append(_backquote(t.text))
        else:
            parts.append(t.text)
    return " ".join(parts)


def _match_paren(toks: list[Tok], i: int) -> int:
    """Index of the ``)`` closing the ``(`` at ``i``."""
    depth = 0
    for j in range(i, len(toks)):
        t = toks[j]
        if t.kind == "punct":
            if t.text == "(":
                depth += 1
            elif t.text == ")":
                depth -= 1
                if depth == 0:
                    return j
    raise SqlError("syntax error at end of input", hint="Check for an unbalanced parenthesis.")


def _split_commas(toks: list[Tok]) -> list[list[Tok]]:
    """Split at commas outside parentheses."""
    parts: list[list[Tok]] = [[]]
    depth = 0
    for t in toks:
        if t.kind == "punct" and t.text == "(":
            depth += 1
        elif t.kind == "punct" and t.text == ")":
            depth -= 1
        if depth == 0 and t.kind == "punct" and t.text == ",":
            parts.append([])
        else:
            parts[-1].append(t)
    return parts


def _join_commas(parts: list[list[Tok]]) -> list[Tok]:
    out: list[Tok] = []
    for k, p in enumerate(parts):
        if k:
            out.append(Tok("punct", ","))
        out.extend(p)
    return out


# -- statement checks ----------------------------------------------------------------------------------------------

_WRITE_WORDS = {"INSERT", "UPDATE", "DELETE", "MERGE", "CREATE", "DROP", "ALTER", "TRUNCATE", "GRANT", "REVOKE",
                "COPY", "REPLACE", "UPSERT", "ATTACH", "DETACH", "PRAGMA", "VACUUM", "ANALYZE", "REINDEX", "BEGIN",
                "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "SET", "RESET", "EXPLAIN", "CALL", "DO", "LOCK",
                "COMMENT", "REFRESH", "SHOW", "LISTEN", "NOTIFY", "DISCARD", "PREPARE", "EXECUTE", "DEALLOCATE"}


def _check_statement(toks: list[Tok]) -> list[Tok]:
    """One read-only statement, without its trailing semicolons."""
    while toks and toks[-1].kind == "punct" and toks[-1].text == ";":
        toks = toks[:-1]
    if not toks:
        raise SqlError("syntax error at end of input", detail="The query is empty.", sqlstate="42601")
    if any(t.kind == "punct" and t.text == ";" for t in toks):
        raise SqlError("cannot insert multiple commands into a prepared statement",
                       hint="Send one SELECT statement per query.", sqlstate="42601")
    first = toks[0]
    if first.kind == "ident" and first.upper in _WRITE_WORDS:
        raise _read_only(first.upper)
    if not (first.is_kw("SELECT", "WITH", "VALUES") or (first.kind == "punct" and first.text == "(")):
        raise SqlError(f'syntax error at or near "{first.text}"', sqlstate="42601")
    depth = 0
    for t in toks:  # WITH x AS (...) DELETE ... : the statement after the CTEs must read only, too
        if t.kind == "punct" and t.text in "()":
            depth += 1 if t.text == "(" else -1
        elif depth == 0 and t.kind == "ident" and t.upper in ("INSERT", "UPDATE", "DELETE", "MERGE"):
            raise _read_only(t.upper)
    return toks


def _read_only(word: str) -> SqlError:
    return SqlError(f"cannot execute {word} in a read-only transaction",
                    detail="The Data Cloud query APIs only run SELECT statements.",
                    hint="Use the Data Cloud ingestion APIs to change data.", sqlstate="25006")


# -- types ---------------------------------------------------------------------------------------------------------

# PostgreSQL type name -> (Data Cloud type, SQLite rendering of CAST(x AS that type); "{}" is x)
_CASTS: dict[str, tuple[str, str]] = {
    "text": ("Varchar", "CAST({} AS TEXT)"), "varchar": ("Varchar", "CAST({} AS TEXT)"),
    "char": ("Char", "CAST({} AS TEXT)"), "character": ("Char", "CAST({} AS TEXT)"),
    "bpchar": ("Char", "CAST({} AS TEXT)"), "string": ("Varchar", "CAST({} AS TEXT)"),
    "character varying": ("Varchar", "CAST({} AS TEXT)"),
    "int": ("Integer", "CAST({} AS INTEGER)"), "integer": ("Integer", "CAST({} AS INTEGER)"),
    "int4": ("Integer", "CAST({} AS INTEGER)"), "smallint": ("SmallInt", "CAST({} AS INTEGER)"),
    "int2": ("SmallInt", "CAST({} AS INTEGER)"), "bigint": ("BigInt", "CAST({} AS INTEGER)"),
    "int8": ("BigInt", "CAST({} AS INTEGER)"),
    "numeric": ("Numeric", "CAST({} AS REAL)"), "decimal": ("Numeric", "CAST({} AS REAL)"),
    "double precision": ("Double", "CAST({} AS REAL)"), "double": ("Double", "CAST({} AS REAL)"),
    "float8": ("Double", "CAST({} AS REAL)"), "float": ("Double", "CAST({} AS REAL)"),
    "real": ("Float", "CAST({} AS REAL)"), "float4": ("Float", "CAST({} AS REAL)"),
    "bool": ("Boolean", "__dc_bool({})"), "boolean": ("Boolean", "__dc_bool({})"),
    "date": ("Date", "__dc_date({})"),
    "timestamp": ("Timestamp", "__dc_timestamp({})"),
    "timestamp without time zone": ("Timestamp", "__dc_timestamp({})"),
    "timestamptz": ("TimestampTZ", "__dc_timestamp({})"),
    "timestamp with time zone": ("TimestampTZ", "__dc_timestamp({})"),
    "time": ("Time", "CAST({} AS TEXT)"),
}


def _parse_type(toks: list[Tok], i: int) -> tuple[str, int, tuple[int, int] | None]:
    """Parse a type name starting at ``i``: ``(canonical name, next index, (precision, scale) or None)``."""
    if i >= len(toks) or toks[i].kind not in ("ident", "qident"):
        raise SqlError("syntax error at end of input" if i >= len(toks)
                       else f'syntax error at or near "{toks[i].text}"')
    words = [_unquote(toks[i]).lower()]
    j = i + 1
    if words[0] == "double" and j < len(toks) and toks[j].is_kw("PRECISION"):
        words.append("precision")
        j += 1
    if words[0] == "character" and j < len(toks) and toks[j].is_kw("VARYING"):
        words.append("varying")
        j += 1
    size: tuple[int, int] | None = None
    if j < len(toks) and toks[j].kind == "punct" and toks[j].text == "(":
        end = _match_paren(toks, j)
        nums = [int(t.text) for t in toks[j + 1:end] if t.kind == "num" and t.text.isdigit()]
        size = (nums[0], nums[1] if len(nums) > 1 else 0) if nums else None
        j = end + 1
    if words[0] == "timestamp" and j + 2 < len(toks) and toks[j].is_kw("WITH", "WITHOUT") \
            and toks[j + 1].is_kw("TIME") and toks[j + 2].is_kw("ZONE"):
        words += [toks[j].text.lower(), "time", "zone"]
        j += 3
    if j < len(toks) and toks[j].kind == "punct" and toks[j].text == "[":  # pragma: no cover - tokenizer rejects [
        raise SqlError("array types are not supported")
    name = " ".join(words)
    if name not in _CASTS:
        raise SqlError(f'type "{name}" does not exist', sqlstate="42704")
    return name, j, size


def _cast_type(name: str, size: tuple[int, int] | None) -> ColumnType:
    dc_type = _CASTS[name][0]
    if dc_type == "Numeric":
        p, s = size if size else (NUMERIC_PRECISION, NUMERIC_SCALE)
        return ColumnType("Numeric", p, s)
    return ColumnType(dc_type)


@dataclass(frozen=True)
class ColumnType:
    name: str
    precision: int | None = None
    scale: int | None = None


def column_type(dc_type: str) -> ColumnType:
    if dc_type == "Numeric":
        return ColumnType("Numeric", NUMERIC_PRECISION, NUMERIC_SCALE)
    return ColumnType(dc_type)


@dataclass
class OutputColumn:
    name: str
    type: ColumnType | None  # None: decided from the data


@dataclass
class Translation:
    """The SQLite form of one query and what is known about its result columns."""

    sql: str
    bindings: dict[str, Any]
    columns: list[OutputColumn] | None  # None when the select list has ``*`` or is not a plain SELECT
    tables: set[str] = field(default_factory=set)
    star_table: str | None = None  # ``SELECT * FROM <table> ...`` without subqueries: columns are the table's
    # Plain column lists (or ``*``) over one FROM: (SQL of each column, everything from FROM on) so the execution
    # can put json_array straight into the SELECT, which is much cheaper than wrapping the query.
    direct: tuple[list[str], str] | None = None

    def column_types(self, names: list[str]) -> list[ColumnType | None]:
        """The known type of each result column (None: decided from the data)."""
        if self.columns is not None:
            return [c.type for c in self.columns]
        cols = CATALOG.get(self.star_table or "", {})
        return [column_type(cols[n]) if n in cols else None for n in names]


# -- parameters ----------------------------------------------------------------------------------------------------

_PARAM_TYPES = {t.lower(): t for t in ("BigInt", "Bool", "Boolean", "Char", "Date", "Double", "Float", "Integer",
                                        "Numeric", "Oid", "SmallInt", "Time", "Timestamp", "TimestampTZ",
                                        "Unspecified", "Varchar", "Decimal", "String", "Text")}


def format_timestamp(dt: datetime) -> str:
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC)
    return dt.strftime(TIMESTAMP_FORMAT.format(ms=f"{dt.microsecond // 1000:03d}"))


def _invalid(type_name: str, value: Any) -> SqlError:
    return SqlError(f'invalid input syntax for type {type_name.lower()}: "{value}"', sqlstate="22P02",
                    hint="Check the value and type of the entry in sqlParameters.")


def convert_parameter(type_name: str | None, value: Any) -> Any:
    """The SQLite value of one ``sqlParameters`` entry (``value`` is documented as a string; JSON scalars too)."""
    if value is None:
        return None
    canon = _PARAM_TYPES.get((type_name or "Unspecified").lower())
    if canon is None:
        if (type_name or "").lower().startswith("arrayof"):
            raise SqlError(f"parameter type {type_name} is not supported by this emulator", sqlstate="0A000")
        raise SqlError(f'type "{type_name}" does not exist', sqlstate="42704")
    if canon == "Unspecified":
        if isinstance(value, bool):
            return int(value)
        return value if isinstance(value, (int, float)) else str(value)
    if canon in ("Varchar", "Char", "String", "Text", "Time"):
        return value if isinstance(value, str) else json.dumps(value)
    if canon in ("Integer", "BigInt", "SmallInt", "Oid"):
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise _invalid(canon, value)
        try:
            return int(value) if isinstance(value, (int, float)) else int(str(value).strip())
        except ValueError:
            raise _invalid(canon, value) from None
    if canon in ("Numeric", "Decimal", "Double", "Float"):
        if isinstance(value, bool):
            raise _invalid(canon, value)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise _invalid(canon, value) from None
        if math.isnan(number) or math.isinf(number):
            raise _invalid(canon, value)
        return number
    if canon in ("Bool", "Boolean"):
        if isinstance(value, bool):
            return int(value)
        text = str(value).strip().lower()
        if text in ("t", "true", "1", "yes", "y", "on"):
            return 1
        if text in ("f", "false", "0", "no", "n", "off"):
            return 0
        raise _invalid("boolean", value)
    if canon == "Date":
        try:
            return date.fromisoformat(str(value).strip()[:10]).isoformat()
        except ValueError:
            raise _invalid("date", value) from None
    # Timestamp / TimestampTZ: stored as UTC ISO text, so compare in the same format
    try:
        dt = datetime.fromisoformat(str(value).strip().replace(" ", "T", 1))
    except ValueError:
        raise _invalid("timestamp with time zone", value) from None
    return format_timestamp(dt)


def bind_parameters(sql_parameters: Any, used: list[str]) -> tuple[dict[str, Any], dict[str, ColumnType]]:
    """Validate ``sqlParameters`` and return SQLite bindings and the declared parameter types."""
    given: dict[str, tuple[str | None, Any]] = {}
    if sql_parameters is not None:
        if not isinstance(sql_parameters, list):
            raise SqlError("sqlParameters must be a list of {name, type, value} objects", sqlstate="22023")
        for item in sql_parameters:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
                raise SqlError("each sqlParameters entry needs a name", sqlstate="22023")
            name = item["name"].strip().lstrip(":")
            given[name] = (item.get("type"), item.get("value"))
    bindings: dict[str, Any] = {}
    types: dict[str, ColumnType] = {}
    for name in used:
        if name not in given:
            raise SqlError(f'there is no parameter ":{name}"', detail="The query uses a placeholder that "
                           "sqlParameters does not define.", hint=f'Add {{"name": "{name}", "type": ..., '
                           '"value": ...}} to sqlParameters.', sqlstate="42P02")
        type_name, value = given[name]
        bindings[name] = convert_parameter(type_name, value)
        canon = _PARAM_TYPES.get((type_name or "Unspecified").lower(), "Unspecified")
        canon = {"Bool": "Boolean", "Decimal": "Numeric", "String": "Varchar", "Text": "Varchar"}.get(canon, canon)
        if canon != "Unspecified":
            types[name] = column_type(canon)
    return bindings, types


# -- translation ---------------------------------------------------------------------------------------------------

_CLAUSE_END = {"FROM", "WHERE", "GROUP", "HAVING", "WINDOW", "ORDER", "LIMIT", "OFFSET", "FETCH", "UNION",
               "INTERSECT", "EXCEPT", "QUALIFY"}
_NOT_ALIAS = {"END", "NULL", "TRUE", "FALSE", "AND", "OR", "NOT", "IS", "IN", "LIKE", "ILIKE", "BETWEEN", "ELSE",
              "THEN", "WHEN", "CASE", "ASC", "DESC", "DISTINCT", "ALL", "AS", "ON", "OVER", "FILTER", "WITHIN",
              "COLLATE", "ESCAPE", "SIMILAR", "ISNULL", "NOTNULL"}
_BIGINT_FUNCS = {"count", "row_number", "rank", "dense_rank", "ntile", "approx_count_distinct"}
_DOUBLE_FUNCS = {"percent_rank", "cume_dist", "random", "percentile_cont", "stddev", "variance"}
_ARG_TYPE_FUNCS = {"min", "max", "any_value", "first_value", "last_value", "nth_value", "lag", "lead",
                   "percentile_disc", "mode", "coalesce", "nullif", "greatest", "least", "abs", "round", "ceil",
                   "ceiling", "floor", "trunc"}
_TEXT_FUNCS = {"lower", "upper", "concat", "concat_ws", "substr", "substring", "trim", "btrim", "ltrim", "rtrim",
               "replace", "lpad", "rpad", "left", "right", "split_part", "string_agg", "quote_ident", "md5",
               "initcap", "reverse", "repeat", "to_char", "chr", "translate"}
_INT_FUNCS = {"length", "char_length", "character_length", "strpos", "octet_length", "ascii"}


class _Translator:
    def __init__(self, toks: list[Tok], param_types: dict[str, ColumnType]) -> None:
        self.toks = toks
        self.param_types = param_types
        self.alias_types: dict[str, ColumnType] = {}
        self.tables: set[str] = set()
        self.gs_counter = 0

    # -- identifier checks ---------------------------------------------------------------------------------------
    def check_identifiers(self) -> None:
        toks = self.toks
        for i, t in enumerate(toks):
            if t.kind == "qident":
                name = _unquote(t)
                exact = _KNOWN_LOWER.get(name.lower())
                if exact is not None and exact != name:
                    is_table = exact in CATALOG
                    what = "relation" if is_table else "column"
                    raise SqlError(f'{what} "{name}" does not exist', sqlstate="42P01" if is_table else "42703",
                                   detail="Quoted identifiers are case-sensitive.",
                                   hint=f'Perhaps you meant to reference the {what} "{exact}".')
            if (t.kind in ("ident", "qident") and _unquote(t).lower() in _TABLES_LOWER
                    and i > 0 and toks[i - 1].is_kw("FROM", "JOIN")):
                self.tables.add(_KNOWN_LOWER[_unquote(t).lower()])
            if t.kind == "punct" and t.text == "." and i + 1 < len(toks) and toks[i + 1].kind == "punct":
                raise SqlError(f'syntax error at or near "{toks[i + 1].text}"')

    # -- output columns ------------------------------------------------------------------------------------------
    def collect_aliases(self) -> None:
        """Types of ``expr AS alias`` anywhere in the query, so an outer query's ``alias`` gets a type."""
        toks = self.toks
        for k in range(1, len(toks) - 1):
            if toks[k].is_kw("AS") and toks[k + 1].kind in ("ident", "qident"):
                expr = _expr_before(toks, k)
                t = self.expr_type(expr) if expr else None
                if t is not None:
                    self.alias_types[_unquote(toks[k + 1]).lower()] = t

    def select_list(self) -> tuple[int, int] | None:
        """``(start, end)`` of the main SELECT's item list (``end`` exclusive), or None."""
        toks = self.toks
        depth = 0
        for i, t in enumerate(toks):
            if t.kind == "punct" and t.text in "()":
                depth += 1 if t.text == "(" else -1
            elif depth == 0 and t.is_kw("SELECT"):
                start = i + 1
                if start < len(toks) and toks[start].is_kw("ALL"):
                    start += 1
                elif start < len(toks) and toks[start].is_kw("DISTINCT"):
                    start += 1
                    if start < len(toks) and toks[start].is_kw("ON"):
                        start = _match_paren(toks, start + 1) + 1
                end = start
                d = 0
                while end < len(toks):
                    u = toks[end]
                    if u.kind == "punct" and u.text in "()":
                        d += 1 if u.text == "(" else -1
                        if d < 0:
                            break
                    elif d == 0 and u.kind == "ident" and u.upper in _CLAUSE_END and not (
                            u.upper == "GROUP" and toks[end - 1].is_kw("WITHIN")):
                        break
                    end += 1
                return start, end
        return None

    def output_columns(self) -> list[OutputColumn] | None:
        """Name every select-list item (adding explicit aliases) and infer its type where the SQL shows it."""
        span = self.select_list()
        if span is None:
            return None
        start, end = span
        items = _split_commas(self.toks[start:end])
        if not items or any(not item for item in items):
            raise SqlError("syntax error at or near \",\"" if items and len(items) > 1 else
                           "syntax error at end of input")
        columns: list[OutputColumn] = []
        new_items: list[list[Tok]] = []
        star = False
        for item in items:
            last = item[-1]
            if last.kind == "op" and last.text == "*" and (len(item) == 1 or item[-2].text == "."):
                star = True
                new_items.append(item)
                continue
            alias: str | None = None
            expr = item
            if len(item) >= 3 and item[-2].is_kw("AS") and last.kind in ("ident", "qident"):
                alias, expr = _unquote(last), item[:-2]
            elif (len(item) >= 2 and last.kind in ("ident", "qident") and last.upper not in _NOT_ALIAS
                  and (item[-2].kind in ("ident", "qident", "str", "num", "param")
                       and item[-2].upper not in _NOT_ALIAS | {"SELECT"}
                       or (item[-2].kind == "punct" and item[-2].text == ")"))):
                alias, expr = _unquote(last), item[:-1]
            if expr[-1].kind == "op" or expr[-1].is_kw("AND", "OR", "NOT", "AS"):
                raise SqlError("syntax error at end of input" if end == len(self.toks) else
                               f'syntax error at or near "{self.toks[end].text}"')
            name = alias if alias is not None else self.default_name(expr)
            columns.append(OutputColumn(name, self.expr_type(expr)))
            new_items.append(expr + [Tok("ident", "AS"), Tok("alias", name)])
        self.toks = self.toks[:start] + _join_commas(new_items) + self.toks[end:]
        return None if star else columns

    @staticmethod
    def default_name(expr: list[Tok]) -> str:
        """PostgreSQL's name for an unaliased item (Data Cloud echoes column names as written)."""
        if len(expr) == 1 and expr[0].is_kw("TRUE", "FALSE"):
            return "bool"
        if len(expr) == 1 and expr[0].kind in ("ident", "qident"):
            return _unquote(expr[0])
        if len(expr) == 3 and expr[1].text == "." and expr[2].kind in ("ident", "qident"):
            return _unquote(expr[2])
        if expr[0].kind == "ident" and len(expr) > 1 and expr[1].text == "(":
            fname = expr[0].text.lower()
            if fname == "cast":
                inner = expr[2:_match_paren(expr, 1)]
                as_at = _last_top_as(inner)
                if as_at is not None:
                    return _Translator.default_name(inner[:as_at])
            return fname
        if any(t.text == "::" for t in expr):
            k = next(i for i, t in enumerate(expr) if t.text == "::")
            return _Translator.default_name(expr[:k]) if k else "?column?"
        if expr[0].is_kw("CASE"):
            return "case"
        return "?column?"

    def expr_type(self, expr: list[Tok]) -> ColumnType | None:
        if not expr:
            return None
        while len(expr) >= 2 and expr[0].text == "(" and _match_paren(expr, 0) == len(expr) - 1:
            expr = expr[1:-1]
        if len(expr) == 1:
            t = expr[0]
            if t.kind in ("ident", "qident"):
                name = _unquote(t)
                for cols in CATALOG.values():
                    for col, dc_type in cols.items():
                        if col == name or (t.kind == "ident" and col.lower() == name.lower()):
                            return column_type(dc_type)
                if t.is_kw("TRUE", "FALSE"):
                    return ColumnType("Boolean")
                return self.alias_types.get(name.lower())
            if t.kind == "str":
                return ColumnType("Varchar")
            if t.kind == "num":
                return ColumnType("Integer") if t.text.isdigit() else ColumnType("Numeric", NUMERIC_PRECISION,
                                                                                    NUMERIC_SCALE)
            if t.kind == "param":
                return self.param_types.get(t.text[1:])
            return None
        if len(expr) == 3 and expr[1].text == "." and expr[2].kind in ("ident", "qident"):
            return self.expr_type([expr[2]])
        colons = [i for i, t in enumerate(expr) if t.text == "::"]
        if colons:
            name, nxt, size = _parse_type(expr, colons[-1] + 1)
            if nxt == len(expr):
                return _cast_type(name, size)
        if expr[0].kind == "ident" and len(expr) > 1 and expr[1].text == "(":
            close = _match_paren(expr, 1)
            fname = expr[0].text.lower()
            args = _split_commas(expr[2:close])
            rest = expr[close + 1:]
            if rest and not (rest[0].is_kw("OVER", "WITHIN", "FILTER")):
                return None
            if fname == "cast":
                inner = expr[2:close]
                as_at = _last_top_as(inner)
                if as_at is not None:
                    name, _, size = _parse_type(inner, as_at + 1)
                    return _cast_type(name, size)
                return None
            if fname in ("percentile_disc", "mode") and rest and rest[0].is_kw("WITHIN"):
                group = rest[3:_match_paren(rest, 2)] if len(rest) > 2 else []
                order_expr = group[2:] if len(group) > 2 and group[0].is_kw("ORDER") else []
                while order_expr and order_expr[-1].is_kw("ASC", "DESC", "FIRST", "LAST", "NULLS"):
                    order_expr = order_expr[:-1]
                return self.expr_type(order_expr)
            if fname in _BIGINT_FUNCS:
                return ColumnType("BigInt")
            if fname in _DOUBLE_FUNCS:
                return ColumnType("Double")
            if fname in _TEXT_FUNCS:
                return ColumnType("Varchar")
            if fname in _INT_FUNCS:
                return ColumnType("Integer")
            if fname in ("now", "current_timestamp"):
                return ColumnType("TimestampTZ")
            if fname == "date":
                return ColumnType("Date")
            arg = self.expr_type(args[0]) if args and args[0] else None
            if fname in _ARG_TYPE_FUNCS:
                return arg
            if fname == "sum":
                return ColumnType("BigInt") if arg and arg.name in ("Integer", "BigInt", "SmallInt") else arg
            if fname == "avg":
                return arg if arg and arg.name == "Double" else column_type("Numeric")
            return None
        if not expr[0].is_kw("CASE"):
            depth = 0
            concat = False
            for t in expr:
                if t.kind == "punct" and t.text in "()":
                    depth += 1 if t.text == "(" else -1
                elif depth == 0 and (t.kind == "op" and t.text in ("=", "<", ">", "<=", ">=", "<>", "!=")
                                     or t.is_kw("LIKE", "ILIKE", "IN", "IS", "BETWEEN", "AND", "OR", "NOT",
                                                "EXISTS")):
                    return ColumnType("Boolean")
                elif depth == 0 and t.kind == "op" and t.text == "||":
                    concat = True
            if concat:
                return ColumnType("Varchar")
        if expr[0].is_kw("CURRENT_DATE"):
            return ColumnType("Date")
        if expr[0].is_kw("CURRENT_TIMESTAMP"):
            return ColumnType("TimestampTZ")
        return None

    # -- rewrites ------------------------------------------------------------------------------------------------
    def rewrite(self, toks: list[Tok]) -> list[Tok]:
        """Rewrite one token list (recursing into parenthesised groups)."""
        out: list[Tok] = []
        i = 0
        n = len(toks)
        while i < n:
            t = toks[i]
            up = t.upper
            nxt = toks[i + 1] if i + 1 < n else None
            # function-call rewrites
            if t.kind == "ident" and nxt is not None and nxt.text == "(" and nxt.kind == "punct":
                close = _match_paren(toks, i + 1)
                fname = t.text.lower()
                handled = self.rewrite_call(fname, toks, i, close, out)
                if handled is not None:
                    i = handled
                    continue
            if t.kind == "punct" and t.text == "(":
                # A group is rewritten on its own and kept as one token, so that the ORDER BY and LIMIT passes
                # of this level never see the clauses of a subquery or window.
                close = _match_paren(toks, i)
                out.append(Tok("raw", "(" + _render(self.rewrite(toks[i + 1:close])) + ")"))
                i = close + 1
                continue
            if t.kind == "op" and t.text == "::":
                operand = _pop_operand(out)
                name, j, _ = _parse_type(toks, i + 1)
                out.append(Tok("raw", _CASTS[name][1].format(_render(operand))))
                i = j
                continue
            if up == "ILIKE" or (up == "NOT" and nxt is not None and nxt.is_kw("ILIKE")):
                negate = up == "NOT"
                j = i + 2 if negate else i + 1
                left = _pop_operand(out)
                right, j = _take_operand(toks, j)
                right = self.rewrite(right)
                out.append(Tok("raw", f"lower({_render(left)})"))
                out.extend([Tok("ident", "NOT")] if negate else [])
                out.append(Tok("ident", "LIKE"))
                out.append(Tok("raw", f"lower({_render(right)})"))
                i = j
                continue
            if up == "TABLESAMPLE":
                raise SqlError("TABLESAMPLE is not supported by this emulator", sqlstate="0A000")
            out.append(t)
            i += 1
        out = self.order_by_nulls(out)
        return self.limit_offset(out)

    def rewrite_call(self, fname: str, toks: list[Tok], i: int, close: int, out: list[Tok]) -> int | None:
        """Rewrite the call ``toks[i](...)`` ending at ``close``; return the next index, or None to keep it."""
        inner = toks[i + 2:close]
        if fname in ("percentile_disc", "percentile_cont"):
            j = close + 1
            if not (j + 2 < len(toks) and toks[j].is_kw("WITHIN") and toks[j + 1].is_kw("GROUP")
                    and toks[j + 2].text == "("):
                raise SqlError(f"WITHIN GROUP is required for ordered-set aggregate {fname}", sqlstate="42809")
            gclose = _match_paren(toks, j + 2)
            group = toks[j + 3:gclose]
            if len(group) < 3 or not (group[0].is_kw("ORDER") and group[1].is_kw("BY")):
                raise SqlError('syntax error at or near "' + (group[0].text if group else ")") + '"')
            order = group[2:]
            desc = 0
            while order and order[-1].is_kw("ASC", "DESC", "FIRST", "LAST", "NULLS"):
                if order[-1].is_kw("DESC"):
                    desc = 1
                order = order[:-1]
            if len(_split_commas(order)) != 1:
                raise SqlError(f"function {fname} takes exactly one ORDER BY expression", sqlstate="42883")
            fraction = self.rewrite(inner)
            expr = self.rewrite(order)
            out.append(Tok("raw", f"__dc_{fname}({_render(fraction)}, {_render(expr)}, {desc})"))
            return gclose + 1
        if fname == "cast":
            as_at = _last_top_as(inner)
            if as_at is None:
                raise SqlError('syntax error at or near ")"')
            name, end, _ = _parse_type(inner, as_at + 1)
            if end != len(inner):
                raise SqlError(f'syntax error at or near "{inner[end].text}"')
            operand = self.rewrite(inner[:as_at])
            out.append(Tok("raw", _CASTS[name][1].format(_render(operand))))
            return close + 1
        if fname == "mod":
            args = _split_commas(inner)
            if len(args) != 2:
                raise SqlError(f"function mod with {len(args)} arguments does not exist", sqlstate="42883")
            a, b = (self.rewrite(x) for x in args)
            out.append(Tok("raw", f"(({_render(a)}) % ({_render(b)}))"))
            return close + 1
        if fname == "approx_count_distinct":
            out.append(Tok("raw", f"count(DISTINCT {_render(self.rewrite(inner))})"))
            return close + 1
        if fname == "random" and not inner:
            out.append(Tok("raw", "((random() & 9007199254740991) / 9007199254740992.0)"))
            return close + 1
        if fname == "generate_series" and out and (out[-1].is_kw("FROM", "JOIN")
                                                   or (out[-1].text == "," and self._in_from(out))):
            return self.generate_series(toks, i, close, out)
        if fname in _RENAMES:
            out.append(Tok("ident", _RENAMES[fname]))
            out.append(toks[i + 1])
            out.extend(self.rewrite(inner))
            out.append(toks[close])
            return close + 1
        return None

    @staticmethod
    def _in_from(out: list[Tok]) -> bool:
        depth = 0
        for t in reversed(out):
            if t.kind == "punct" and t.text in "()":
                depth += 1 if t.text == ")" else -1
                if depth < 0:
                    return False
            elif depth == 0 and t.kind == "ident" and t.upper in ("FROM", "JOIN"):
                return True
            elif depth == 0 and t.kind == "ident" and t.upper in ("SELECT", "WHERE"):
                return False
        return False

    def generate_series(self, toks: list[Tok], i: int, close: int, out: list[Tok]) -> int:
        args = _split_commas(toks[i + 2:close])
        if len(args) not in (2, 3) or any(not a for a in args):
            raise SqlError("function generate_series with these arguments does not exist", sqlstate="42883")
        lo, hi = (_render(self.rewrite(a)) for a in args[:2])
        step = _render(self.rewrite(args[2])) if len(args) == 3 else "1"
        j = close + 1
        alias = col = "generate_series"
        if j < len(toks) and toks[j].is_kw("AS"):
            j += 1
        if j < len(toks) and toks[j].kind in ("ident", "qident") and toks[j].upper not in _CLAUSE_END | {
                "JOIN", "ON", "INNER", "LEFT", "RIGHT", "CROSS", "NATURAL", "FULL", "USING"}:
            alias = col = _unquote(toks[j])
            j += 1
            if j < len(toks) and toks[j].text == "(":
                cclose = _match_paren(toks, j)
                names = toks[j + 1:cclose]
                if len(names) != 1 or names[0].kind not in ("ident", "qident"):
                    raise SqlError("generate_series returns one column", sqlstate="42601")
                col = _unquote(names[0])
                j = cclose + 1
        self.gs_counter += 1
        cte = f"__dc_gs{self.gs_counter}"
        out.append(Tok("raw", (
            f"(WITH RECURSIVE {cte}(v) AS (SELECT ({lo}) UNION ALL SELECT v + ({step}) FROM {cte} "
            f"WHERE CASE WHEN ({step}) > 0 THEN v + ({step}) <= ({hi}) WHEN ({step}) < 0 THEN v + ({step}) >= ({hi}) "
            f"ELSE 0 END) SELECT v AS {_backquote(col)} FROM {cte} WHERE ({lo}) IS NOT NULL AND ({hi}) IS NOT NULL "
            f"AND CASE WHEN ({step}) > 0 THEN v <= ({hi}) WHEN ({step}) < 0 THEN v >= ({hi}) ELSE 0 END) "
            f"AS {_backquote(alias)}")))
        return j

    @staticmethod
    def order_by_nulls(toks: list[Tok]) -> list[Tok]:
        """Give every ORDER BY item PostgreSQL's default NULL placement (this list's top level only)."""
        out: list[Tok] = []
        i = 0
        n = len(toks)
        while i < n:
            t = toks[i]
            out.append(t)
            if t.is_kw("ORDER") and i + 1 < n and toks[i + 1].is_kw("BY"):
                out.append(toks[i + 1])
                j = i + 2
                end = j
                depth = 0
                while end < n:
                    u = toks[end]
                    if u.kind == "punct" and u.text in "()":
                        depth += 1 if u.text == "(" else -1
                    elif depth == 0 and (u.kind == "ident" and u.upper in (
                            "LIMIT", "OFFSET", "FETCH", "ROWS", "RANGE", "GROUPS", "UNION", "INTERSECT", "EXCEPT",
                            "WINDOW") or u.text == ";"):
                        break
                    end += 1
                items = _split_commas(toks[j:end])
                fixed: list[list[Tok]] = []
                for item in items:
                    if any(x.is_kw("NULLS") for x in item[-3:]):
                        fixed.append(item)
                    elif item and item[-1].is_kw("DESC"):
                        fixed.append(item + [Tok("ident", "NULLS"), Tok("ident", "FIRST")])
                    else:
                        fixed.append(item + [Tok("ident", "NULLS"), Tok("ident", "LAST")])
                out.extend(_join_commas(fixed))
                i = end
                continue
            i += 1
        return out

    @staticmethod
    def limit_offset(toks: list[Tok]) -> list[Tok]:
        """``LIMIT a`` / ``OFFSET b [ROWS]`` / ``FETCH FIRST c ROWS ONLY``, any order -> ``LIMIT x OFFSET y``."""
        starts = [i for i, t in enumerate(toks) if t.is_kw("LIMIT", "OFFSET", "FETCH")]
        if not starts:
            return toks
        first = starts[0]
        limit: list[Tok] | None = None
        offset: list[Tok] | None = None
        clauses = starts + [len(toks)]
        for a, b in zip(clauses, clauses[1:], strict=False):
            kw = toks[a].upper
            body = toks[a + 1:b]
            if kw == "LIMIT":
                limit = None if len(body) == 1 and body[0].is_kw("ALL") else body
            elif kw == "OFFSET":
                if body and body[-1].is_kw("ROW", "ROWS"):
                    body = body[:-1]
                offset = body
            else:
                if not body or not body[0].is_kw("FIRST", "NEXT"):
                    raise SqlError('syntax error at or near "FETCH"')
                rest = body[1:]
                if rest and rest[-1].is_kw("TIES"):
                    raise SqlError("FETCH ... WITH TIES is not supported by this emulator", sqlstate="0A000")
                if not (rest and rest[-1].is_kw("ONLY")):
                    raise SqlError('syntax error at or near "FETCH"')
                rest = rest[:-1]
                if rest and rest[-1].is_kw("ROW", "ROWS"):
                    rest = rest[:-1]
                limit = rest or [Tok("num", "1")]
            if body == [] and kw != "FETCH":
                raise SqlError(f'syntax error at or near "{kw}"' if b < len(toks) else "syntax error at end of input")
        out = toks[:first]
        out += [Tok("ident", "LIMIT")] + (limit if limit is not None else [Tok("num", "-1")])
        if offset:
            out += [Tok("ident", "OFFSET")] + offset
        return out


_RENAMES = {"any_value": "min", "btrim": "trim", "char_length": "length", "character_length": "length",
            "strpos": "__dc_strpos", "string_agg": "group_concat", "ceiling": "ceil", "now": "__dc_now",
            "left": "__dc_left", "right": "__dc_right", "lpad": "__dc_lpad", "rpad": "__dc_rpad",
            "concat": "__dc_concat", "concat_ws": "__dc_concat_ws", "split_part": "__dc_split_part",
            "greatest": "__dc_greatest", "least": "__dc_least", "starts_with": "__dc_starts_with",
            "repeat": "__dc_repeat", "reverse": "__dc_reverse", "initcap": "__dc_initcap", "md5": "__dc_md5",
            "quote_ident": "__dc_quote_ident"}


def _expr_before(toks: list[Tok], k: int) -> list[Tok]:
    """The primary expression (a name, literal or call with OVER/WITHIN GROUP/FILTER groups) ending before ``k``."""
    end = k
    start = k - 1
    while start >= 0:
        t = toks[start]
        if t.kind == "punct" and t.text == ")":
            depth = 0
            for j in range(start, -1, -1):
                if toks[j].kind == "punct" and toks[j].text in "()":
                    depth += 1 if toks[j].text == ")" else -1
                    if depth == 0:
                        start = j
                        break
            if start > 0 and toks[start - 1].kind == "ident" and toks[start - 1].upper not in _CLAUSE_END | {
                    "SELECT", "AND", "OR", "NOT", "IN", "EXISTS", "AS", "ON", "FROM", "JOIN"}:
                start -= 1
                if toks[start].is_kw("OVER", "FILTER"):
                    start -= 1
                    continue
                if toks[start].is_kw("GROUP") and start > 0 and toks[start - 1].is_kw("WITHIN"):
                    start -= 2
                    continue
            return toks[start:end]
        if t.kind in ("ident", "qident", "str", "num", "param"):
            while start >= 2 and toks[start - 1].text == "." and toks[start - 1].kind == "punct":
                start -= 2
            return toks[start:end]
        return []
    return []


def _last_top_as(toks: list[Tok]) -> int | None:
    depth = 0
    found = None
    for k, t in enumerate(toks):
        if t.kind == "punct" and t.text in "()":
            depth += 1 if t.text == "(" else -1
        elif depth == 0 and t.is_kw("AS"):
            found = k
    return found


def _pop_operand(out: list[Tok]) -> list[Tok]:
    """Remove and return the operand that ends ``out`` (a token, a qualified name or a call/parenthesised group)."""
    if not out:
        raise SqlError('syntax error at or near "::"')
    last = out[-1]
    if last.kind == "raw" and last.text.startswith("(") and len(out) >= 2 and out[-2].kind == "ident" \
            and out[-2].upper not in (_NOT_ALIAS | _CLAUSE_END | {"SELECT", "AND", "OR"}):
        operand = out[-2:]
        del out[-2:]
        return operand
    if last.kind == "punct" and last.text == ")":
        depth = 0
        for k in range(len(out) - 1, -1, -1):
            u = out[k]
            if u.kind == "punct" and u.text in "()":
                depth += 1 if u.text == ")" else -1
                if depth == 0:
                    start = k - 1 if k > 0 and out[k - 1].kind == "ident" and out[k - 1].upper not in (
                        _NOT_ALIAS | _CLAUSE_END | {"SELECT", "AND", "OR"}) else k
                    operand = out[start:]
                    del out[start:]
                    return operand
        raise SqlError('syntax error at or near ")"')
    start = len(out) - 1
    while start >= 2 and out[start - 1].text == "." and out[start - 1].kind == "punct":
        start -= 2
    operand = out[start:]
    del out[start:]
    return operand


def _take_operand(toks: list[Tok], j: int) -> tuple[list[Tok], int]:
    if j >= len(toks):
        raise SqlError("syntax error at end of input")
    t = toks[j]
    if t.kind == "punct" and t.text == "(":
        end = _match_paren(toks, j)
        return toks[j:end + 1], end + 1
    if t.kind == "ident" and j + 1 < len(toks) and toks[j + 1].text == "(":
        end = _match_paren(toks, j + 1)
        return toks[j:end + 1], end + 1
    end = j + 1
    while end + 1 < len(toks) and toks[end].text == "." and toks[end].kind == "punct":
        end += 2
    return toks[j:end], end


def _distinct_from(toks: list[Tok]) -> list[Tok]:
    """``IS [NOT] DISTINCT FROM`` -> SQLite's ``IS NOT`` / ``IS`` (first, so no later pass mistakes its FROM)."""
    out: list[Tok] = []
    i = 0
    while i < len(toks):
        t = toks[i]
        if t.is_kw("IS") and i + 3 < len(toks) and toks[i + 1].is_kw("NOT") and toks[i + 2].is_kw("DISTINCT") \
                and toks[i + 3].is_kw("FROM"):
            out.append(Tok("ident", "IS"))
            i += 4
        elif t.is_kw("IS") and i + 2 < len(toks) and toks[i + 1].is_kw("DISTINCT") and toks[i + 2].is_kw("FROM"):
            out += [Tok("ident", "IS"), Tok("ident", "NOT")]
            i += 3
        else:
            out.append(t)
            i += 1
    return out


def translate(sql: str, sql_parameters: Any = None) -> Translation:
    """Translate one Data 360 SQL query; raises :class:`SqlError` for anything Hyper would reject."""
    if not isinstance(sql, str) or not sql.strip():
        raise SqlError("syntax error at end of input", detail="The sql field is empty.", sqlstate="42601")
    toks = _distinct_from(_check_statement(tokenize(sql)))
    used = list(dict.fromkeys(t.text[1:] for t in toks if t.kind == "param"))
    bindings, param_types = bind_parameters(sql_parameters, used)
    tr = _Translator(toks, param_types)
    tr.check_identifiers()
    tr.collect_aliases()
    columns = tr.output_columns()
    star_table = None
    if columns is None and len(tr.tables) == 1 and sum(1 for t in toks if t.is_kw("SELECT")) == 1 \
            and not any(t.is_kw("JOIN") or (t.kind == "punct" and t.text == ",") for t in toks):
        star_table = next(iter(tr.tables))
    out = tr.rewrite(tr.toks)
    return Translation(_render(out), bindings, columns, tr.tables, star_table, _direct_form(out, star_table))


_NOT_DIRECT = {"DISTINCT", "GROUP", "HAVING", "WINDOW", "UNION", "INTERSECT", "EXCEPT", "OVER", "ALL"}


def _direct_form(out: list[Tok], star_table: str | None) -> tuple[list[str], str] | None:
    """For ``SELECT col [AS a], ... | * FROM ... [WHERE/ORDER BY/LIMIT]`` (subqueries only inside parentheses, which
    the rewritten list holds as single tokens): the columns and the tail, with ORDER BY ordinals and output names
    replaced by the columns they name. None for anything else (those run wrapped in a CTE)."""
    if not out or not out[0].is_kw("SELECT") or any(t.kind == "ident" and t.upper in _NOT_DIRECT for t in out):
        return None
    try:
        from_at = next(i for i, t in enumerate(out) if t.is_kw("FROM"))
    except StopIteration:
        return None
    items = _split_commas(out[1:from_at])
    cols: list[list[Tok]] = []
    names: list[tuple[str, bool]] = []
    if len(items) == 1 and len(items[0]) == 1 and items[0][0].text == "*":
        if star_table is None:
            return None
        cols = [[Tok("qident", '"' + c.replace('"', '""') + '"')] for c in CATALOG[star_table]]
        names = [(c, True) for c in CATALOG[star_table]]
    else:
        for item in items:
            if len(item) < 3 or not item[-2].is_kw("AS") or item[-1].kind != "alias":
                return None
            expr = item[:-2]
            simple = (len(expr) == 1 and expr[0].kind in ("ident", "qident") and expr[0].upper not in _NOT_ALIAS) or (
                len(expr) == 3 and expr[0].kind in ("ident", "qident") and expr[1].text == "."
                and expr[2].kind in ("ident", "qident"))
            if not simple:
                return None
            cols.append(expr)
            names.append((item[-1].text, False))
    tail = out[from_at:]
    order_at = next((i for i in range(len(tail) - 1) if tail[i].is_kw("ORDER") and tail[i + 1].is_kw("BY")), None)
    if order_at is not None:
        end = next((i for i in range(order_at + 2, len(tail)) if tail[i].is_kw("LIMIT")), len(tail))
        fixed = []
        for item in _split_commas(tail[order_at + 2:end]):
            head = item[0] if item else None
            if head is not None and head.kind == "num" and head.text.isdigit():
                k = int(head.text)
                if not 1 <= k <= len(cols):
                    return None  # let the wrapped form report it
                item = cols[k - 1] + item[1:]
            elif head is not None and head.kind in ("ident", "qident") and (len(item) == 1 or item[1].kind == "ident"):
                name = _unquote(head)
                hits = [k for k, (n, _) in enumerate(names)
                        if n == name or (head.kind == "ident" and n.lower() == name.lower())]
                if len(hits) == 1 and not names[hits[0]][1]:
                    item = cols[hits[0]] + item[1:]
            fixed.append(item)
        tail = tail[:order_at + 2] + _join_commas(fixed) + tail[end:]
    return [_render(c) for c in cols], _render(tail)


def translate_order_by(orderby: str) -> str:
    """The v1 API's ``orderby`` query parameter (``"Col ASC, 2 DESC"``) as a SQLite ORDER BY list."""
    toks = tokenize(orderby)
    items = _split_commas(toks)
    for item in items:
        ok = (item and item[0].kind in ("ident", "qident", "num")
              and all(t.is_kw("ASC", "DESC", "NULLS", "FIRST", "LAST") for t in item[1:]))
        if not ok:
            raise SqlError(f'invalid orderby "{orderby}"', hint="Use column names or positions with ASC or DESC.",
                           sqlstate="42601")
        if item[0].kind == "qident":
            _Translator([item[0]], {}).check_identifiers()
    fixed = _Translator.order_by_nulls([Tok("ident", "ORDER"), Tok("ident", "BY")] + toks)
    return _render(fixed[2:])


# -- SQLite connection ---------------------------------------------------------------------------------------------

# SQLite only says "user-defined function raised exception": keep the message for the error response.
_USER_ERROR = threading.local()


def _reporting(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            _USER_ERROR.message = str(exc)
            raise
    return call


class _Percentile:
    """``percentile_disc`` / ``percentile_cont`` over the values of one group (ignores NULLs)."""

    continuous = False

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.fraction: Any = None
        self.desc = 0

    def step(self, fraction: Any, value: Any, desc: int) -> None:
        self.fraction = fraction
        self.desc = desc
        if value is not None:
            self.values.append(value)

    def finalize(self) -> Any:
        try:
            return self._result()
        except Exception as exc:
            _USER_ERROR.message = str(exc)
            raise

    def _result(self) -> Any:
        f = self.fraction
        if f is None and not self.values:
            return None
        if not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise ValueError(f"percentile value {f} is not between 0 and 1")
        if not self.values:
            return None
        # SQLite's BINARY collation is UTF-8 byte order, which is code point order: sorting str matches ORDER BY.
        vals = sorted(self.values, key=lambda v: (isinstance(v, str), v), reverse=bool(self.desc))
        n = len(vals)
        if not self.continuous:
            return vals[max(0, math.ceil(f * n) - 1)]
        if any(isinstance(v, str) for v in vals):
            raise ValueError("function percentile_cont(double precision, text) does not exist")
        pos = f * (n - 1)
        lo = math.floor(pos)
        hi = math.ceil(pos)
        return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


class _PercentileCont(_Percentile):
    continuous = True


def _fn_bool(v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return int(bool(v))
    text = str(v).strip().lower()
    if text in ("t", "true", "1", "yes", "y", "on"):
        return 1
    if text in ("f", "false", "0", "no", "n", "off"):
        return 0
    raise ValueError(f'invalid input syntax for type boolean: "{v}"')


def _fn_date(v: Any) -> str | None:
    if v is None:
        return None
    try:
        return date.fromisoformat(str(v).strip()[:10]).isoformat()
    except ValueError:
        raise ValueError(f'invalid input syntax for type date: "{v}"') from None


def _fn_timestamp(v: Any) -> str | None:
    if v is None:
        return None
    try:
        return format_timestamp(datetime.fromisoformat(str(v).strip().replace(" ", "T", 1)))
    except ValueError:
        raise ValueError(f'invalid input syntax for type timestamp with time zone: "{v}"') from None


def _fn_pad(left: bool) -> Callable[..., Any]:
    def pad(s: Any, n: Any, fill: Any = " ") -> Any:
        if s is None or n is None or fill is None:
            return None
        s, n, fill = str(s), int(n), str(fill)
        if n <= len(s):
            return s[:n]
        if not fill:
            return s
        extra = (fill * (n - len(s)))[: n - len(s)]
        return extra + s if left else s + extra
    return pad


def _fn_left(s: Any, n: Any) -> Any:
    if s is None or n is None:
        return None
    s, n = str(s), int(n)
    return s[:n] if n >= 0 else s[:n] if -n < len(s) else ""


def _fn_right(s: Any, n: Any) -> Any:
    if s is None or n is None:
        return None
    s, n = str(s), int(n)
    if n >= 0:
        return s[len(s) - n:] if n else ""
    return s[-n:]


def _fn_split_part(s: Any, sep: Any, k: Any) -> Any:
    if s is None or sep is None or k is None:
        return None
    parts = str(s).split(str(sep)) if sep else [str(s)]
    k = int(k)
    if k == 0:
        raise ValueError("field position must not be zero")
    idx = k - 1 if k > 0 else len(parts) + k
    return parts[idx] if 0 <= idx < len(parts) else ""


def _fn_extreme(pick: Callable[..., Any]) -> Callable[..., Any]:
    def f(*args: Any) -> Any:
        vals = [a for a in args if a is not None]
        return pick(vals) if vals else None
    return f


def _fn_md5(s: Any) -> Any:
    import hashlib

    return None if s is None else hashlib.md5(str(s).encode(), usedforsecurity=False).hexdigest()


def _fn_quote_ident(s: Any) -> Any:
    if s is None:
        return None
    s = str(s)
    return s if re.fullmatch(r"[a-z_][a-z0-9_$]*", s) else '"' + s.replace('"', '""') + '"'


def _now() -> str:
    return format_timestamp(datetime.now(UTC))


_FUNCTIONS: list[tuple[str, int, Callable[..., Any]]] = [
    ("__dc_bool", 1, _fn_bool), ("__dc_date", 1, _fn_date), ("__dc_timestamp", 1, _fn_timestamp),
    ("__dc_now", 0, _now), ("__dc_left", 2, _fn_left), ("__dc_right", 2, _fn_right),
    ("__dc_lpad", 2, _fn_pad(True)), ("__dc_lpad", 3, _fn_pad(True)),
    ("__dc_rpad", 2, _fn_pad(False)), ("__dc_rpad", 3, _fn_pad(False)),
    ("__dc_concat", -1, lambda *a: "".join(str(x) for x in a if x is not None)),
    ("__dc_concat_ws", -1, lambda sep, *a: None if sep is None else str(sep).join(str(x) for x in a if x is not None)),
    ("__dc_split_part", 3, _fn_split_part), ("__dc_greatest", -1, _fn_extreme(max)),
    ("__dc_least", -1, _fn_extreme(min)),
    ("__dc_strpos", 2, lambda s, sub: None if s is None or sub is None else str(s).find(str(sub)) + 1),
    ("__dc_starts_with", 2, lambda s, p: None if s is None or p is None else int(str(s).startswith(str(p)))),
    ("__dc_repeat", 2, lambda s, n: None if s is None or n is None else str(s) * max(0, int(n))),
    ("__dc_reverse", 1, lambda s: None if s is None else str(s)[::-1]),
    ("__dc_initcap", 1, lambda s: None if s is None else re.sub(r"[A-Za-z0-9]+", lambda m: m.group().capitalize(),
                                                                 str(s))),
    ("__dc_md5", 1, _fn_md5), ("__dc_quote_ident", 1, _fn_quote_ident),
]

# sqlite3 authorizer action codes allowed for queries: SELECT, READ (checked), FUNCTION, RECURSIVE.
_SQLITE_READ = 20
_ALLOWED_ACTIONS = {21, 31, 33}
_READABLE = {t.lower() for t in CATALOG}


class _Authorizer:
    """Allows reading the Data Cloud tables and nothing else; remembers what it refused for the error message."""

    def __init__(self) -> None:
        self.denied: str | None = None

    def __call__(self, action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None) -> int:
        if action in _ALLOWED_ACTIONS:
            return sqlite3.SQLITE_OK
        if action == _SQLITE_READ:
            if arg1 is not None and arg1.lower() in _READABLE and db in ("main", None):
                return sqlite3.SQLITE_OK
            self.denied = arg1
            return sqlite3.SQLITE_DENY
        self.denied = f"action {action}"
        return sqlite3.SQLITE_DENY


def open_dmo(path: Path) -> sqlite3.Connection:
    """A read-only connection to the Data Cloud database with the dialect's helper functions.

    The connections of one process share one page cache and one memory map of the file (SQLite's shared-cache
    mode; they only read, so its table locks never conflict). Each query runs on a worker thread with a connection
    of its own, and with private maps every worker's map grew to the whole file: a partition's rows, read in key
    order, lie all over the table. At 2,000,000 rows that was 4 x 550 MB of resident memory."""
    conn = sqlite3.connect(f"file:{path}?mode=ro&cache=shared", uri=True, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=60000")
    conn.execute("PRAGMA cache_size=-131072")
    conn.execute("PRAGMA mmap_size=1073741824")  # index-ordered scans jump around the table: mapping is cheaper
    conn.execute("PRAGMA case_sensitive_like=ON")  # PostgreSQL's LIKE is case-sensitive (ILIKE is not)
    conn.execute("PRAGMA query_only=ON")
    for name, nargs, fn in _FUNCTIONS:
        conn.create_function(name, nargs, _reporting(fn), deterministic=name != "__dc_now")
    conn.create_aggregate("__dc_percentile_disc", 3, _Percentile)
    conn.create_aggregate("__dc_percentile_cont", 3, _PercentileCont)
    conn.text_factory = bytes  # result rows are JSON text: keep them as UTF-8 bytes end to end
    return conn


def guard(conn: sqlite3.Connection) -> _Authorizer:
    auth = _Authorizer()
    conn.set_authorizer(auth)
    return auth


def result_names(conn: sqlite3.Connection, tr: Translation) -> list[str]:
    """Column names of the query's result (prepares it without running it)."""
    auth = guard(conn)
    try:
        cur = conn.execute(f"SELECT * FROM ({tr.sql}) LIMIT 0", tr.bindings)
    except sqlite3.Error as exc:
        raise map_error(exc, auth) from None
    if tr.columns is not None:
        return [c.name for c in tr.columns]
    names = [d[0] for d in cur.description]
    seen: set[str] = set()
    out = []
    for name in names:
        base = re.sub(r":\d+$", "", name)  # SQLite renames duplicate names "a", "a:1"; keep the original
        out.append(base if base in seen or base != name else name)
        seen.add(base)
    return out


def execution_sql(tr: Translation, ncols: int, types: list[ColumnType | None], direct: bool = True) -> str:
    """SQL producing one JSON array text per result row, in the query's order."""
    use_direct = direct and tr.direct is not None and len(tr.direct[0]) == ncols
    cols = tr.direct[0] if use_direct and tr.direct else [f"c{i}" for i in range(ncols)]
    values = []
    for c, t in zip(cols, types, strict=True):
        if t is not None and t.name == "Boolean":
            values.append(f"CASE WHEN {c} IS NULL THEN NULL WHEN {c} THEN json('true') ELSE json('false') END")
        elif t is not None and t.name in ("Varchar", "Char", "Date", "Timestamp", "TimestampTZ", "Time"):
            values.append(c)
        else:
            # json_array prints REALs with 15 significant digits, which is exact for the usual values; the others
            # get 17. The first test is cheap arithmetic: x is the double nearest to some k/100 below 1e13, so its
            # 15-digit form is k/100 and reads back as x. Only the rest pay for printf.
            values.append(
                f"CASE WHEN typeof({c}) <> 'real' THEN {c} "
                f"WHEN abs({c}) < 1e13 AND {c} * 100 = CAST({c} * 100 AS INTEGER) "
                f"AND CAST({c} * 100 AS INTEGER) / 100.0 = {c} THEN {c} "
                f"WHEN CAST(printf('%.15g', {c}) AS REAL) = {c} THEN {c} "
                f"WHEN abs({c}) > 1.7976931348623157e308 THEN NULL ELSE json(printf('%!.17g', {c})) END")
    if use_direct and tr.direct:
        return f"SELECT json_array({', '.join(values)}) {tr.direct[1]}"
    return f"WITH __dc_q({', '.join(cols)}) AS ({tr.sql}) SELECT json_array({', '.join(values)}) FROM __dc_q"


_ERROR_PATTERNS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], SqlError]]] = [
    (re.compile(r"no such column: (.+)"), lambda m: SqlError(
        f'column "{m.group(1).split(".")[-1]}" does not exist', sqlstate="42703",
        hint=_column_hint(m.group(1).split(".")[-1]))),
    (re.compile(r"no such table: (?:main\.)?(.+)"), lambda m: SqlError(
        f'relation "{m.group(1)}" does not exist', sqlstate="42P01",
        hint=f'Available objects: {", ".join(sorted(CATALOG))}.')),
    (re.compile(r"no such function: (.+)"), lambda m: SqlError(
        f"function {m.group(1).lower()} does not exist", sqlstate="42883",
        hint="No function matches the given name and argument types.")),
    (re.compile(r"wrong number of arguments to function (\w+)"), lambda m: SqlError(
        f"function {m.group(1).lower()} with these arguments does not exist", sqlstate="42883",
        hint="No function matches the given name and argument types.")),
    (re.compile(r'near "(.+?)": syntax error'), lambda m: SqlError(
        f'syntax error at or near "{m.group(1)}"', sqlstate="42601")),
    (re.compile(r"incomplete input"), lambda m: SqlError("syntax error at end of input", sqlstate="42601")),
    (re.compile(r"ambiguous column name: (.+)"), lambda m: SqlError(
        f'column reference "{m.group(1).split(".")[-1]}" is ambiguous', sqlstate="42702")),
    (re.compile(r"misuse of (?:aggregate|window) function (\w+)"), lambda m: SqlError(
        f"aggregate or window function {m.group(1)} is not allowed here", sqlstate="42803")),
    (re.compile(r"interrupted"), lambda m: SqlError("canceling statement due to user request", sqlstate="57014")),
    (re.compile(r"integer overflow"), lambda m: SqlError("bigint out of range", sqlstate="22003")),
]


def _column_hint(name: str) -> str:
    for cols in CATALOG.values():
        for col in cols:
            if col.lower() == name.lower():
                return f'Perhaps you meant to reference the column "{col}".'
    return ""


def map_error(exc: BaseException, auth: _Authorizer | None = None) -> SqlError:
    """The Hyper-worded :class:`SqlError` for a SQLite exception."""
    text = str(exc)
    if "user-defined" in text:
        message = getattr(_USER_ERROR, "message", None) or text
        _USER_ERROR.message = None
        return SqlError(message, sqlstate="22023")
    if auth is not None and auth.denied is not None:
        if auth.denied.startswith("action "):
            return _read_only("this statement")
        return SqlError(f'relation "{auth.denied}" does not exist', sqlstate="42P01",
                        hint=f'Available objects: {", ".join(sorted(CATALOG))}.')
    for pattern, make in _ERROR_PATTERNS:
        m = pattern.search(text)
        if m:
            return make(m)
    return SqlError(text, sqlstate="XX000")
