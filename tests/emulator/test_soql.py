"""SOQL → SQLite: semantics, Salesforce's error bodies, and parameterisation, in-process against a small org."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.ids import make_id
from emulator.soql import SoqlError, compile_query, ensure_indexes, tokenize
from emulator.state import init_org_db

V = "62.0"
ACC = [make_id("001", i) for i in range(1, 4)]
OPP = [make_id("006", i) for i in range(1, 9)]
USER = make_id("005", 1)
NOW = "2026-01-01T00:00:00.000+0000"
TRICKY_KEY = "O'Brien \\ \"quoted\" 50%_off\n"


@pytest.fixture
def db() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    init_org_db(conn)
    ensure_indexes(conn)
    conn.execute('INSERT INTO "User"(Id, IsDeleted, Username, Name, LastName, Email, IsActive, TimeZoneSidKey) '
                 "VALUES(?, 0, 'u@x', 'Integration User', 'User', 'u@x', 1, 'GMT')", (USER,))
    accounts = [(ACC[0], "Acme", "ACC-1"), (ACC[1], "beta", "ACC-2"), (ACC[2], "Gamma", TRICKY_KEY)]
    conn.executemany('INSERT INTO "Account"(Id, IsDeleted, OwnerId, Name, ExternalId__c) VALUES(?, 0, ?, ?, ?)',
                     [(i, USER, n, k) for i, n, k in accounts])
    # (Id, Name, AccountId, Stage, CloseDate, Amount, ExternalId__c, IsDeleted, CreatedDate)
    opps = [
        (OPP[0], "Alpha", ACC[0], "Prospecting", "2026-01-10", 100.0, "OPP-1", 0, NOW),
        (OPP[1], "bravo", ACC[0], "Closed Won", "2026-02-10", 250.5, "opp-2", 0, "2026-01-02T10:00:00.000+0000"),
        (OPP[2], "Charlie", ACC[1], "Prospecting", "2026-03-10", None, "OPP-3", 0, NOW),
        (OPP[3], "delta", None, "Qualification", "2026-04-10", 75.0, None, 0, NOW),
        (OPP[4], "Echo", ACC[2], "Prospecting", "2026-05-10", 10.0, TRICKY_KEY, 0, NOW),
        (OPP[5], "Foxtrot", ACC[1], "Closed Lost", "2026-06-10", 5.0, "OPP-6", 1, NOW),  # in the recycle bin
        (OPP[6], None, None, "Prospecting", "2026-07-10", 1.0, "x'); DROP TABLE Opportunity; --", 0, NOW),
        (OPP[7], "Golf", ACC[0], "Prospecting", "2026-08-10", 20.0, None, 0, NOW),
    ]
    conn.executemany('INSERT INTO "Opportunity"(Id, Name, AccountId, StageName, CloseDate, Amount, ExternalId__c, '
                     'IsDeleted, CreatedDate, OwnerId) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
                     [(*o, USER) for o in opps])
    conn.commit()
    return conn


def run(db: sqlite3.Connection, soql: str, include_deleted: bool = False) -> dict:
    return compile_query(soql, include_deleted).execute(db, V)


def ids(result: dict) -> list[str]:
    return [r["attributes"]["url"].rsplit("/", 1)[1] for r in result["records"]]


def error(soql: str) -> SoqlError:
    with pytest.raises(SoqlError) as info:
        compile_query(soql)
    return info.value


def soql_quote(value: str) -> str:
    """What a careful client does before putting text into SOQL."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
    return f"'{escaped.replace(chr(9), chr(92) + 't')}'"


# -- records and shapes -----------------------------------------------------------------------------------------------
def test_record_shape_attributes_first_and_canonical_names(db):
    result = run(db, "select id, name from opportunity where externalid__c = 'OPP-1'")
    assert result == {"totalSize": 1, "done": True, "records": [{
        "attributes": {"type": "Opportunity", "url": f"/services/data/v{V}/sobjects/Opportunity/{OPP[0]}"},
        "Id": OPP[0], "Name": "Alpha"}]}


def test_relationship_fields_are_nested_and_null_parent_is_null(db):
    result = run(db, "SELECT Name, Account.ExternalId__c, Account.Name, Owner.Name FROM Opportunity "
                     "WHERE Name IN ('Alpha', 'delta') ORDER BY Name")
    assert result["records"] == [
        {"attributes": {"type": "Opportunity", "url": f"/services/data/v{V}/sobjects/Opportunity/{OPP[0]}"},
         "Name": "Alpha",
         "Account": {"attributes": {"type": "Account", "url": f"/services/data/v{V}/sobjects/Account/{ACC[0]}"},
                     "ExternalId__c": "ACC-1", "Name": "Acme"},
         "Owner": {"attributes": {"type": "User", "url": f"/services/data/v{V}/sobjects/User/{USER}"},
                   "Name": "Integration User"}},
        {"attributes": {"type": "Opportunity", "url": f"/services/data/v{V}/sobjects/Opportunity/{OPP[3]}"},
         "Name": "delta", "Account": None,
         "Owner": {"attributes": {"type": "User", "url": f"/services/data/v{V}/sobjects/User/{USER}"},
                   "Name": "Integration User"}},
    ]


def test_two_level_relationship(db):
    rec = run(db, f"SELECT Account.Owner.Name FROM Opportunity WHERE Id = '{OPP[0]}'")["records"][0]
    assert rec["Account"]["Owner"] == {"attributes": {"type": "User", "url": f"/services/data/v{V}/sobjects/User/{USER}"},
                                       "Name": "Integration User"}
    assert list(rec["Account"]) == ["attributes", "Owner"]


def test_large_results_are_read_in_chunks(db):
    rows = [(make_id("006", 100 + i), "Bulk", "Prospecting", "2026-01-01", 0) for i in range(25_000)]
    db.executemany('INSERT INTO "Opportunity"(Id, Name, StageName, CloseDate, IsDeleted) VALUES(?, ?, ?, ?, ?)', rows)
    result = run(db, "SELECT Id FROM Opportunity WHERE Name = 'Bulk'")
    assert result["totalSize"] == len(result["records"]) == 25_000


def test_typed_values_booleans_numbers_dates(db):
    rec = run(db, f"SELECT IsDeleted, Amount, CloseDate, CreatedDate FROM Opportunity WHERE Id = '{OPP[1]}'")
    assert rec["records"][0] == {"attributes": rec["records"][0]["attributes"], "IsDeleted": False, "Amount": 250.5,
                                 "CloseDate": "2026-02-10", "CreatedDate": "2026-01-02T10:00:00.000+0000"}


def test_where_on_parent_field(db):
    assert ids(run(db, "SELECT Id FROM Opportunity WHERE Account.ExternalId__c = 'ACC-1'")) == [OPP[0], OPP[1], OPP[7]]


# -- counting -----------------------------------------------------------------------------------------------------------
def test_count_star_is_total_size_with_empty_records(db):
    assert run(db, "SELECT COUNT() FROM Opportunity WHERE ExternalId__c != null") == {
        "totalSize": 5, "done": True, "records": []}
    assert run(db, "SELECT COUNT() FROM Opportunity") == {"totalSize": 7, "done": True, "records": []}
    assert run(db, "SELECT COUNT() FROM Opportunity LIMIT 3")["totalSize"] == 3
    assert run(db, "SELECT COUNT() FROM Opportunity", include_deleted=True)["totalSize"] == 8


def test_count_field_is_aggregate_result_expr0(db):
    assert run(db, "SELECT COUNT(Id) FROM Opportunity WHERE ExternalId__c != null") == {
        "totalSize": 1, "done": True, "records": [{"attributes": {"type": "AggregateResult"}, "expr0": 5}]}


def test_aggregates_aliases_and_numbering(db):
    rec = run(db, "SELECT MAX(Amount) top, COUNT(Id), SUM(Amount), MIN(CloseDate) FROM Opportunity")["records"][0]
    assert rec == {"attributes": {"type": "AggregateResult"}, "top": 250.5, "expr0": 7, "expr1": 456.5,
                   "expr2": "2026-01-10"}


def test_group_by(db):
    recs = run(db, "SELECT StageName, COUNT(Id) n FROM Opportunity GROUP BY StageName ORDER BY StageName")["records"]
    assert [(r["StageName"], r["n"]) for r in recs] == [("Closed Won", 1), ("Prospecting", 5), ("Qualification", 1)]


def test_is_deleted_rows_only_in_query_all(db):
    assert OPP[5] not in ids(run(db, "SELECT Id FROM Opportunity"))
    assert OPP[5] in ids(run(db, "SELECT Id FROM Opportunity", include_deleted=True))


def test_count_uses_a_covering_index_for_not_null(db):
    """The sync's progress query must stay an index scan on millions of rows."""
    plan = compile_query("SELECT COUNT() FROM Opportunity WHERE ExternalId__c != null")
    where, params = plan._where(db)
    steps = db.execute(f"EXPLAIN QUERY PLAN SELECT COUNT(*) {plan._from(plan.where_joins)}{where}", params).fetchall()
    assert any("COVERING INDEX ux_Opportunity_ExternalId__c" in s[-1] for s in steps), steps


# -- WHERE semantics ----------------------------------------------------------------------------------------------------
def test_not_equals_and_not_in_include_nulls_like_soql(db):
    assert ids(run(db, "SELECT Id FROM Opportunity WHERE Amount != 100")) == [o for o in OPP if o not in (OPP[0],
                                                                                                          OPP[5])]
    assert OPP[3] in ids(run(db, "SELECT Id FROM Opportunity WHERE ExternalId__c NOT IN ('OPP-1')"))
    assert OPP[3] in ids(run(db, "SELECT Id FROM Opportunity WHERE NOT ExternalId__c = 'OPP-1'"))


def test_null_comparisons_and_is_null_extension(db):
    nulls = [OPP[3], OPP[7]]
    assert ids(run(db, "SELECT Id FROM Opportunity WHERE ExternalId__c = null")) == nulls
    assert ids(run(db, "SELECT Id FROM Opportunity WHERE ExternalId__c IS NULL")) == nulls
    assert ids(run(db, "SELECT Id FROM Opportunity WHERE ExternalId__c IS NOT NULL")) == ids(
        run(db, "SELECT Id FROM Opportunity WHERE ExternalId__c != null"))
    assert ids(run(db, "SELECT Id FROM Opportunity WHERE ExternalId__c IN ('OPP-1', null)")) == [OPP[0], *nulls]


def test_empty_string_literal_means_blank(db):
    assert ids(run(db, "SELECT Id FROM Opportunity WHERE ExternalId__c = ''")) == [OPP[3], OPP[7]]
    assert run(db, "SELECT COUNT() FROM Opportunity WHERE ExternalId__c != ''")["totalSize"] == 5


def test_text_comparison_is_case_insensitive_ids_are_exact(db):
    assert ids(run(db, "SELECT Id FROM Opportunity WHERE ExternalId__c IN ('opp-1', 'OPP-2')")) == [OPP[0], OPP[1]]
    assert ids(run(db, "SELECT Id FROM Opportunity WHERE Name LIKE 'B%'")) == [OPP[1]]
    assert ids(run(db, f"SELECT Id FROM Opportunity WHERE Id = '{OPP[2][:15]}'")) == [OPP[2]]


def test_ranges_dates_datetimes_and_booleans(db):
    assert ids(run(db, "SELECT Id FROM Opportunity WHERE CloseDate >= 2026-07-10")) == [OPP[6], OPP[7]]
    assert ids(run(db, "SELECT Id FROM Opportunity WHERE CreatedDate > 2026-01-02T10:59:59+01:00")) == [OPP[1]]
    assert ids(run(db, "SELECT Id FROM Opportunity WHERE CreatedDate = 2026-01-02T10:00:00.000Z")) == [OPP[1]]
    assert ids(run(db, "SELECT Id FROM Opportunity WHERE IsDeleted = TRUE", include_deleted=True)) == [OPP[5]]
    assert ids(run(db, "SELECT Id FROM Opportunity WHERE Amount > 20 AND Amount <= 250.5")) == [OPP[0], OPP[1],
                                                                                              OPP[3]]


def test_parentheses_and_or(db):
    q = "SELECT Id FROM Opportunity WHERE (StageName = 'Closed Won' OR Amount < 2) AND (Name != null OR Id != null)"
    assert ids(run(db, q)) == [OPP[1], OPP[6]]


def test_string_escapes_find_tricky_keys(db):
    assert ids(run(db, f"SELECT Id FROM Opportunity WHERE ExternalId__c = {soql_quote(TRICKY_KEY)}")) == [OPP[4]]
    assert ids(run(db, "SELECT Id FROM Opportunity WHERE ExternalId__c = 'x\\'); DROP TABLE Opportunity; --'")) == [
        OPP[6]]
    assert run(db, "SELECT COUNT() FROM Opportunity")["totalSize"] == 7  # the table is still there


def test_like_escapes_wildcards(db):
    assert ids(run(db, "SELECT Id FROM Account WHERE ExternalId__c LIKE '%50\\%\\_off%'")) == [ACC[2]]
    assert ids(run(db, "SELECT Id FROM Account WHERE ExternalId__c LIKE '%50\\%\\_OFX%'")) == []


def test_unicode_escape():
    assert tokenize("'caf\\u00e9'")[0].value == "café"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1,
                   max_size=30))
def test_any_key_round_trips_through_soql_escaping(db, key):
    key = "k:" + key  # never equal to another account's key (unique index)
    db.execute('UPDATE "Account" SET ExternalId__c = ? WHERE Id = ?', (key, ACC[1]))
    found = ids(run(db, f"SELECT Id FROM Account WHERE ExternalId__c = {soql_quote(key)}"))
    assert ACC[1] in found


# -- ORDER BY / LIMIT / OFFSET ----------------------------------------------------------------------------------------
def test_order_by_nulls_first_by_default_and_case_insensitive(db):
    names = [r["Name"] for r in run(db, "SELECT Name FROM Opportunity ORDER BY Name")["records"]]
    assert names == [None, "Alpha", "bravo", "Charlie", "delta", "Echo", "Golf"]
    names = [r["Name"] for r in run(db, "SELECT Name FROM Opportunity ORDER BY Name DESC")["records"]]
    assert names == [None, "Golf", "Echo", "delta", "Charlie", "bravo", "Alpha"]
    names = [r["Name"] for r in run(db, "SELECT Name FROM Opportunity ORDER BY Name DESC NULLS LAST")["records"]]
    assert names[-1] is None and names[0] == "Golf"


def test_limit_offset(db):
    got = [r["Name"] for r in run(db, "SELECT Name FROM Opportunity ORDER BY Name ASC NULLS LAST LIMIT 2 OFFSET 1")[
        "records"]]
    assert got == ["bravo", "Charlie"]


# -- errors --------------------------------------------------------------------------------------------------------------
def test_unknown_first_token_is_bare_malformed_query():
    e = error("SELEKT Name FROM Account")
    assert (e.error_code, e.message) == ("MALFORMED_QUERY", "unexpected token: SELEKT")


def test_no_such_column_message_matches_salesforce():
    e = error("SELECT Bacon__c FROM Account LIMIT 2")
    assert e.error_code == "INVALID_FIELD"
    assert e.message == ("\nSELECT Bacon__c FROM Account LIMIT 2\n       ^\nERROR at Row:1:Column:8\nNo such column "
                         "'Bacon__c' on entity 'Account'. If you are attempting to use a custom field, be sure to "
                         "append the '__c' after the custom field name. Please reference your WSDL or the describe "
                         "call for the appropriate names.")


def test_unknown_object_is_invalid_type():
    e = error("SELECT Id FROM PlayingCard__c")
    assert e.error_code == "INVALID_TYPE"
    assert e.message.startswith("\nSELECT Id FROM PlayingCard__c\n               ^\nERROR at Row:1:Column:16\n"
                                "sObject type 'PlayingCard__c' is not supported.")


def test_unknown_relationship_and_field_behind_it():
    e = error("SELECT Acount.Name FROM Opportunity")
    assert e.error_code == "INVALID_FIELD" and "Didn't understand relationship 'Acount' in field path" in e.message
    e = error("SELECT Account.Nope FROM Opportunity")
    assert "ERROR at Row:1:Column:16\nNo such column 'Nope' on entity 'Account'" in e.message


def test_position_on_later_rows():
    e = error("SELECT Id\nFROM Opportunity\nWHERE Nme = 'x'")
    assert e.message.startswith("\nWHERE Nme = 'x'\n      ^\nERROR at Row:3:Column:7\nNo such column 'Nme'")


@pytest.mark.parametrize(("soql", "code", "tail"), [
    ("SELECT Id FROM Opportunity WHERE", "MALFORMED_QUERY", "unexpected token: <EOF>"),
    ("SELECT Id FROM Opportunity WHERE Name = 'a' AND Name = 'b' OR Name = 'c'", "MALFORMED_QUERY",
     "unexpected token: OR"),
    ("SELECT Id FROM Opportunity WHERE Amount = '5'", "INVALID_FIELD",
     "value of filter criterion for field 'Amount' must be of type double and should not be enclosed in quotes"),
    ("SELECT Id FROM Opportunity WHERE CreatedDate > 2026-01-01", "INVALID_FIELD",
     "value of filter criterion for field 'CreatedDate' must be of type dateTime and should not be enclosed in quotes"),
    ("SELECT Id FROM Opportunity WHERE Name = 5", "INVALID_FIELD",
     "value of filter criterion for field 'Name' must be of type string and should be enclosed in quotes"),
    ("SELECT Id FROM Opportunity WHERE AccountId = 'nope'", "INVALID_QUERY_FILTER_OPERATOR",
     "invalid ID field: nope"),
    ("SELECT Id FROM Opportunity WHERE Description = 'x'", "INVALID_FIELD",
     "field 'Description' can not be filtered in a query call"),
    ("SELECT Id FROM Opportunity WHERE Name = 'a\\qb'", "MALFORMED_QUERY",
     "Invalid string literal 'a\\qb'. Illegal character sequence '\\q' in string literal."),
    ("SELECT COUNT(), Name FROM Opportunity", "MALFORMED_QUERY", "COUNT() must be the only element in the SELECT list"),
    ("SELECT Name, COUNT(Id) FROM Opportunity", "MALFORMED_QUERY", "Field must be grouped or aggregated: Name"),
    ("SELECT Id, id FROM Opportunity", "MALFORMED_QUERY", "duplicate field selected: Id"),
    ("SELECT FIELDS(ALL) FROM Opportunity", "MALFORMED_QUERY", "The SOQL FIELDS function must have a LIMIT of at most "
                                                              "200"),
    ("SELECT Id, (SELECT Id FROM Opportunities) FROM Account", "MALFORMED_QUERY", "unexpected token: ("),
    ("SELECT Id FROM Opportunity OFFSET 2001", "NUMBER_OUTSIDE_VALID_RANGE", "Maximum SOQL offset allowed is 2000"),
    ("", "MALFORMED_QUERY", "A query string has to be specified"),
])
def test_errors(soql, code, tail):
    e = error(soql)
    assert e.error_code == code
    assert e.message.endswith(tail)


# -- query metadata (sf CLI) ----------------------------------------------------------------------------------------------
def test_column_metadata_shape():
    meta = compile_query("SELECT Id, Name, Owner.Name, Account.ExternalId__c FROM Opportunity").column_metadata()
    assert {k: meta[k] for k in ("entityName", "groupBy", "idSelected", "keyPrefix")} == {
        "entityName": "Opportunity", "groupBy": False, "idSelected": True, "keyPrefix": "006"}
    cols = meta["columnMetadata"]
    assert [c["columnName"] for c in cols] == ["Id", "Name", "Owner", "Account"]
    assert cols[0] == {"aggregate": False, "apexType": "Id", "booleanType": False, "columnName": "Id",
                       "custom": False, "displayName": "Id", "foreignKeyName": None, "insertable": False,
                       "joinColumns": [], "numberType": False, "textType": False, "updatable": False}
    assert cols[2]["foreignKeyName"] == "OwnerId" and cols[2]["apexType"] is None
    assert [(j["columnName"], j["textType"]) for j in cols[2]["joinColumns"]] == [("Name", True)]
    assert cols[3]["joinColumns"][0]["custom"] is True
    agg = compile_query("SELECT StageName, AVG(Amount) FROM Opportunity GROUP BY StageName").column_metadata()
    assert agg["groupBy"] is True
    assert {k: agg["columnMetadata"][1][k] for k in ("aggregate", "columnName", "displayName", "numberType")} == {
        "aggregate": True, "columnName": "expr0", "displayName": "avg(Amount)", "numberType": True}
