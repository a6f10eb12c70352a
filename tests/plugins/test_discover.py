"""Balanced boundaries (pure math and the real SQL on SQLite, property-tested) and setup validation."""

from __future__ import annotations

import sqlite3
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sf_datacloud_sync.config import parse_config
from sf_datacloud_sync.discover import (
    MAX_DATA_PARTITIONS,
    Candidate,
    DiscoveryError,
    KeyDistribution,
    boundary_query,
    candidates_from_counts,
    check_source_columns,
    check_target_fields,
    choose_cuts,
    discover,
    distribution_from_rows,
    partition_target,
    plan_lanes,
    plan_partitions,
)
from sf_datacloud_sync.utils.partitions import Partition, range_query

DMO = "Opportunity_Sync__dlm"
KEY = "ExternalId__c"
ACCOUNT = "AccountExternalId__c"

# Keys as adversarial as Data Cloud allows: empty strings, quotes, SQL-looking text, unicode, near-duplicates.
# (No surrogates: not encodable; no NUL: not a Salesforce character.)
key_text = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8),
    st.sampled_from(["", "'", "''", '"', "a'b", "x\"; DROP TABLE t; --", "ÄÖÜ", "日本", "🙂", "OPP-1", "OPP-10",
                     "opp-1", " ", "\n", "NULL", "null"]),
)


def sizes_of(parts: list[Partition], counts: list[tuple[str, int]], nulls: int) -> list[int]:
    """Rows each partition really holds, by evaluating ``Partition.contains`` on every value."""
    sizes = [0] * len(parts)
    for value, rows in counts:
        owners = [i for i, p in enumerate(parts) if p.contains(value)]
        assert len(owners) == 1, f"value {value!r} is in partitions {owners}"
        sizes[owners[0]] += rows
    null_owners = [i for i, p in enumerate(parts) if p.contains(None)]
    assert len(null_owners) == (1 if nulls else 0)
    if nulls:
        sizes[null_owners[0]] += nulls
    return sizes


def plan_from_counts(counts: list[tuple[str, int]], n: int, nulls: int = 0, key: str = "account") -> list[Partition]:
    total = sum(r for _, r in counts)
    dist = KeyDistribution(total_rows=total + nulls, null_rows=nulls, unkeyed_rows=0, distinct_values=len(counts),
                           partitions=n, candidates=candidates_from_counts(counts, n))
    return plan_partitions(dist, key)


def check_shape(parts: list[Partition], counts: list[tuple[str, int]], nulls: int, n: int) -> list[int]:
    """Complete, disjoint, ordered, exact ``expected_rows``; returns the data partitions' sizes."""
    data = [p for p in parts if not p.null_bucket]
    assert [p.index for p in parts] == list(range(len(parts)))
    assert all(p.count == len(parts) for p in parts)
    assert len(data) <= max(1, n)
    if data:
        assert data[0].lower is None and data[-1].upper is None
        for a, b in zip(data, data[1:], strict=False):
            assert a.upper is not None and a.upper == b.lower
    sizes = sizes_of(parts, counts, nulls)
    assert sizes == [p.expected_rows for p in parts]
    assert sum(sizes) == sum(r for _, r in counts) + nulls
    if counts:
        assert all(s > 0 for s, p in zip(sizes, parts, strict=True) if not p.null_bucket), "an empty data partition"
    return [s for s, p in zip(sizes, parts, strict=True) if not p.null_bucket]


# -- pure functions -------------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(keys=st.lists(key_text, unique=True, max_size=60), n=st.integers(1, 40), nulls=st.integers(0, 3))
def test_unique_keys_cover_everything_once_and_balance_within_one_row(keys: list[str], n: int, nulls: int) -> None:
    counts = [(k, 1) for k in sorted(keys)]
    parts = plan_from_counts(counts, n, nulls, key="external_id")
    sizes = check_shape(parts, counts, nulls, n)
    if counts:
        assert len(sizes) == min(n, len(counts)), "fewer distinct keys than partitions: one key each"
        ideal = len(counts) / min(n, len(counts)) if len(counts) < n else len(counts) / n
        assert all(abs(s - ideal) <= 1 for s in sizes), (sizes, ideal)
    else:
        assert sizes == []


@settings(max_examples=400, deadline=None)
@given(
    accounts=st.lists(st.tuples(key_text, st.integers(1, 30)), unique_by=lambda t: t[0], max_size=40),
    whale=st.one_of(st.none(), st.integers(100, 5_000)),
    n=st.integers(1, 30),
    nulls=st.integers(0, 50),
)
def test_weighted_keys_never_split_a_value_and_stay_balanced(accounts: list[tuple[str, int]], whale: int | None,
                                                             n: int, nulls: int) -> None:
    counts = sorted(accounts)
    if whale and counts:  # one huge account somewhere in the middle
        i = len(counts) // 2
        counts[i] = (counts[i][0], whale)
    parts = plan_from_counts(counts, n, nulls)
    sizes = check_shape(parts, counts, nulls, n)  # contains() per value: a value is never split
    if counts:
        total = sum(r for _, r in counts)
        biggest = max(r for _, r in counts)
        assert max(sizes) <= -(-total // n) + 2 * biggest
        # Without a dominant value, the split is close to even.
        if biggest * n <= total // 4:
            assert max(sizes) - min(sizes) <= 4 * biggest


def test_one_huge_account_makes_its_partition_larger_instead_of_splitting() -> None:
    counts = [("A", 10), ("B", 10), ("C", 1_000), ("D", 10), ("E", 10)]
    parts = plan_from_counts(counts, 4)
    sizes = check_shape(parts, counts, 0, 4)
    assert 1_000 in sizes or any(s >= 1_000 for s in sizes)
    assert sum(1 for p in parts if p.contains("C")) == 1


@pytest.mark.parametrize("n", [1, 2, 7])
def test_all_null_gives_only_the_null_bucket(n: int) -> None:
    parts = plan_from_counts([], n, nulls=5)
    assert [(p.null_bucket, p.expected_rows) for p in parts] == [(True, 5)]


def test_empty_source_gives_no_partitions() -> None:
    assert plan_from_counts([], 10, nulls=0) == []
    assert plan_partitions(distribution_from_rows([]), "account") == []


def test_one_partition_is_open_at_both_ends() -> None:
    parts = plan_from_counts([("a", 3), ("b", 2)], 1, nulls=1)
    assert [(p.lower, p.upper, p.null_bucket) for p in parts] == [(None, None, False), (None, None, True)]


def test_cut_goes_to_the_closer_side_of_a_value() -> None:
    # 10 rows, 2 partitions, target 5. "b" holds rows 4..7: before it is 2 off, after it 2 off -> ties keep the
    # earlier cut. "b" holds rows 3..6: before it is 3 off, after it (at "c") 1 off.
    assert choose_cuts(candidates_from_counts([("a", 3), ("b", 4), ("c", 3)], 2), 10, 2) == [("b", 3)]
    assert choose_cuts(candidates_from_counts([("a", 2), ("b", 4), ("c", 4)], 2), 10, 2) == [("c", 6)]


def test_candidates_are_few() -> None:
    counts = [(f"K{i:06d}", 1) for i in range(100_000)]
    assert len(candidates_from_counts(counts, 16)) <= 17
    dist = KeyDistribution(100_000, 0, 0, 100_000, 16, candidates_from_counts(counts, 16))
    assert [p.expected_rows for p in plan_partitions(dist, "external_id")] == [6250] * 16


def test_partition_target() -> None:
    assert partition_target(1_000, 10, None) == 10
    assert partition_target(1_000, 10, 300) == 4
    assert partition_target(0, 10, 300) == 1
    assert partition_target(10_000_000, 10, 1) == MAX_DATA_PARTITIONS
    assert partition_target(5, 5_000, None) == MAX_DATA_PARTITIONS


def test_candidate_next_value_none_means_last() -> None:
    c = candidates_from_counts([("a", 1), ("b", 1)], 2)
    assert c[-1] == Candidate("b", 1, 1, None)


# -- the SQL, run for real on SQLite (what the emulator's Data Cloud runs on) -----------------------------------


def _sqlite(rows: list[tuple[str | None, str | None]]) -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    conn.execute(f'CREATE TABLE "{DMO}" ("{KEY}" TEXT, "{ACCOUNT}" TEXT, "Name__c" TEXT)')
    conn.executemany(f'INSERT INTO "{DMO}" VALUES (?, ?, ?)', [(k, a, "x") for k, a in rows])
    return conn


def _run_sql(conn: sqlite3.Connection, column: str, n: int, target: int | None = None) -> KeyDistribution:
    sql, params = boundary_query(dmo=DMO, partition_column=column, key_column=KEY, partitions=n,
                                 target_partition_rows=target)
    return distribution_from_rows(conn.execute(sql, params).fetchall())


rows_strategy = st.lists(
    st.tuples(st.one_of(st.none(), key_text), st.one_of(st.none(), st.sampled_from(["ACC-1", "ACC-2", "ACC-3", "",
                                                                                     "ACC-'4'", "Ü"]), key_text)),
    max_size=120,
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows_strategy, n=st.integers(1, 20), by_account=st.booleans())
def test_sql_plan_covers_every_row_exactly_once(rows: list[tuple[str | None, str | None]], n: int,
                                                by_account: bool) -> None:
    conn = _sqlite(rows)
    column = ACCOUNT if by_account else KEY
    dist = _run_sql(conn, column, n)
    parts = plan_partitions(dist, "account" if by_account else "external_id")
    # Totals the verify step relies on.
    assert dist.total_rows == len(rows)
    assert dist.null_rows == sum(1 for r in rows if r[1 if by_account else 0] is None)
    assert dist.unkeyed_rows == sum(1 for k, _ in rows if k is None or k == "")
    # The server-side filter returns what the Python twin computes.
    values = Counter(r[1 if by_account else 0] for r in rows if r[1 if by_account else 0] is not None)
    counts = sorted(values.items())
    assert dist.candidates == candidates_from_counts(counts, n)
    # Each partition's own range query (as load_partition runs it) returns disjoint rows covering all of them.
    seen: Counter[int] = Counter()
    for p in parts:
        sql, params = range_query(p, dmo=DMO, columns=["rowid", KEY, ACCOUNT], key_column=KEY,
                                  account_column=ACCOUNT)
        got = conn.execute(sql, params).fetchall()
        assert len(got) == p.expected_rows, p
        seen.update(r[0] for r in got)
        if by_account:  # an Account never spans two partitions
            assert all(p.contains(r[2]) for r in got)
    assert sorted(seen) == list(range(1, len(rows) + 1))
    assert max(seen.values(), default=1) == 1


@settings(max_examples=60, deadline=None)
@given(n_rows=st.integers(0, 300), target=st.integers(1, 100))
def test_sql_computes_the_partition_count_from_target_rows(n_rows: int, target: int) -> None:
    conn = _sqlite([(f"K{i:04d}", None) for i in range(n_rows)])
    dist = _run_sql(conn, KEY, 10, target)
    if n_rows:
        assert dist.partitions == partition_target(n_rows, 10, target)
        data = [p for p in plan_partitions(dist, "external_id") if not p.null_bucket]
        assert len(data) == partition_target(n_rows, 10, target)


def test_sql_carries_no_literal_values() -> None:
    sql, params = boundary_query(dmo=DMO, partition_column=ACCOUNT, key_column=KEY, partitions=10,
                                 target_partition_rows=5_000)
    assert "'" not in sql
    assert params == {"blank": ""}
    assert f'"{DMO}"' in sql and f'"{ACCOUNT}"' in sql
    with pytest.raises(ValueError):
        boundary_query(dmo=DMO, partition_column=KEY, key_column=KEY, partitions=0)
    with pytest.raises(ValueError):
        boundary_query(dmo=DMO, partition_column=KEY, key_column=KEY, partitions=3, target_partition_rows=0)


def test_sql_balances_a_skewed_real_shaped_key_set() -> None:
    """Keys in several formats whose byte order is far from uniform: equal-width splits would be useless."""
    keys = [f"OPP-{i:010d}" for i in range(3_000)] + [f"{i:08x}-uuid" for i in range(0, 3_000_000, 1_500)] + \
        [f"ZZ-MIGRATED-{i:09d}" for i in range(500)]
    conn = _sqlite([(k, None) for k in keys])
    parts = plan_partitions(_run_sql(conn, KEY, 8), "external_id")
    sizes = [p.expected_rows for p in parts]
    assert len(sizes) == 8 and max(sizes) - min(sizes) <= 1


# -- validation -------------------------------------------------------------------------------------------------


def _config(**mapping_overrides: str) -> Any:
    mapping = {"ExternalId__c": "ExternalId__c", "AccountExternalId__c": "Account.ExternalId__c",
               "Name__c": "Name", "StageName__c": "StageName", "CloseDate__c": "CloseDate"}
    mapping.update(mapping_overrides)
    return parse_config({"source": {"dmo": DMO, "key_column": KEY, "account_column": ACCOUNT},
                         "target": {"object": "Opportunity", "external_id_field": "ExternalId__c"},
                         "mapping": mapping})


def _describe(*fields: dict[str, Any]) -> dict[str, Any]:
    base = {"createable": True, "updateable": True, "nillable": True, "externalId": False, "idLookup": False,
            "defaultedOnCreate": False, "relationshipName": None, "referenceTo": []}
    return {"name": "X", "fields": [{**base, **f} for f in fields]}


OPPORTUNITY = _describe(
    {"name": "Id", "createable": False, "updateable": False, "nillable": False, "defaultedOnCreate": True},
    {"name": "ExternalId__c", "externalId": True, "idLookup": True},
    {"name": "AccountId", "relationshipName": "Account", "referenceTo": ["Account"]},
    {"name": "Name", "nillable": False},
    {"name": "StageName", "nillable": False},
    {"name": "CloseDate", "nillable": False},
    {"name": "IsClosed", "createable": False, "updateable": False, "nillable": False, "defaultedOnCreate": True},
    {"name": "Amount"},
)
ACCOUNT_DESCRIBE = _describe({"name": "ExternalId__c", "externalId": True, "idLookup": True}, {"name": "Name"})


def test_valid_setup_has_no_problems() -> None:
    assert check_target_fields(OPPORTUNITY, {"Account": ACCOUNT_DESCRIBE}, _config()) == ([], [])
    assert check_source_columns([KEY, ACCOUNT, "Name__c", "StageName__c", "CloseDate__c", "Extra"], _config()) == []


def test_problems_name_the_setting_and_the_field() -> None:
    cfg = _config(Foo__c="Foo__c", IsClosed__c="IsClosed", Amount__c="amount")
    problems, _ = check_target_fields(OPPORTUNITY, {"Account": ACCOUNT_DESCRIBE}, cfg)
    assert "mapping.Foo__c: field Foo__c does not exist on Opportunity" in problems
    assert any(p.startswith("mapping.IsClosed__c: field IsClosed on Opportunity is not createable/updateable")
               for p in problems)
    assert len(problems) == 2  # API names are case-insensitive: "amount" is Amount


def test_relationship_and_external_id_problems() -> None:
    cfg = _config(AccountExternalId__c="Account.Missing__c")
    problems, _ = check_target_fields(OPPORTUNITY, {"Account": ACCOUNT_DESCRIBE}, cfg)
    assert problems == ["mapping.AccountExternalId__c: field Missing__c does not exist on Account "
                        "(for Account.Missing__c)"]
    cfg = _config(AccountExternalId__c="Account.Name")
    problems, _ = check_target_fields(OPPORTUNITY, {"Account": ACCOUNT_DESCRIBE}, cfg)
    assert "neither an External ID nor an idLookup field" in problems[0]
    cfg = _config(AccountExternalId__c="Parent.ExternalId__c")
    problems, _ = check_target_fields(OPPORTUNITY, {"Account": ACCOUNT_DESCRIBE}, cfg)
    assert problems == ["mapping.AccountExternalId__c: Opportunity has no relationship named Parent "
                        "(for Parent.ExternalId__c)"]
    no_ext = _describe(*[{**f, "externalId": False} for f in OPPORTUNITY["fields"]])
    problems, _ = check_target_fields(no_ext, {"Account": ACCOUNT_DESCRIBE}, _config())
    assert problems == ["target.external_id_field: field ExternalId__c on Opportunity is not marked External ID "
                        "(Bulk API upserts need an External ID field)"]


def test_unmapped_required_field_is_a_warning() -> None:
    cfg = parse_config({"source": {"dmo": DMO, "key_column": KEY, "account_column": ACCOUNT},
                        "target": {"object": "Opportunity", "external_id_field": "ExternalId__c"},
                        "mapping": {KEY: "ExternalId__c", ACCOUNT: "Account.ExternalId__c", "Name__c": "Name"}})
    problems, warnings = check_target_fields(OPPORTUNITY, {"Account": ACCOUNT_DESCRIBE}, cfg)
    assert problems == []
    assert {w.split(" is required")[0] for w in warnings} == {"target: Opportunity.StageName",
                                                              "target: Opportunity.CloseDate"}


def test_unknown_column_names_the_column_and_hints_at_case() -> None:
    problems = check_source_columns([KEY, ACCOUNT, "name__c", "StageName__c"], _config())
    assert problems == [
        f"mapping.Name__c: column Name__c does not exist in Data Cloud object {DMO} (did you mean name__c? quoted "
        f"names are case-sensitive)",
        f"mapping.CloseDate__c: column CloseDate__c does not exist in Data Cloud object {DMO}",
    ]


class _Result(list):
    def __init__(self, rows: list[tuple[Any, ...]], columns: list[str]) -> None:
        super().__init__(rows)
        self.columns = columns

    def __enter__(self) -> _Result:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class FakeDataCloud:
    """Answers from a SQLite database, like the emulator does."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.queries: list[str] = []

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> _Result:
        self.queries.append(sql)
        cur = self.conn.execute(sql, parameters or {})
        return _Result(cur.fetchall(), [d[0] for d in cur.description])


class FakeSalesforce:
    def __init__(self, count: int = 7) -> None:
        self.count = count
        self.soql: list[str] = []

    def describe(self, name: str) -> dict[str, Any]:
        if name == "Opportunity":
            return OPPORTUNITY
        if name == "Account":
            return ACCOUNT_DESCRIBE
        raise LookupError(f"NOT_FOUND: {name}")

    def query_count(self, soql: str) -> int:
        self.soql.append(soql)
        return self.count


def test_discover_validates_then_plans_in_one_query() -> None:
    rows = [(f"K{i:03d}", f"ACC-{i % 7}") for i in range(200)] + [(None, "ACC-1"), ("", None)]
    dc = FakeDataCloud(_sqlite(rows))
    sf = FakeSalesforce()
    with pytest.raises(DiscoveryError) as err:  # the fake DMO lacks StageName__c and CloseDate__c
        discover(_config(), dc, sf, partition_key="account", partitions=3)
    assert "mapping.StageName__c: column StageName__c does not exist" in str(err.value)
    assert len(dc.queries) == 1 and sf.soql == []  # nothing but the probe ran
    cfg = parse_config({"source": {"dmo": DMO, "key_column": KEY, "account_column": ACCOUNT},
                        "target": {"object": "Opportunity", "external_id_field": "ExternalId__c"},
                        "mapping": {KEY: "ExternalId__c", ACCOUNT: "Account.ExternalId__c", "Name__c": "Name"}})
    result = discover(cfg, dc, sf, partition_key="account", partitions=3)
    assert len(dc.queries) == 4  # the probe of the failed attempt, this probe, the large-Account query, the boundaries
    plan = result.plan()
    assert plan["total_rows"] == 202 and plan["null_rows"] == 1 and plan["unkeyed_rows"] == 2
    assert plan["keyed_rows"] == 200 and plan["salesforce_count_before"] == 7
    assert sum(plan["expected_rows"].values()) == 202
    assert result.partitions[-1].null_bucket
    assert sf.soql == ["SELECT COUNT() FROM Opportunity WHERE ExternalId__c != null"]


def test_discover_rejects_an_unknown_partition_key() -> None:
    with pytest.raises(DiscoveryError, match="params.partition_key"):
        discover(_config(), FakeDataCloud(_sqlite([])), FakeSalesforce(), partition_key="owner", partitions=3)


def test_unreadable_dmo_is_named() -> None:
    cfg = parse_config({"source": {"dmo": "Nope__dlm", "key_column": KEY, "account_column": ACCOUNT},
                        "target": {"object": "Opportunity", "external_id_field": "ExternalId__c"},
                        "mapping": {KEY: "ExternalId__c", ACCOUNT: "Account.ExternalId__c"}})
    with pytest.raises(DiscoveryError) as err:
        discover(cfg, FakeDataCloud(_sqlite([])), FakeSalesforce(), partition_key="account", partitions=3)
    assert err.value.problems[0].startswith("source.dmo: Data Cloud object Nope__dlm cannot be read: ")


def test_connection_errors_are_not_setup_problems() -> None:
    class Down(FakeSalesforce):
        def describe(self, name: str) -> dict[str, Any]:
            raise ConnectionError("connection refused")

    conn = _sqlite([])
    conn.execute(f'ALTER TABLE "{DMO}" ADD COLUMN "StageName__c" TEXT')
    conn.execute(f'ALTER TABLE "{DMO}" ADD COLUMN "CloseDate__c" TEXT')
    with pytest.raises(ConnectionError):
        discover(_config(), FakeDataCloud(conn), Down(), partition_key="account", partitions=3)


@given(st.data())
@settings(max_examples=30, deadline=None)
def test_partition_dicts_round_trip(data: st.DataObject) -> None:
    counts = sorted(data.draw(st.lists(st.tuples(key_text, st.integers(1, 5)), unique_by=lambda t: t[0],
                                       min_size=1, max_size=20)))
    n = data.draw(st.integers(1, 6))
    for p in plan_from_counts(counts, n, nulls=1):
        assume(True)
        assert Partition.from_dict(p.to_dict()) == p


# -- lanes for large Accounts (partition_key=account) ---------------------------------------------------------------


def test_plan_lanes_packs_largest_first_within_the_capacity() -> None:
    lanes = plan_lanes([("a", 5), ("b", 9), ("c", 3), ("d", 4), ("e", 12)], capacity=9)
    assert lanes == [[("e", 12)], [("b", 9)], [("a", 5), ("d", 4)], [("c", 3)]]
    assert plan_lanes([], capacity=5) == []
    # Ties on size are broken by value, so the plan is the same on every run.
    assert plan_lanes([("y", 2), ("x", 2)], capacity=2) == [[("x", 2)], [("y", 2)]]


def _lane_config(serial_job_records: int) -> Any:
    return parse_config({"source": {"dmo": DMO, "key_column": KEY, "account_column": ACCOUNT},
                         "target": {"object": "Opportunity", "external_id_field": "ExternalId__c"},
                         "mapping": {KEY: "ExternalId__c", ACCOUNT: "Account.ExternalId__c", "Name__c": "Name"},
                         "load": {"serial_job_records": serial_job_records}})


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(1, 25), min_size=0, max_size=12), small=st.integers(0, 40),
       nulls=st.integers(0, 3), n=st.integers(1, 8), threshold=st.integers(1, 10))
def test_lanes_and_ranges_cover_every_row_once(sizes: list[int], small: int, nulls: int, n: int,
                                               threshold: int) -> None:
    """Accounts over ``serial_job_records`` rows get lanes (values with quotes included), the ranges exclude them,
    and the partitions' own queries return every row exactly once."""
    rows: list[tuple[str | None, str | None]] = []
    for a, size in enumerate(sizes):
        rows += [(f"K-{a}-{i}", f"ACC-'{a}'") for i in range(size)]
    rows += [(f"S{i:03d}", f"SMALL-{i % 5}") for i in range(small)]
    rows += [(f"N{i}", None) for i in range(nulls)] + [("", "ACC-'0'")]
    conn = _sqlite(rows)
    conn.execute(f'ALTER TABLE "{DMO}" ADD COLUMN "StageName__c" TEXT')
    conn.execute(f'ALTER TABLE "{DMO}" ADD COLUMN "CloseDate__c" TEXT')
    result = discover(_lane_config(threshold), FakeDataCloud(conn), FakeSalesforce(), partition_key="account",
                      partitions=n)
    parts = result.partitions
    per_account = Counter(a for _, a in rows if a is not None)
    heavy = {a for a, c in per_account.items() if c > threshold}
    lanes = [p for p in parts if p.accounts]
    assert {a for p in lanes for a in p.accounts} == heavy
    assert parts[:len(lanes)] == lanes  # lanes first, largest first
    assert [p.expected_rows for p in lanes] == sorted((p.expected_rows for p in lanes), reverse=True)
    assert all(p.serial for p in parts)
    plan = result.plan()
    assert plan["total_rows"] == len(rows) and plan["unkeyed_rows"] == 1 and plan["null_rows"] == nulls
    seen: Counter[int] = Counter()
    for p in parts:
        sql, params = range_query(p, dmo=DMO, columns=["rowid", KEY, ACCOUNT], key_column=KEY,
                                  account_column=ACCOUNT)
        assert "'" not in sql  # the quoted Account values travel as parameters
        got = conn.execute(sql, params).fetchall()
        assert len(got) == p.expected_rows, p
        assert all(p.contains(r[2]) for r in got)
        seen.update(r[0] for r in got)
        assert Partition.from_dict(p.to_dict()) == p
    assert sorted(seen) == list(range(1, len(rows) + 1))
    assert max(seen.values(), default=1) == 1


def _lane_rows() -> sqlite3.Connection:
    rows = [(f"W{i:03d}", "WHALE") for i in range(60)] + [(f"V{i:03d}", "BIG") for i in range(30)]
    rows += [(f"S{i:03d}", f"SMALL-{i:02d}") for i in range(90)]
    conn = _sqlite(rows)
    conn.execute(f'ALTER TABLE "{DMO}" ADD COLUMN "StageName__c" TEXT')
    conn.execute(f'ALTER TABLE "{DMO}" ADD COLUMN "CloseDate__c" TEXT')
    return conn


def test_lanes_count_towards_the_partitions_and_are_topped_up_to_whole_batches() -> None:
    """2 Accounts over the 10-row batch: 2 lanes, which count towards the 5 partitions asked for. 18 batches over 5
    partitions, the WHALE's 6 the most: BIG's lane takes 30 small rows to make 6 whole batches too, and 3 ranges
    share the other 60 rows. Every partition is whole batches: 18 in all, the object's minimum."""
    conn = _lane_rows()
    parts = discover(_lane_config(10), FakeDataCloud(conn), FakeSalesforce(), partition_key="account",
                     partitions=5).partitions
    assert [(p.label, p.expected_rows) for p in parts] == [
        ("P00 account WHALE", 60), ("P01 account BIG & [−∞, SMALL-30)", 60), ("P02 [SMALL-30, SMALL-50)", 20),
        ("P03 [SMALL-50, SMALL-70)", 20), ("P04 [SMALL-70, +∞)", 20)]
    assert parts[0].exclude == () and not parts[0].with_range
    assert all(p.exclude == ("WHALE", "BIG") for p in parts[1:])
    by_key = discover(_lane_config(10), FakeDataCloud(conn), FakeSalesforce(), partition_key="external_id",
                      partitions=5).partitions
    assert not any(p.accounts or p.exclude or p.serial or p.with_range for p in by_key)
    few = discover(_lane_config(10), FakeDataCloud(conn), FakeSalesforce(), partition_key="account",
                   partitions=2).partitions  # 90 rows per partition: both Accounts share one lane
    assert [(p.accounts, p.expected_rows) for p in few] == [(("WHALE", "BIG"), 90), ((), 90)]


def test_partitions_per_task_groups_serial_partitions_of_similar_size() -> None:
    """The 5 serial partitions of the plan above in tasks of 2: the two 60-row partitions together, then the 20-row
    ranges; each group covers exactly its members' rows and resumes only ledgers written for the same members."""
    conn = _lane_rows()
    plain = discover(_lane_config(10), FakeDataCloud(conn), FakeSalesforce(), partition_key="account",
                     partitions=5).partitions
    found = discover(_lane_config(10), FakeDataCloud(conn), FakeSalesforce(), partition_key="account",
                     partitions=5, partitions_per_task=2)
    groups = found.partitions
    assert (found.plan()["partition_count"], found.plan()["member_count"]) == (3, 5)
    assert [[m.label for m in g.members] for g in groups] == [[p.label for p in plain[:2]], [p.label for p in plain[2:4]],
                                                              [plain[4].label]]
    assert [(g.index, g.count, g.expected_rows) for g in groups] == [(0, 3, 120), (1, 3, 40), (2, 3, 20)]
    assert groups[0].label == "P00 2 lanes WHALE, BIG" and groups[1].label == "P01 2 lanes SMALL-30, SMALL-50"
    assert all(g.serial for g in groups) and Partition.from_dict(groups[0].to_dict()) == groups[0]
    for value in ("WHALE", "BIG", "SMALL-10", "SMALL-30", "SMALL-49", "SMALL-70", None):
        assert [g.contains(value) for g in groups] == [any(m.contains(value) for m in g.members) for g in groups]
    assert groups[0].bounds != groups[1].bounds != plain[0].bounds
    # external_id partitions run big parallel jobs already: never grouped.
    by_key = discover(_lane_config(10), FakeDataCloud(conn), FakeSalesforce(), partition_key="external_id",
                      partitions=5, partitions_per_task=2).partitions
    assert not any(p.members for p in by_key)
    with pytest.raises(DiscoveryError, match="partitions_per_task"):
        discover(_lane_config(10), FakeDataCloud(conn), FakeSalesforce(), partition_key="account", partitions=5,
                 partitions_per_task=0)


def test_fewer_batches_than_partitions_split_evenly() -> None:
    """8 batches of 25 rows for 10 partitions: whole batches would leave partitions idle, so the ranges share the
    rows evenly (the lanes as they are) and every partition asked for gets work."""
    parts = discover(_lane_config(25), FakeDataCloud(_lane_rows()), FakeSalesforce(), partition_key="account",
                     partitions=10).partitions
    assert [(p.accounts, p.expected_rows) for p in parts[:2]] == [(("WHALE",), 60), (("BIG",), 30)]
    assert [p.expected_rows for p in parts[2:]] == [11, 11, 12, 11, 11, 11, 12, 11]
    assert not any(p.with_range for p in parts)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heavy=st.lists(st.integers(21, 90), max_size=6), small=st.lists(st.integers(1, 2), min_size=20, max_size=300),
       nulls=st.integers(0, 3), n=st.integers(1, 12))
def test_serial_plan_uses_the_fewest_batches(heavy: list[int], small: list[int], nulls: int, n: int) -> None:
    """With a 20-row batch and small Accounts of 1-2 rows (enough to top the lanes up), every partition but the last
    ends within one row of whole batches, so the plan needs at most 2 batches more than the object itself (plus the
    NULL bucket's), and no partition needs more than one batch over the lanes' capacity."""
    batch = 20
    rows: list[tuple[str | None, str | None]] = []
    for a, size in enumerate(heavy):
        rows += [(f"H{a}-{i}", f"ACC-{a * 37 % 101:03d}'") for i in range(size)]
    for a, size in enumerate(small):
        rows += [(f"S{a}-{i}", f"ACC-{a:03d}") for i in range(size)]
    rows += [(f"N{i}", None) for i in range(nulls)]
    conn = _sqlite(rows)
    conn.execute(f'ALTER TABLE "{DMO}" ADD COLUMN "StageName__c" TEXT')
    conn.execute(f'ALTER TABLE "{DMO}" ADD COLUMN "CloseDate__c" TEXT')
    parts = discover(_lane_config(batch), FakeDataCloud(conn), FakeSalesforce(), partition_key="account",
                     partitions=n).partitions
    data = [p for p in parts if not p.null_bucket]
    keyed = len(rows) - nulls
    minimum = -(-keyed // batch)
    lanes = sum(1 for p in data if p.accounts)
    assume(minimum >= max(n, lanes + 1))  # otherwise the even split applies (test above)
    assume(sum(small) >= batch * len(heavy))  # enough small rows to top every lane up
    batches = [-(-p.expected_rows // batch) for p in data]
    assert sum(batches) <= minimum + 2, [(p.label, p.expected_rows) for p in data]
    capacity = max([-(-keyed // n), *heavy])  # what the lanes are packed to
    assert max(batches) <= -(-capacity // batch) + 1
    assert sum(p.expected_rows for p in parts) == len(rows)
