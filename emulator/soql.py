"""A SOQL subset compiled to parameterised SQLite, with Salesforce's error codes and messages.

Supported: ``SELECT`` field lists (child-to-parent paths such as ``Account.ExternalId__c``), ``COUNT()``,
``COUNT/COUNT_DISTINCT/MIN/MAX/SUM/AVG(field) [alias]``, ``FIELDS(ALL|STANDARD|CUSTOM)``, ``FROM`` one object,
``WHERE`` with ``= != <> < <= > >= IN NOT IN LIKE AND OR NOT`` and parentheses, ``= null``/``!= null`` (and the
non-SOQL ``IS [NOT] NULL``), ``GROUP BY`` fields, ``ORDER BY ... ASC|DESC NULLS FIRST|LAST``, ``LIMIT``, ``OFFSET``.

Literal values never reach the SQL text: every value becomes a ``?`` parameter. Identifiers are only ever the
API names from :mod:`emulator.schema`, quoted, after they were resolved against the object's fields.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from array import array
from dataclasses import dataclass, field
from typing import Any

from .ids import case_safe
from .schema import Field, SObject, get_object

# Field types by how SOQL compares and SQLite stores them.
TEXT_TYPES = frozenset({"string", "textarea", "picklist", "multipicklist", "email", "phone", "url", "combobox",
                        "encryptedstring"})
ID_TYPES = frozenset({"id", "reference"})
NUMBER_TYPES = frozenset({"currency", "percent", "double", "int"})
AGGREGATES = ("COUNT", "COUNT_DISTINCT", "MIN", "MAX", "SUM", "AVG")
KEYWORDS = frozenset({"SELECT", "FROM", "WHERE", "AND", "OR", "NOT", "IN", "LIKE", "ORDER", "BY", "GROUP", "HAVING",
                      "LIMIT", "OFFSET", "ASC", "DESC", "NULLS", "FIRST", "LAST", "NULL", "TRUE", "FALSE", "WITH",
                      "FOR", "USING", "INCLUDES", "EXCLUDES", "TYPEOF", "IS"})
MAX_OFFSET = 2000
_ROWID_CHUNK = 10_000
FIELDS_ALL_MAX_LIMIT = 200

_NO_SUCH_COLUMN = ("No such column '{name}' on entity '{entity}'. If you are attempting to use a custom field, be sure "
                   "to append the '__c' after the custom field name. Please reference your WSDL or the describe call "
                   "for the appropriate names.")
_BAD_RELATIONSHIP = ("Didn't understand relationship '{name}' in field path. If you are attempting to use a custom "
                     "relationship, be sure to append the '__r' after the custom relationship name. Please reference "
                     "your WSDL or the describe call for the appropriate names.")
_BAD_TYPE = ("sObject type '{name}' is not supported. If you are attempting to use a custom object, be sure to append "
             "the '__c' after the entity name. Please reference your WSDL or the describe call for the appropriate "
             "names.")
_ID_RE = re.compile(r"[a-zA-Z0-9]{15}(?:[a-zA-Z0-9]{3})?")


class SoqlError(Exception):
    """A query Salesforce would reject: answered as ``[{"message", "errorCode"}]`` with HTTP 400."""

    def __init__(self, error_code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.message = message
        self.status = status


def located(query: str, pos: int, message: str) -> str:
    """Salesforce's positioned message: the offending line, a caret, ``ERROR at Row:r:Column:c`` and the text."""
    pos = max(0, min(pos, len(query)))
    row = query.count("\n", 0, pos) + 1
    line_start = query.rfind("\n", 0, pos) + 1
    line_end = query.find("\n", pos)
    line = query[line_start:] if line_end < 0 else query[line_start:line_end]
    col = pos - line_start + 1
    return f"\n{line}\n{' ' * (col - 1)}^\nERROR at Row:{row}:Column:{col}\n{message}"


# -- lexer ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Token:
    kind: str  # ident, string, number, date, datetime, op, punct, eof
    text: str  # as written (for messages)
    pos: int
    value: Any = None
    like: str | None = None  # strings: the SQLite LIKE pattern (ESCAPE '\')
    like_only: str = ""  # strings: the first \% or \_ in it, escapes SOQL allows only in LIKE

    def upper(self) -> str:
        return self.text.upper() if self.kind == "ident" else ""


_TOKEN_RE = re.compile(r"""
    (?P<ws>\s+)
  | (?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:?\d{2}))
  | (?P<date>\d{4}-\d{2}-\d{2})(?![\dT])
  | (?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+))(?![A-Za-z_])
  | (?P<op>!=|<>|<=|>=|=|<|>)
  | (?P<punct>[(),])
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
""", re.VERBOSE)

_SIMPLE_ESCAPES = {"n": "\n", "N": "\n", "r": "\r", "R": "\r", "t": "\t", "T": "\t", "b": "\b", "B": "\b",
                   "f": "\f", "F": "\f", '"': '"', "'": "'", "\\": "\\"}


def _lex_string(text: str, start: int) -> Token:
    """A single-quoted literal from ``start`` (the quote), decoding SOQL's escape sequences."""
    value: list[str] = []
    like: list[str] = []
    like_only = ""
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == "'":
            return Token("string", text[start:i + 1], start, "".join(value), "".join(like), like_only)
        if ch == "\\":
            nxt = text[i + 1] if i + 1 < len(text) else ""
            if nxt in _SIMPLE_ESCAPES:
                decoded = _SIMPLE_ESCAPES[nxt]
                value.append(decoded)
                like.append(_like_escape(decoded))
                i += 2
                continue
            if nxt in ("%", "_"):
                like_only = like_only or "\\" + nxt
                value.append(nxt)
                like.append("\\" + nxt)
                i += 2
                continue
            if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[i + 2:i + 6]):
                decoded = chr(int(text[i + 2:i + 6], 16))
                value.append(decoded)
                like.append(_like_escape(decoded))
                i += 6
                continue
            end = text.find("'", i + 2)
            literal = text[start:end + 1] if end >= 0 else text[start:]
            raise SoqlError("MALFORMED_QUERY", located(
                text, start, f"Invalid string literal {literal}. Illegal character sequence '\\{nxt}' in string "
                             "literal."))
        value.append(ch)
        like.append(_like_escape(ch) if ch not in "%_" else ch)
        i += 1
    raise SoqlError("MALFORMED_QUERY", located(text, start, f"unexpected token: {text[start:]}"))


def _like_escape(ch: str) -> str:
    return "\\" + ch if ch in "\\%_" else ch


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    i = 0
    while i < len(text):
        if text[i] == "'":
            tok = _lex_string(text, i)
            tokens.append(tok)
            i += len(tok.text)
            continue
        m = _TOKEN_RE.match(text, i)
        if m is None:
            end = i + 1
            while end < len(text) and not text[end].isspace() and text[end] not in "(),'":
                end += 1
            raise _unexpected(text, Token("punct", text[i:end], i), first=not tokens)
        kind = m.lastgroup or ""
        raw = m.group()
        if kind == "datetime":
            tokens.append(Token(kind, raw, i, _normalise_datetime(text, i, raw)))
        elif kind == "date":
            tokens.append(Token(kind, raw, i, _normalise_date(text, i, raw)))
        elif kind == "number":
            tokens.append(Token(kind, raw, i, float(raw) if ("." in raw) else int(raw)))
        elif kind != "ws":
            tokens.append(Token(kind, raw, i))
        i = m.end()
    tokens.append(Token("eof", "<EOF>", len(text)))
    return tokens


def _normalise_date(text: str, pos: int, raw: str) -> str:
    try:
        return dt.date.fromisoformat(raw).isoformat()
    except ValueError:
        raise _unexpected(text, Token("date", raw, pos)) from None


def _normalise_datetime(text: str, pos: int, raw: str) -> str:
    """UTC in the form the org stores and returns: ``2026-01-31T10:00:00.000+0000``."""
    iso = raw.replace("Z", "+00:00")
    if re.search(r"[+-]\d{4}$", iso):
        iso = iso[:-2] + ":" + iso[-2:]
    try:
        value = dt.datetime.fromisoformat(iso).astimezone(dt.UTC)
    except ValueError:
        raise _unexpected(text, Token("datetime", raw, pos)) from None
    return format_datetime(value)


def format_datetime(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}+0000"


def canonical_datetime(stored: Any) -> Any:
    """Whatever a loader stored (``...Z``, ``+00:00``, no millis) returned the way Salesforce prints datetimes."""
    if not isinstance(stored, str) or len(stored) == 28 and stored.endswith("+0000"):
        return stored
    iso = stored.strip().replace(" ", "T").replace("Z", "+00:00")
    if re.search(r"[+-]\d{4}$", iso):
        iso = iso[:-2] + ":" + iso[-2:]
    try:
        value = dt.datetime.fromisoformat(iso)
    except ValueError:
        return stored
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return format_datetime(value.astimezone(dt.UTC))


def _unexpected(text: str, tok: Token, first: bool = False) -> SoqlError:
    # A query that does not even start with SELECT gets the bare message (as captured from a real org).
    if first:
        return SoqlError("MALFORMED_QUERY", f"unexpected token: {tok.text}")
    return SoqlError("MALFORMED_QUERY", located(text, tok.pos, f"unexpected token: {tok.text}"))


# -- parse tree -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PathRef:
    text: str
    pos: int


@dataclass
class SelectItem:
    kind: str  # field | count_star | agg | fields
    path: PathRef | None = None
    func: str | None = None
    alias: str | None = None
    pos: int = 0
    fields_kind: str | None = None  # FIELDS(ALL|STANDARD|CUSTOM)


@dataclass
class Comparison:
    path: PathRef
    op: str  # = != < <= > >= IN NOTIN LIKE
    values: list[Token]
    pos: int


@dataclass
class BoolOp:
    op: str  # AND | OR
    items: list[Any]


@dataclass
class Not:
    item: Any


@dataclass
class OrderItem:
    path: PathRef
    desc: bool
    nulls_last: bool


@dataclass
class ParsedQuery:
    text: str
    items: list[SelectItem]
    object_tok: Token
    where: Any = None
    group_by: list[PathRef] = field(default_factory=list)
    order_by: list[OrderItem] = field(default_factory=list)
    limit: int | None = None
    offset: int | None = None
    limit_pos: int = 0


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = tokenize(text)
        self.i = 0

    # helpers
    def peek(self, k: int = 0) -> Token:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def take(self) -> Token:
        tok = self.peek()
        self.i += 1
        return tok

    def is_kw(self, *words: str, k: int = 0) -> bool:
        return self.peek(k).upper() in words

    def expect_kw(self, word: str) -> Token:
        if not self.is_kw(word):
            raise _unexpected(self.text, self.peek(), first=self.i == 0)
        return self.take()

    def expect_punct(self, ch: str) -> Token:
        tok = self.peek()
        if tok.kind != "punct" or tok.text != ch:
            raise _unexpected(self.text, tok)
        return self.take()

    def ident(self) -> Token:
        tok = self.peek()
        if tok.kind != "ident" or tok.upper() in KEYWORDS:
            raise _unexpected(self.text, tok)
        return self.take()

    # grammar
    def parse(self) -> ParsedQuery:
        self.expect_kw("SELECT")
        items = [self.select_item()]
        while self.peek().kind == "punct" and self.peek().text == ",":
            self.take()
            items.append(self.select_item())
        self.expect_kw("FROM")
        obj = self.ident()
        if "." in obj.text:
            raise _unexpected(self.text, obj)
        q = ParsedQuery(self.text, items, obj)
        if self.is_kw("WHERE"):
            self.take()
            q.where = self.condition()
        if self.is_kw("GROUP"):
            self.take()
            self.expect_kw("BY")
            q.group_by.append(self.path())
            while self.peek().text == "," and self.peek().kind == "punct":
                self.take()
                q.group_by.append(self.path())
        if self.is_kw("ORDER"):
            self.take()
            self.expect_kw("BY")
            q.order_by.append(self.order_item())
            while self.peek().text == "," and self.peek().kind == "punct":
                self.take()
                q.order_by.append(self.order_item())
        if self.is_kw("LIMIT"):
            q.limit_pos = self.take().pos
            q.limit = self.integer()
        if self.is_kw("OFFSET"):
            self.take()
            q.offset = self.integer()
        if self.peek().kind != "eof":
            raise _unexpected(self.text, self.peek())
        return q

    def integer(self) -> int:
        tok = self.peek()
        if tok.kind != "number" or not isinstance(tok.value, int) or tok.value < 0:
            raise _unexpected(self.text, tok)
        self.take()
        return tok.value

    def path(self) -> PathRef:
        tok = self.ident()
        return PathRef(tok.text, tok.pos)

    def select_item(self) -> SelectItem:
        tok = self.peek()
        nxt = self.peek(1)
        if tok.kind == "ident" and nxt.kind == "punct" and nxt.text == "(":
            name = tok.upper()
            if name == "FIELDS":
                self.take()
                self.take()
                kind_tok = self.peek()
                if kind_tok.upper() not in ("ALL", "STANDARD", "CUSTOM"):
                    raise _unexpected(self.text, kind_tok)
                self.take()
                self.expect_punct(")")
                return SelectItem("fields", pos=tok.pos, fields_kind=kind_tok.upper())
            if name in AGGREGATES:
                self.take()
                self.take()
                if name == "COUNT" and self.peek().kind == "punct" and self.peek().text == ")":
                    self.take()
                    return SelectItem("count_star", pos=tok.pos)
                path = self.path()
                self.expect_punct(")")
                alias = None
                if self.peek().kind == "ident" and self.peek().upper() not in KEYWORDS:
                    alias = self.take().text
                return SelectItem("agg", path=path, func=name, alias=alias, pos=tok.pos)
            raise _unexpected(self.text, nxt)
        if tok.kind == "punct" and tok.text == "(":
            # Child-relationship sub-queries are not modelled by this org.
            raise _unexpected(self.text, tok)
        path = self.path()
        return SelectItem("field", path=path, pos=path.pos)

    def order_item(self) -> OrderItem:
        path = self.path()
        desc = False
        if self.is_kw("ASC", "DESC"):
            desc = self.take().upper() == "DESC"
        nulls_last = False  # SOQL sorts nulls first unless told otherwise, whatever the direction
        if self.is_kw("NULLS"):
            self.take()
            if not self.is_kw("FIRST", "LAST"):
                raise _unexpected(self.text, self.peek())
            nulls_last = self.take().upper() == "LAST"
        return OrderItem(path, desc, nulls_last)

    def condition(self) -> Any:
        first = self.unary()
        if not self.is_kw("AND", "OR"):
            return first
        op = self.peek().upper()
        items = [first]
        while self.is_kw(op):
            self.take()
            items.append(self.unary())
        if self.is_kw("AND", "OR"):
            # SOQL refuses to mix AND and OR without parentheses.
            raise _unexpected(self.text, self.peek())
        return BoolOp(op, items)

    def unary(self) -> Any:
        if self.is_kw("NOT"):
            self.take()
            return Not(self.unary())
        tok = self.peek()
        if tok.kind == "punct" and tok.text == "(":
            self.take()
            inner = self.condition()
            self.expect_punct(")")
            return inner
        return self.comparison()

    def comparison(self) -> Comparison:
        path = self.path()
        tok = self.peek()
        if tok.kind == "op":
            self.take()
            op = {"<>": "!="}.get(tok.text, tok.text)
            return Comparison(path, op, [self.value()], tok.pos)
        word = tok.upper()
        if word == "IN" or (word == "NOT" and self.is_kw("IN", k=1)):
            self.take()
            if word == "NOT":
                self.take()
            return Comparison(path, "IN" if word == "IN" else "NOTIN", self.value_list(), tok.pos)
        if word == "LIKE":
            self.take()
            return Comparison(path, "LIKE", [self.value()], tok.pos)
        if word == "IS":
            # Not SOQL; accepted because callers write it (``IS NULL`` = ``= null``).
            self.take()
            negate = False
            if self.is_kw("NOT"):
                self.take()
                negate = True
            null_tok = self.expect_kw("NULL")
            return Comparison(path, "!=" if negate else "=", [null_tok], tok.pos)
        raise _unexpected(self.text, tok)

    def value_list(self) -> list[Token]:
        self.expect_punct("(")
        if self.is_kw("SELECT"):
            raise _unexpected(self.text, self.peek())  # semi-joins are not modelled
        values = [self.value()]
        while self.peek().kind == "punct" and self.peek().text == ",":
            self.take()
            values.append(self.value())
        self.expect_punct(")")
        return values

    def value(self) -> Token:
        tok = self.peek()
        if tok.kind in ("string", "number", "date", "datetime") or tok.upper() in ("NULL", "TRUE", "FALSE"):
            return self.take()
        raise _unexpected(self.text, tok)


def parse(text: str) -> ParsedQuery:
    """Syntax only; names are resolved by :func:`compile_query`."""
    return _Parser(text).parse()


# -- compilation ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Join:
    alias: str
    sobject: SObject
    parent_alias: str
    fk: Field
    relationship: str  # canonical relationship name, e.g. "Account"


@dataclass(frozen=True)
class Column:
    """One resolved field reference: its SQL expression and where it lands in a record."""

    path: tuple[str, ...]  # canonical relationship names leading to the field
    field: Field
    sobject: SObject
    alias: str

    @property
    def sql(self) -> str:
        return f'{self.alias}."{self.field.name}"'

    @property
    def dotted(self) -> str:
        return ".".join((*self.path, self.field.name))


@dataclass
class Output:
    """A value in the response: a record key (possibly nested under relationships) or an aggregate alias."""

    key_path: tuple[str, ...]
    index: int  # position in the SQL row
    kind: str  # the field's describe type (how to print the value)
    column: Column | None = None
    func: str | None = None
    display: str = ""


@dataclass
class Plan:
    """A compiled query: the SQL fragments, parameters and how to shape rows into Salesforce records."""

    soql: str
    sobject: SObject
    kind: str  # "count" | "aggregate" | "records"
    include_deleted: bool
    select_sql: list[str]
    outputs: list[Output]
    joins: dict[tuple[str, ...], Join]
    where_sql: str
    where_params: list[Any]
    where_joins: set[tuple[str, ...]]
    order_joins: set[tuple[str, ...]]
    order_sql: str
    group_sql: str
    limit: int | None
    offset: int | None
    relationships: list[tuple[tuple[str, ...], int]]  # (path, index of that relationship's Id in the row)
    id_selected: bool = False

    # -- SQL text ---------------------------------------------------------------------------------------------------
    def _from(self, paths: set[tuple[str, ...]] | None = None) -> str:
        parts = [f'FROM "{self.sobject.name}" AS t0']
        for path, join in self.joins.items():
            if paths is not None and not any(p[:len(path)] == path for p in paths):
                continue
            parts.append(f'LEFT JOIN "{join.sobject.name}" AS {join.alias} '
                         f'ON {join.alias}."Id" = {join.parent_alias}."{join.fk.name}"')
        return " ".join(parts)

    def _where(self, conn: sqlite3.Connection) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.where_sql:
            clauses.append(f"({self.where_sql})")
            params.extend(self.where_params)
        if not self.include_deleted and self.sobject.field("IsDeleted") is not None and _has_deleted(conn, self.sobject):
            # The subquery reads a tiny partial index, so covering-index plans on t0 stay intact.
            clauses.append(f't0.rowid NOT IN (SELECT rowid FROM "{self.sobject.name}" WHERE "IsDeleted" = 1)')
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def _limit(self) -> tuple[str, list[Any]]:
        if self.limit is None and not self.offset:
            return "", []
        return " LIMIT ? OFFSET ?", [-1 if self.limit is None else self.limit, self.offset or 0]

    # -- execution --------------------------------------------------------------------------------------------------
    def count(self, conn: sqlite3.Connection) -> int:
        """Rows matched, after LIMIT/OFFSET (``SELECT COUNT() ...``)."""
        where, params = self._where(conn)
        limit, lparams = self._limit()
        sql_from = self._from(self.where_joins)
        if limit:
            sql = f"SELECT COUNT(*) FROM (SELECT 1 {sql_from}{where}{limit})"
        else:
            sql = f"SELECT COUNT(*) {sql_from}{where}"
        return int(conn.execute(sql, params + lparams).fetchone()[0])

    def first_rows(self, conn: sqlite3.Connection, n: int) -> list[tuple]:
        """Up to ``n`` full rows in result order (enough to answer small queries in one step)."""
        where, params = self._where(conn)
        skip = self.offset or 0
        take = n if self.limit is None else min(n, self.limit)
        sql = f"SELECT {', '.join(self.select_sql)} {self._from()}{where}{self.order_sql} LIMIT ? OFFSET ?"
        return conn.execute(sql, params + [take, skip]).fetchall()

    def rowids(self, conn: sqlite3.Connection) -> array:
        """The whole result as ordered rowids: a cursor that later pages read without re-running the query."""
        where, params = self._where(conn)
        limit, lparams = self._limit()
        order_paths = self.where_joins | self.order_joins
        sql = f"SELECT t0.rowid {self._from(order_paths)}{where}{self.order_sql}{limit}"
        out = array("q")
        cur = conn.execute(sql, params + lparams)
        while True:
            chunk = cur.fetchmany(20_000)
            if not chunk:
                return out
            out.extend(r[0] for r in chunk)

    def rows_by_rowid(self, conn: sqlite3.Connection, rowids: list[int]) -> list[tuple]:
        by_id: dict[int, tuple] = {}
        for start in range(0, len(rowids), _ROWID_CHUNK):  # stay under SQLite's bound-parameter limit
            chunk = rowids[start:start + _ROWID_CHUNK]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT t0.rowid, {', '.join(self.select_sql)} {self._from()} WHERE t0.rowid IN ({marks})"
            by_id.update((row[0], row[1:]) for row in conn.execute(sql, chunk))
        # Rows deleted since the cursor was opened are skipped, as a Salesforce cursor skips them.
        return [by_id[r] for r in rowids if r in by_id]

    def aggregate_rows(self, conn: sqlite3.Connection) -> list[tuple]:
        where, params = self._where(conn)
        limit, lparams = self._limit()
        sql = f"SELECT {', '.join(self.select_sql)} {self._from()}{where}{self.group_sql}{self.order_sql}{limit}"
        return conn.execute(sql, params + lparams).fetchall()

    def execute(self, conn: sqlite3.Connection, version: str) -> dict[str, Any]:
        """The whole result in one QueryResult-shaped dict (no paging): for tests and in-process callers."""
        if self.kind == "count":
            return {"totalSize": self.count(conn), "done": True, "records": []}
        if self.kind == "aggregate":
            rows = self.aggregate_rows(conn)
        else:
            rows = self.rows_by_rowid(conn, self.rowids(conn).tolist())
        return {"totalSize": len(rows), "done": True, "records": [self.record(r, version) for r in rows]}

    # -- shaping ----------------------------------------------------------------------------------------------------
    def record(self, row: tuple, version: str) -> dict[str, Any]:
        """One Salesforce record (``attributes`` first, relationships nested) from a row of ``select_sql``."""
        if self.kind == "aggregate":
            rec: dict[str, Any] = {"attributes": {"type": "AggregateResult"}}
            for out in self.outputs:
                rec[out.key_path[-1]] = _aggregate_value(out, row[out.index])
            return rec
        base = f"/services/data/v{version}/sobjects/"
        rec = {"attributes": {"type": self.sobject.name, "url": f"{base}{self.sobject.name}/{row[0]}"}}
        nested: dict[tuple[str, ...], dict[str, Any] | None] = {(): rec}
        rel_ids = dict(self.relationships)
        for out in self.outputs:
            parent = self._container(nested, out.key_path[:-1], row, rel_ids, base)
            if parent is not None:
                parent[out.key_path[-1]] = to_json_value(out.kind, row[out.index])
        return rec

    def _container(self, nested: dict, path: tuple[str, ...], row: tuple, rel_ids: dict, base: str) -> Any:
        if path in nested:
            return nested[path]
        parent = self._container(nested, path[:-1], row, rel_ids, base)
        if parent is None:
            nested[path] = None
            return None
        rel_id = row[rel_ids[path]]
        if rel_id is None:
            parent[path[-1]] = None
            nested[path] = None
            return None
        obj = self.joins[path].sobject
        child = {"attributes": {"type": obj.name, "url": f"{base}{obj.name}/{rel_id}"}}
        parent[path[-1]] = child
        nested[path] = child
        return child

    # -- query metadata (``columns=true``) -------------------------------------------------------------------------
    def column_metadata(self) -> dict[str, Any]:
        columns: list[dict[str, Any]] = []
        by_relationship: dict[tuple[str, ...], dict[str, Any]] = {}
        for out in self.outputs:
            if self.kind == "aggregate" and out.func is not None:
                columns.append(_column_entry(out.key_path[-1], out.display, None, aggregate=True,
                                             number=out.func in ("COUNT", "COUNT_DISTINCT", "SUM", "AVG")
                                             or (out.column is not None and out.column.field.type in NUMBER_TYPES)))
                continue
            col = out.column
            assert col is not None
            target = columns
            for depth in range(1, len(col.path) + 1):
                sub = col.path[:depth]
                if sub not in by_relationship:
                    join = self.joins[sub]
                    entry = _column_entry(sub[-1], sub[-1], None, foreign_key=join.fk.name)
                    target.append(entry)
                    by_relationship[sub] = entry
                target = by_relationship[sub]["joinColumns"]
            target.append(_column_entry(col.field.name, col.field.name, col.field))
        return {
            "columnMetadata": columns,
            "entityName": self.sobject.name,
            "groupBy": bool(self.group_sql),
            "idSelected": self.id_selected,
            "keyPrefix": self.sobject.key_prefix,
        }


_APEX_TYPES = {"id": "Id", "reference": "Id", "boolean": "Boolean", "currency": "Decimal", "percent": "Decimal",
               "double": "Double", "int": "Integer", "date": "Date", "datetime": "Datetime"}


def _column_entry(name: str, display: str, f: Field | None, aggregate: bool = False, number: bool = False,
                  foreign_key: str | None = None) -> dict[str, Any]:
    return {
        "aggregate": aggregate,
        "apexType": (_APEX_TYPES.get(f.type, "String") if f is not None else None),
        "booleanType": f is not None and f.type == "boolean",
        "columnName": name,
        "custom": name.endswith("__c"),
        "displayName": display,
        "foreignKeyName": foreign_key,
        "insertable": bool(f is not None and f.createable),
        "joinColumns": [],
        "numberType": number or (f is not None and f.type in NUMBER_TYPES),
        "textType": f is not None and f.type in TEXT_TYPES,
        "updatable": bool(f is not None and f.updateable),
    }


def to_json_value(kind: str, value: Any) -> Any:
    """A stored SQLite value as Salesforce's JSON shows it for a field of type ``kind``."""
    if value is None:
        return None
    if kind == "boolean":
        return bool(value) if not isinstance(value, str) else value.lower() in ("1", "true")
    if kind == "int":
        return int(value)
    if kind in ("currency", "percent", "double"):
        return float(value)
    if kind == "datetime":
        return canonical_datetime(value)
    return value


def _aggregate_value(out: Output, value: Any) -> Any:
    if value is None:
        return None
    if out.func in ("COUNT", "COUNT_DISTINCT"):
        return int(value)
    if out.func in ("SUM", "AVG"):
        return float(value)
    return to_json_value(out.kind, value)


def _has_deleted(conn: sqlite3.Connection, sobject: SObject) -> bool:
    return conn.execute(f'SELECT 1 FROM "{sobject.name}" WHERE "IsDeleted" = 1 LIMIT 1').fetchone() is not None


def ensure_indexes(conn: sqlite3.Connection) -> None:
    """Partial indexes holding only soft-deleted rows, so ``query`` can exclude them without a table scan."""
    from .schema import OBJECTS

    for obj in OBJECTS.values():
        if obj.field("IsDeleted") is not None:
            conn.execute(f'CREATE INDEX IF NOT EXISTS "ix_{obj.name}_deleted" ON "{obj.name}"("IsDeleted") '
                         f'WHERE "IsDeleted" = 1')
    conn.commit()


class _Compiler:
    def __init__(self, parsed: ParsedQuery, include_deleted: bool) -> None:
        self.q = parsed
        self.text = parsed.text
        self.include_deleted = include_deleted
        obj = get_object(parsed.object_tok.text)
        if obj is None:
            raise SoqlError("INVALID_TYPE", located(self.text, parsed.object_tok.pos,
                                                    _BAD_TYPE.format(name=parsed.object_tok.text)))
        self.obj = obj
        self.joins: dict[tuple[str, ...], Join] = {}
        self.params: list[Any] = []
        self.where_joins: set[tuple[str, ...]] = set()
        self.order_joins: set[tuple[str, ...]] = set()

    def resolve(self, ref: PathRef) -> Column:
        parts = ref.text.split(".")
        # A leading object name is allowed: ``Opportunity.Name``.
        if len(parts) > 1 and parts[0].lower() == self.obj.name.lower() and self.obj.field(parts[0]) is None:
            parts = parts[1:]
        obj, alias, path, offset = self.obj, "t0", (), ref.pos
        for rel in parts[:-1]:
            fk = _relationship_field(obj, rel)
            if fk is None:
                raise SoqlError("INVALID_FIELD", located(self.text, offset, _BAD_RELATIONSHIP.format(name=rel)))
            target = get_object(fk.reference_to[0])
            assert target is not None and fk.relationship_name is not None
            path = (*path, fk.relationship_name)
            if path not in self.joins:
                self.joins[path] = Join(f"t{len(self.joins) + 1}", target, alias, fk, fk.relationship_name)
            obj, alias = target, self.joins[path].alias
            offset += len(rel) + 1
        f = obj.field(parts[-1])
        if f is None:
            raise SoqlError("INVALID_FIELD", located(self.text, offset,
                                                     _NO_SUCH_COLUMN.format(name=parts[-1], entity=obj.name)))
        return Column(path, f, obj, alias)

    def compile(self) -> Plan:
        q = self.q
        items = self._expand_fields(q.items)
        kinds = {it.kind for it in items}
        # Names are resolved in text order so that the first bad name is the one reported, as Salesforce does.
        item_cols = [self.resolve(it.path) if it.path is not None else None for it in items]
        if "count_star" in kinds and len(items) > 1:
            other = next((it for it in items if it.kind != "count_star"), items[1])
            raise SoqlError("MALFORMED_QUERY", located(self.text, other.pos,
                                                       "COUNT() must be the only element in the SELECT list"))
        where_sql = ""
        if q.where is not None:
            where_sql = self._condition(q.where)
        where_params = list(self.params)
        group_cols = [self.resolve(p) for p in q.group_by]
        if "count_star" in kinds:
            if q.group_by:
                raise SoqlError("MALFORMED_QUERY", located(self.text, q.group_by[0].pos,
                                                           "GROUP BY not allowed in COUNT() query"))
            if q.order_by:
                raise SoqlError("MALFORMED_QUERY", located(self.text, q.order_by[0].path.pos,
                                                           "ORDER BY not allowed in COUNT() query"))
        if q.offset is not None and q.offset > MAX_OFFSET:
            raise SoqlError("NUMBER_OUTSIDE_VALID_RANGE", f"Maximum SOQL offset allowed is {MAX_OFFSET}")

        select_sql: list[str] = []
        outputs: list[Output] = []
        relationships: list[tuple[tuple[str, ...], int]] = []
        order_sql = ""
        group_sql = ""
        id_selected = False
        if "count_star" in kinds:
            kind = "count"
        elif "agg" in kinds or q.group_by:
            kind = "aggregate"
            expr_n = 0
            seen_keys: set[str] = set()
            for it, col in zip(items, item_cols, strict=True):
                assert col is not None
                if it.kind == "field":
                    if not any(g.dotted == col.dotted for g in group_cols):
                        raise SoqlError("MALFORMED_QUERY", located(self.text, it.pos,
                                                                   f"Field must be grouped or aggregated: "
                                                                   f"{col.field.name}"))
                    key = col.field.name
                    outputs.append(Output((key,), len(select_sql), col.field.type, col))
                    select_sql.append(col.sql)
                else:
                    assert it.func is not None
                    self._check_aggregate(it, col)
                    key = it.alias or f"expr{expr_n}"
                    if it.alias is None:
                        expr_n += 1
                    outputs.append(Output((key,), len(select_sql), col.field.type, col, it.func,
                                          f"{it.func.lower()}({col.dotted})"))
                    select_sql.append(_aggregate_sql(it.func, col))
                if key.lower() in seen_keys:
                    raise SoqlError("MALFORMED_QUERY", located(self.text, it.pos, f"duplicate alias: {key}"))
                seen_keys.add(key.lower())
            if group_cols:
                group_sql = " GROUP BY " + ", ".join(c.sql for c in group_cols)
            order_sql = self._order_by(group_cols)
        else:
            kind = "records"
            select_sql.append('t0."Id"')
            seen: set[str] = set()
            for it, col in zip(items, item_cols, strict=True):
                assert col is not None
                if col.dotted.lower() in seen:
                    raise SoqlError("MALFORMED_QUERY", located(self.text, it.pos,
                                                               f"duplicate field selected: {col.dotted}"))
                seen.add(col.dotted.lower())
                id_selected = id_selected or (not col.path and col.field.name == "Id")
                outputs.append(Output((*col.path, col.field.name), len(select_sql), col.field.type, col))
                select_sql.append(col.sql)
            for path in self.joins:
                if any(o.column is not None and o.column.path[:len(path)] == path for o in outputs):
                    relationships.append((path, len(select_sql)))
                    select_sql.append(f'{self.joins[path].alias}."Id"')
            order_sql = self._order_by(None)
        return Plan(self.text, self.obj, kind, self.include_deleted, select_sql, outputs, dict(self.joins),
                    where_sql, where_params, self.where_joins, self.order_joins, order_sql, group_sql, q.limit,
                    q.offset, relationships, id_selected)

    def _expand_fields(self, items: list[SelectItem]) -> list[SelectItem]:
        out: list[SelectItem] = []
        for it in items:
            if it.kind != "fields":
                out.append(it)
                continue
            if it.fields_kind in ("ALL", "CUSTOM") and (self.q.limit is None or self.q.limit > FIELDS_ALL_MAX_LIMIT):
                raise SoqlError("MALFORMED_QUERY", located(
                    self.text, it.pos, f"The SOQL FIELDS function must have a LIMIT of at most "
                                       f"{FIELDS_ALL_MAX_LIMIT}"))
            for f in self.obj.fields:
                custom = f.name.endswith("__c")
                if it.fields_kind == "ALL" or (it.fields_kind == "CUSTOM") == custom:
                    out.append(SelectItem("field", path=PathRef(f.name, it.pos), pos=it.pos))
        return out

    def _check_aggregate(self, it: SelectItem, col: Column) -> None:
        t = col.field.type
        if it.func in ("SUM", "AVG") and t not in NUMBER_TYPES:
            raise SoqlError("MALFORMED_QUERY", located(
                self.text, it.pos, f"field {col.field.name} does not support aggregate operator {it.func}"))
        if it.func in ("MIN", "MAX") and t == "boolean":
            raise SoqlError("MALFORMED_QUERY", located(
                self.text, it.pos, f"field {col.field.name} does not support aggregate operator {it.func}"))

    def _order_by(self, group_cols: list[Column] | None) -> str:
        if not self.q.order_by:
            # Salesforce guarantees no order; rowid (= creation order, as Ids) keeps pages deterministic.
            return "" if group_cols is not None else " ORDER BY t0.rowid"
        parts = []
        for item in self.q.order_by:
            col = self.resolve(item.path)
            self.order_joins.add(col.path)
            if group_cols is not None and not any(g.dotted == col.dotted for g in group_cols):
                raise SoqlError("MALFORMED_QUERY", located(self.text, item.path.pos,
                                                           f"Ordered field must be grouped or aggregated: "
                                                           f"{col.field.name}"))
            if col.field.type == "textarea" and col.field.length > 255:
                raise SoqlError("INVALID_FIELD", located(self.text, item.path.pos,
                                                         f"field '{col.field.name}' can not be sorted in a query "
                                                         "call"))
            collate = " COLLATE NOCASE" if col.field.type in TEXT_TYPES else ""
            direction = " DESC" if item.desc else " ASC"
            nulls = " NULLS LAST" if item.nulls_last else " NULLS FIRST"
            parts.append(f"{col.sql}{collate}{direction}{nulls}")
        if group_cols is None:
            parts.append("t0.rowid")
        return " ORDER BY " + ", ".join(parts)

    # -- WHERE ------------------------------------------------------------------------------------------------------
    def _condition(self, node: Any) -> str:
        if isinstance(node, BoolOp):
            return "(" + f" {node.op} ".join(self._condition(i) for i in node.items) + ")"
        if isinstance(node, Not):
            # SOQL has two-valued logic: NOT of a comparison on a null field is true.
            return f"(NOT COALESCE({self._condition(node.item)}, 0))"
        return self._comparison(node)

    def _comparison(self, c: Comparison) -> str:
        col = self.resolve(c.path)
        self.where_joins.add(col.path)
        f = col.field
        if f.type == "textarea" and f.length > 255:
            raise SoqlError("INVALID_FIELD", located(self.text, c.path.pos,
                                                     f"field '{f.name}' can not be filtered in a query call"))
        text = f.type in TEXT_TYPES
        coll = " COLLATE NOCASE" if text else ""
        sql = col.sql
        if c.op == "LIKE":
            tok = c.values[0]
            if not text:
                raise SoqlError("INVALID_FIELD", located(self.text, c.pos, f"invalid operator on {f.type} field"
                                                         if f.type not in ID_TYPES else "invalid operator on id field"))
            if tok.kind != "string":
                raise self._type_error(tok, f)
            self.params.append(tok.like)
            return f"{sql} LIKE ? ESCAPE '\\'"
        values = [self._literal(tok, f) for tok in c.values]
        if c.op in ("IN", "NOTIN"):
            present = [v for v in values if v is not None]
            has_null = len(present) < len(values)
            self.params.extend(present)
            marks = ",".join("?" * len(present))
            if c.op == "IN":
                parts = [f"{sql}{coll} IN ({marks})"] if present else []
                if has_null:
                    parts.append(f"{sql} IS NULL")
                return "(" + " OR ".join(parts) + ")"
            if has_null:
                return f"({sql} IS NOT NULL" + (f" AND {sql}{coll} NOT IN ({marks}))" if present else ")")
            return f"({sql} IS NULL OR {sql}{coll} NOT IN ({marks}))"
        value = values[0]
        if value is None:
            if c.op == "=":
                return f"{sql} IS NULL"
            if c.op == "!=":
                return f"{sql} IS NOT NULL"
            return "0"
        self.params.append(value)
        if c.op == "!=":
            # SOQL's != also matches records whose field is null.
            return f"{sql} IS NOT ?{coll}"
        return f"{sql} {c.op} ?{coll}"

    def _literal(self, tok: Token, f: Field) -> Any:
        word = tok.upper()
        if word == "NULL":
            return None
        t = f.type
        if tok.kind == "string" and tok.like_only:
            raise SoqlError("MALFORMED_QUERY", located(self.text, tok.pos, f"Invalid string literal {tok.text}. "
                                                       f"Illegal character sequence '{tok.like_only}' in string "
                                                       "literal."))
        if t in TEXT_TYPES:
            if tok.kind != "string":
                raise self._type_error(tok, f)
            # Salesforce stores no empty text: '' means blank, i.e. null.
            return tok.value if tok.value != "" else None
        if t in ID_TYPES:
            if tok.kind != "string":
                raise self._type_error(tok, f)
            value = tok.value
            if not _ID_RE.fullmatch(value) or (len(value) == 18 and case_safe(value[:15])[15:] != value[15:].upper()):
                raise SoqlError("INVALID_QUERY_FILTER_OPERATOR", located(self.text, tok.pos,
                                                                         f"invalid ID field: {value}"))
            return case_safe(value[:15])
        if t == "boolean":
            if word not in ("TRUE", "FALSE"):
                raise self._type_error(tok, f)
            return 1 if word == "TRUE" else 0
        if t in NUMBER_TYPES:
            if tok.kind != "number":
                raise self._type_error(tok, f)
            return tok.value
        if t == "date":
            if tok.kind != "date":
                raise self._type_error(tok, f)
            return tok.value
        if t == "datetime":
            if tok.kind != "datetime":
                raise self._type_error(tok, f)
            return tok.value
        if tok.kind != "string":
            raise self._type_error(tok, f)
        return tok.value

    def _type_error(self, tok: Token, f: Field) -> SoqlError:
        t = f.type
        if t in TEXT_TYPES or t in ID_TYPES or t not in NUMBER_TYPES | {"boolean", "date", "datetime"}:
            msg = f"value of filter criterion for field '{f.name}' must be of type string and should be enclosed in " \
                  "quotes"
        else:
            soap = {"boolean": "boolean", "date": "date", "datetime": "dateTime", "int": "int"}.get(t, "double")
            msg = f"value of filter criterion for field '{f.name}' must be of type {soap} and should not be " \
                  "enclosed in quotes"
        return SoqlError("INVALID_FIELD", located(self.text, tok.pos, msg))


def _relationship_field(obj: SObject, rel: str) -> Field | None:
    for f in obj.fields:
        if f.relationship_name and f.relationship_name.lower() == rel.lower() and f.reference_to:
            return f
    return None


def _aggregate_sql(func: str, col: Column) -> str:
    if func == "COUNT":
        return f"COUNT({col.sql})"
    if func == "COUNT_DISTINCT":
        coll = " COLLATE NOCASE" if col.field.type in TEXT_TYPES else ""
        return f"COUNT(DISTINCT {col.sql}{coll})"
    if func in ("MIN", "MAX") and col.field.type in TEXT_TYPES:
        return f"{func}({col.sql} COLLATE NOCASE)"
    return f"{func}({col.sql})"


def compile_query(text: str, include_deleted: bool = False) -> Plan:
    """Parse and resolve ``text``; raises :class:`SoqlError` exactly where Salesforce would refuse the query."""
    if not text or not text.strip():
        raise SoqlError("MALFORMED_QUERY", "A query string has to be specified")
    return _Compiler(parse(text), include_deleted).compile()
