"""Data 360 SQL on SQLite: translation, PostgreSQL semantics, typed parameters and Hyper-worded errors."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator import dcsql
from emulator.schema import DMO_COLUMNS, DMO_NAME
from emulator.state import connect, init_datacloud_db

COLS = list(DMO_COLUMNS)
KEYS = ["OPP-0003", "OPP-0001", "opp-x01", "0000042", "SF-2019-00001", None, "OPP-0002", "Zz-1", "b", "Ärger"]


def _row(i: int, key: str | None) -> tuple:
    return (key, f"ACC-{i % 3}", f"Deal {i}", "Prospecting" if i % 2 else "Closed Won", f"2026-01-{i + 1:02d}",
            1000.25 * i if i != 4 else None, float(10 * (i % 5)), "New Customer", None, f"desc {i}",
            f"2026-01-{i + 1:02d}T10:00:00.000Z")


@pytest.fixture(scope="module")
def conn(tmp_path_factory: pytest.TempPathFactory) -> sqlite3.Connection:
    path = tmp_path_factory.mktemp("dcsql") / "datacloud.sqlite"
    with connect(path) as c:
        init_datacloud_db(c)
        c.executemany(f'INSERT INTO "{DMO_NAME}" VALUES ({",".join("?" * len(COLS))})',
                      [_row(i, k) for i, k in enumerate(KEYS)])
        c.commit()
    return dcsql.open_dmo(path)


def run(conn: sqlite3.Connection, sql: str, params: Any = None) -> tuple[list[str], list[list[Any]], list[Any]]:
    """Execute like the server does: names, rows decoded from the JSON text, known types."""
    tr = dcsql.translate(sql, params)
    names = dcsql.result_names(conn, tr)
    types = tr.column_types(names)
    guard = dcsql.guard(conn)
    try:
        rows = [json.loads(r[0]) for r in conn.execute(dcsql.execution_sql(tr, len(names), types), tr.bindings)]
    except sqlite3.Error as exc:
        raise dcsql.map_error(exc, guard) from None
    return names, rows, [t.name if t else None for t in types]


def error_of(conn: sqlite3.Connection, sql: str, params: Any = None) -> dcsql.SqlError:
    with pytest.raises(dcsql.SqlError) as info:
        run(conn, sql, params)
    return info.value


def test_quoted_identifiers_and_postgres_null_order(conn):
    names, rows, types = run(conn, 'SELECT "ExternalId__c", "Amount__c" FROM "Opportunity_Sync__dlm" '
                                   'ORDER BY "ExternalId__c"')
    assert names == ["ExternalId__c", "Amount__c"]
    assert types == ["Varchar", "Numeric"]
    keys = [r[0] for r in rows]
    # PostgreSQL: ASC puts NULLs last; text in byte order (SQLite BINARY = code point order).
    assert keys == sorted(k for k in KEYS if k is not None) + [None]
    _, rows, _ = run(conn, 'SELECT "ExternalId__c" FROM "Opportunity_Sync__dlm" ORDER BY 1 DESC')
    assert rows[0] == [None]


def test_unquoted_names_resolve_case_insensitively_and_echo_as_written(conn):
    names, rows, types = run(conn, "SELECT externalid__c, NAME__C AS n FROM opportunity_sync__dlm WHERE "
                                   "externalid__c = 'b'")
    assert names == ["externalid__c", "n"]
    assert rows == [["b", "Deal 8"]]
    assert types == ["Varchar", "Varchar"]


def test_wrong_case_in_quotes_is_an_error_with_hint(conn):
    err = error_of(conn, 'SELECT "externalid__c" FROM "Opportunity_Sync__dlm"')
    assert err.message == 'column "externalid__c" does not exist'
    assert "ExternalId__c" in err.hint
    err = error_of(conn, 'SELECT 1 FROM "opportunity_sync__dlm"')
    assert err.message == 'relation "opportunity_sync__dlm" does not exist'


def test_unknown_quoted_name_is_never_a_string_literal(conn):
    # SQLite alone would read "Nope" as the string 'Nope'.
    assert error_of(conn, 'SELECT "Nope" FROM "Opportunity_Sync__dlm"').message == 'column "Nope" does not exist'
    assert error_of(conn, 'SELECT 1 FROM "Opportunity_Sync__dlm" WHERE "Nope" = 1').sqlstate == "42703"


def test_default_column_names_follow_postgres(conn):
    names, rows, types = run(conn, 'SELECT count(*), MIN("ExternalId__c"), 1 + 1, CAST("Amount__c" AS INTEGER), '
                                   '"Probability__c"::int, true FROM "Opportunity_Sync__dlm" GROUP BY 4, 5 LIMIT 1')
    assert names == ["count", "min", "?column?", "Amount__c", "Probability__c", "bool"]
    assert types[:2] == ["BigInt", "Varchar"]
    assert types[3:] == ["Integer", "Integer", "Boolean"]


def test_ntile_boundaries_recipe(conn):
    names, rows, types = run(conn, '''
        SELECT b, MIN(k) AS lo, MAX(k) AS hi, COUNT(*) AS n
        FROM (SELECT "ExternalId__c" AS k, NTILE(3) OVER (ORDER BY "ExternalId__c") AS b
              FROM "Opportunity_Sync__dlm" WHERE "ExternalId__c" IS NOT NULL) t
        GROUP BY b ORDER BY b''')
    keys = sorted(k for k in KEYS if k is not None)
    assert names == ["b", "lo", "hi", "n"]
    assert types == ["BigInt", "Varchar", "Varchar", "BigInt"]
    assert rows == [[1, keys[0], keys[2], 3], [2, keys[3], keys[5], 3], [3, keys[6], keys[8], 3]]


def test_row_number_mod_recipe(conn):
    _, rows, _ = run(conn, '''
        SELECT k FROM (SELECT "ExternalId__c" AS k, ROW_NUMBER() OVER (ORDER BY "ExternalId__c") AS rn
                       FROM "Opportunity_Sync__dlm") t
        WHERE MOD(rn - 1, 4) = 0 ORDER BY k''')
    keys = sorted(k for k in KEYS if k is not None) + [None]
    assert rows == [[keys[0]], [keys[4]], [keys[8]]]


def test_percentile_disc_on_text(conn):
    names, rows, types = run(conn, '''
        SELECT percentile_disc(0.25) WITHIN GROUP (ORDER BY "ExternalId__c") AS p1,
               percentile_disc(0.5) WITHIN GROUP (ORDER BY "ExternalId__c") AS p2,
               percentile_disc(1.0) WITHIN GROUP (ORDER BY "ExternalId__c" DESC) AS p3
        FROM "Opportunity_Sync__dlm"''')
    keys = sorted(k for k in KEYS if k is not None)
    n = len(keys)
    assert rows == [[keys[math.ceil(0.25 * n) - 1], keys[math.ceil(0.5 * n) - 1], keys[0]]]
    assert types == ["Varchar"] * 3
    assert "between 0 and 1" in error_of(conn, 'SELECT percentile_disc(2) WITHIN GROUP (ORDER BY "Name__c") '
                                               'FROM "Opportunity_Sync__dlm"').message


def test_limit_offset_fetch_forms(conn):
    base = 'SELECT "ExternalId__c" FROM "Opportunity_Sync__dlm" ORDER BY 1'
    keys = sorted(k for k in KEYS if k is not None)
    assert run(conn, base + " OFFSET 2 LIMIT 2")[1] == [[keys[2]], [keys[3]]]
    assert run(conn, base + " LIMIT 2 OFFSET 2")[1] == [[keys[2]], [keys[3]]]
    assert run(conn, base + " OFFSET 7 ROWS")[1] == [[keys[7]], [keys[8]], [None]]
    assert run(conn, base + " OFFSET 1 ROWS FETCH FIRST 2 ROWS ONLY")[1] == [[keys[1]], [keys[2]]]
    assert run(conn, base + " FETCH NEXT ROW ONLY")[1] == [[keys[0]]]
    assert len(run(conn, base + " LIMIT ALL")[1]) == len(KEYS)


def test_generate_series_like_the_official_mcp_smoke_query(conn):
    names, rows, _ = run(conn, "SELECT g::text || rpad(1::text, 5) as a, g as b FROM generate_series(1, 4) g "
                               "ORDER BY b DESC")
    assert names == ["a", "b"]
    assert rows == [["41    ", 4], ["31    ", 3], ["21    ", 2], ["11    ", 1]]
    assert run(conn, "SELECT n FROM generate_series(10, 1, -4) AS t(n)")[1] == [[10], [6], [2]]


def test_postgres_operators_and_functions(conn):
    _, rows, types = run(conn, '''
        SELECT "Name__c" ILIKE 'deal 1%' AS i, "Name__c" LIKE 'deal%' AS l, NULL IS DISTINCT FROM 1 AS d,
               concat('a', NULL, 'b') AS c, left('hello', 2) AS lft, right('hello', 2) AS rgt,
               split_part('a-b-c', '-', 2) AS sp, greatest(1, NULL, 3) AS g, '2026-01-05T23:59:59Z'::date AS dt,
               strpos('hello', 'l') AS pos, lpad('7', 3, '0') AS lp
        FROM "Opportunity_Sync__dlm" WHERE "ExternalId__c" = 'OPP-0001' ''')
    assert rows == [[True, False, True, "ab", "he", "lo", "b", 3, "2026-01-05", 3, "007"]]
    assert types[:3] == ["Boolean"] * 3
    assert types[8] == "Date"


@pytest.mark.parametrize("value", [1000.25, 0.1 + 0.2, 123456789012345678.0, 12345678901234.56, -2.5e-7, 5e-324,
                                   1e300, 0.0, 42.0])
def test_numbers_are_exact(conn, value):
    _, rows, _ = run(conn, "SELECT :v AS v", [{"name": "v", "type": "Double", "value": repr(value)}])
    assert rows[0][0] == value


@pytest.mark.parametrize("value", ["it's", 'say "hi"', "a -- b", "x; DROP TABLE \"Opportunity_Sync__dlm\"; --",
                                   "'; DELETE FROM \"Opportunity_Sync__dlm\" WHERE ''='", "back\\slash\\",
                                   "ünïcödé ✅ 数据 🚀", "line\nbreak\r\ttab", ":name", "$1", "?"])
def test_parameters_are_bound_not_formatted(conn, value):
    _, rows, _ = run(conn, "SELECT :p AS v, length(:p) AS n", [{"name": "p", "type": "Varchar", "value": value}])
    assert rows == [[value, len(value)]]
    assert conn.execute(f'SELECT count(*) FROM "{DMO_NAME}"').fetchone()[0] == len(KEYS)


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_any_text_parameter_round_trips(conn, value):
    _, rows, _ = run(conn, "SELECT :p AS v", [{"name": "p", "type": "Varchar", "value": value}])
    assert rows == [[value]]


def test_typed_parameters(conn):
    params = [{"name": "since", "type": "TimestampTZ", "value": "2026-01-05T12:00:00+02:00"},
              {"name": "day", "type": "Date", "value": "2026-01-08"},
              {"name": "n", "type": "Integer", "value": "2"},
              {"name": "amt", "type": "Numeric", "value": "1000"},
              {"name": "flag", "type": "Bool", "value": "true"}]
    _, rows, _ = run(conn, '''SELECT "ExternalId__c" FROM "Opportunity_Sync__dlm"
                              WHERE "LastModifiedDate__c" >= :since AND "CloseDate__c" <= :day
                                AND "Amount__c" > :amt AND :flag ORDER BY "CloseDate__c" LIMIT :n''', params)
    # 12:00+02:00 is 10:00Z on the 5th: rows 4..7 by date, minus row 4 (NULL amount); the first two by date.
    assert rows == [[None], ["OPP-0002"]]
    # JSON scalars as the official MCP client sends them, and no type at all
    _, rows, _ = run(conn, "SELECT :a AS a, :b AS b, :c AS c",
                     [{"name": "a", "value": 7}, {"name": "b", "type": "Boolean", "value": True},
                      {"name": ":c", "type": "Varchar", "value": "x"}])
    assert rows == [[7, 1, "x"]]


def test_parameter_errors(conn):
    assert error_of(conn, "SELECT :missing").sqlstate == "42P02"
    err = error_of(conn, "SELECT :n", [{"name": "n", "type": "Integer", "value": "12abc"}])
    assert err.message == 'invalid input syntax for type integer: "12abc"'
    assert error_of(conn, "SELECT :d", [{"name": "d", "type": "Date", "value": "yesterday"}]).sqlstate == "22P02"
    assert error_of(conn, "SELECT :d", [{"name": "d", "type": "Nonsense", "value": "1"}]).sqlstate == "42704"
    assert error_of(conn, "SELECT 1", "not a list").sqlstate == "22023"


@pytest.mark.parametrize("sql, word", [
    ('DELETE FROM "Opportunity_Sync__dlm"', "DELETE"),
    ('INSERT INTO "Opportunity_Sync__dlm"("Name__c") VALUES (\'x\')', "INSERT"),
    ('UPDATE "Opportunity_Sync__dlm" SET "Name__c" = 1', "UPDATE"),
    ('DROP TABLE "Opportunity_Sync__dlm"', "DROP"),
    ("PRAGMA writable_schema = 1", "PRAGMA"),
    ("ATTACH DATABASE '/tmp/x.db' AS x", "ATTACH"),
    ('WITH t AS (SELECT 1) DELETE FROM "Opportunity_Sync__dlm"', "DELETE"),
])
def test_only_reads_run(conn, sql, word):
    err = error_of(conn, sql)
    assert err.message == f"cannot execute {word} in a read-only transaction"
    assert conn.execute(f'SELECT count(*) FROM "{DMO_NAME}"').fetchone()[0] == len(KEYS)


@pytest.mark.parametrize("sql, message", [
    ("SELECT 1; SELECT 2", "cannot insert multiple commands into a prepared statement"),
    ("SELECT * FROM sqlite_master", 'relation "sqlite_master" does not exist'),
    ("SELECT x FROM nope", 'relation "nope" does not exist'),
    ("SELECT nosuchfn(1)", "function nosuchfn does not exist"),
    ("SELECT 1 +", "syntax error at end of input"),
    ("SELEC 1", 'syntax error at or near "SELEC"'),
    ("SELECT 'open", "unterminated quoted string at or near \"'open\""),
    ("", "syntax error at end of input"),
])
def test_error_messages(conn, sql, message):
    assert error_of(conn, sql).message == message


def test_authorizer_blocks_other_tables_even_when_translation_misses_them(conn, tmp_path):
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).close()
    tr = dcsql.Translation("SELECT * FROM pragma_table_info('Opportunity_Sync__dlm')", {}, None)
    guard = dcsql.guard(conn)
    with pytest.raises(sqlite3.DatabaseError) as info:
        conn.execute(tr.sql).fetchall()
    assert dcsql.map_error(info.value, guard).sqlstate in ("42P01", "25006")


def test_select_star_gets_dmo_types(conn):
    names, rows, types = run(conn, 'SELECT * FROM "Opportunity_Sync__dlm" WHERE ("ExternalId__c" = :k)',
                             [{"name": "k", "type": "Varchar", "value": "OPP-0001"}])
    assert names == COLS
    assert types == list(DMO_COLUMNS.values())
    assert rows == [list(_row(1, "OPP-0001"))]


def test_timestamp_parameter_format_matches_storage():
    assert dcsql.convert_parameter("TimestampTZ", "2025-01-01T00:00:00Z") == "2025-01-01T00:00:00.000Z"
    assert dcsql.convert_parameter("TimestampTZ", "2025-01-01 01:30:00.123456+01:30") == "2025-01-01T00:00:00.123Z"
    assert dcsql.convert_parameter("Date", "2025-02-03") == "2025-02-03"


def test_v1_orderby_parameter():
    assert dcsql.translate_order_by("Name__c ASC, 2 DESC") == "Name__c ASC NULLS LAST , 2 DESC NULLS FIRST"
    with pytest.raises(dcsql.SqlError):
        dcsql.translate_order_by("1; DROP TABLE x")


def test_rows_decode_exactly_like_the_dmo(conn):
    names, rows, _ = run(conn, 'SELECT * FROM "Opportunity_Sync__dlm" ORDER BY "ExternalId__c"')
    expected = sorted((_row(i, k) for i, k in enumerate(KEYS)), key=lambda r: (r[0] is None, r[0] or ""))
    assert [tuple(r) for r in rows] == expected


def test_translation_never_mutates_caller_path(tmp_path: Path):
    # open_dmo refuses writes at the connection level, independently of the translator.
    path = tmp_path / "ro.sqlite"
    with connect(path) as c:
        init_datacloud_db(c)
    ro = dcsql.open_dmo(path)
    with pytest.raises(sqlite3.OperationalError):
        ro.execute(f'DELETE FROM "{DMO_NAME}"')


@pytest.mark.parametrize("sql", [
    'SELECT * FROM "Opportunity_Sync__dlm" ORDER BY "ExternalId__c"',
    'SELECT * FROM "Opportunity_Sync__dlm" WHERE "ExternalId__c" >= :lo ORDER BY "ExternalId__c" DESC LIMIT 4',
    'SELECT "ExternalId__c" AS k, "Amount__c" FROM "Opportunity_Sync__dlm" ORDER BY k, 2 DESC',
    'SELECT "Amount__c" AS "ExternalId__c", "Name__c" FROM "Opportunity_Sync__dlm" ORDER BY "ExternalId__c"',
    'SELECT t."Name__c", t."Probability__c" FROM "Opportunity_Sync__dlm" t ORDER BY 2, 1 OFFSET 3',
    'SELECT "Name__c" FROM "Opportunity_Sync__dlm" WHERE "ExternalId__c" IN '
    '(SELECT "ExternalId__c" FROM "Opportunity_Sync__dlm" ORDER BY 1 LIMIT 3) ORDER BY 1',
])
def test_direct_and_wrapped_execution_agree(conn, sql):
    tr = dcsql.translate(sql, [{"name": "lo", "type": "Varchar", "value": "OPP"}] if ":lo" in sql else None)
    assert tr.direct is not None
    names = dcsql.result_names(conn, tr)
    types = tr.column_types(names)
    direct = conn.execute(dcsql.execution_sql(tr, len(names), types), tr.bindings).fetchall()
    wrapped = conn.execute(dcsql.execution_sql(tr, len(names), types, direct=False), tr.bindings).fetchall()
    assert direct == wrapped and len(direct) > 0


@pytest.mark.parametrize("sql", ['SELECT count(*) FROM "Opportunity_Sync__dlm"',
                                 'SELECT DISTINCT "Name__c" FROM "Opportunity_Sync__dlm"',
                                 'SELECT "Amount__c" * 2 FROM "Opportunity_Sync__dlm"',
                                 'WITH t AS (SELECT 1 AS x) SELECT x FROM t',
                                 'SELECT "Name__c" FROM "Opportunity_Sync__dlm" UNION SELECT \'x\''])
def test_other_shapes_run_wrapped(sql):
    assert dcsql.translate(sql).direct is None
