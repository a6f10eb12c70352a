"""``python -m emulator seed``: deterministic, realistic data and the manifest the other tests rely on."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from collections import Counter
from datetime import date
from pathlib import Path

import pytest

import emulator.seed as seed_module
from emulator.schema import ACCOUNT, DMO_COLUMNS, DMO_NAME, STAGES
from emulator.seed import BAD_KINDS, KEY_FORMATS, MANIFEST_NAME, REFERENCE_DAY, _account_counts, seed_org
from emulator.state import Credentials

ROOT = Path(__file__).resolve().parents[2]
N = 5_000
BAD = 40
NULL_KEYS = 5
STAGE_NAMES = {s[0] for s in STAGES}
STAGE_DEFAULT = {s[0]: s[1] for s in STAGES}
COL = {name: i for i, name in enumerate(DMO_COLUMNS)}
KEY_PATTERNS = {
    "opp_dense": r"OPP-\d{10}",
    "sf_legacy": r"SF-20(1[5-9]|2[01])-\d{5,}",
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}",
    "legacy_small": r"LEGACY_[1-9]\d*",
    "zz_long": r"ZZ-[A-Z-]+-MIGRATED-\d{9}-[A-Z0-9-]*[0-9A-F]{4}",
    "mixed_case": r"Opp-M\d{7}",
    "lower_case": r"opp-x\d{7}",
    "numeric": r"\d{10}",
}


def dmo_rows(data_dir: Path) -> list[tuple]:
    with sqlite3.connect(data_dir / "datacloud.sqlite") as conn:
        return conn.execute(f'SELECT * FROM "{DMO_NAME}" ORDER BY rowid').fetchall()


def account_rows(data_dir: Path) -> list[tuple]:
    with sqlite3.connect(data_dir / "org.sqlite") as conn:
        return conn.execute('SELECT * FROM "Account" ORDER BY rowid').fetchall()


def manifest(data_dir: Path) -> dict:
    return json.loads((data_dir / MANIFEST_NAME).read_text())


def utf16_len(s: str) -> int:
    """Salesforce measures text in UTF-16 code units: an emoji counts twice."""
    return len(s.encode("utf-16-le")) // 2


def salesforce_errors(row: tuple, account_keys: set[str]) -> list[str]:
    """The error codes Salesforce would answer for one DMO row upserted as an Opportunity (a small mirror of the
    org's validation, independent of the seed's own bookkeeping)."""
    errors = []
    name, stage, close = row[COL["Name__c"]], row[COL["StageName__c"]], row[COL["CloseDate__c"]]
    amount, prob = row[COL["Amount__c"]], row[COL["Probability__c"]]
    if name is None or close is None:
        errors.append("REQUIRED_FIELD_MISSING")
    if name is not None and utf16_len(name) > 120:
        errors.append("STRING_TOO_LONG")
    if stage not in STAGE_NAMES:
        errors.append("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST")
    if row[COL["AccountExternalId__c"]] not in account_keys:
        errors.append("INVALID_FIELD")
    if amount is not None and abs(amount) >= 1e16:
        errors.append("NUMBER_OUTSIDE_VALID_RANGE")
    if prob is not None and not 0 <= prob <= 100:
        errors.append("NUMBER_OUTSIDE_VALID_RANGE")
    return errors


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("seed")
    seed_org(data_dir, records=N, random_seed=7, bad_rows=BAD, null_keys=NULL_KEYS)
    return data_dir


@pytest.fixture(scope="module")
def rows(seeded: Path) -> list[tuple]:
    return dmo_rows(seeded)


def test_same_seed_gives_identical_rows(tmp_path: Path, seeded: Path, rows: list[tuple]):
    other = tmp_path / "again"
    seed_org(other, records=N, random_seed=7, bad_rows=BAD, null_keys=NULL_KEYS)
    assert dmo_rows(other) == rows
    assert account_rows(other) == account_rows(seeded)
    assert manifest(other) == manifest(seeded)
    different = tmp_path / "different"
    seed_org(different, records=N, random_seed=8, bad_rows=BAD, null_keys=NULL_KEYS)
    assert dmo_rows(different) != rows


def test_forked_generator_gives_the_same_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seeded: Path,
                                              rows: list[tuple]):
    """Big seeds generate in a child process; the data must not depend on that."""
    monkeypatch.setattr(seed_module, "PARALLEL_MIN_ROWS", 0)
    summary = seed_org(tmp_path, records=N, random_seed=7, bad_rows=BAD, null_keys=NULL_KEYS)
    assert summary["parallel"] is True
    assert dmo_rows(tmp_path) == rows
    assert account_rows(tmp_path) == account_rows(seeded)
    assert manifest(tmp_path) == manifest(seeded)


def test_forked_generator_failure_is_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(seed_module, "PARALLEL_MIN_ROWS", 0)
    monkeypatch.setattr(seed_module, "_ZZ_REGIONS", ())  # the child fails while generating keys
    with pytest.raises(RuntimeError, match="seed generator process failed"):
        seed_org(tmp_path, records=20_000, random_seed=7)


def test_counts_and_account_shape(seeded: Path, rows: list[tuple]):
    accounts = account_rows(seeded)
    assert len(rows) == N
    assert len(accounts) == N // 40
    user_id = Credentials.load_or_create(seeded / "credentials.json").user_id
    col = {f.name: i for i, f in enumerate(ACCOUNT)}
    assert len({a[col["ExternalId__c"]] for a in accounts}) == len(accounts)
    for a in accounts:
        assert a[col["Id"]].startswith("001") and len(a[col["Id"]]) == 18
        assert a[col["OwnerId"]] == a[col["CreatedById"]] == user_id
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000", a[col["CreatedDate"]])
        assert a[col["Name"]] and a[col["Industry"]] and a[col["Type"]] and a[col["BillingCountry"]]
    m = manifest(seeded)
    assert (m["records"], m["accounts"], len(m["bad_rows"]), m["null_key_rows"]) == (N, N // 40, BAD, NULL_KEYS)
    assert m["counts"] == {"records": N, "accounts": N // 40, "bad_rows": BAD, "null_key_rows": NULL_KEYS,
                           "valid_rows": N - BAD - NULL_KEYS}
    assert m["parameters"] == {"records": N, "accounts": None, "random_seed": 7, "bad_rows": BAD,
                               "null_keys": NULL_KEYS}
    assert sum(1 for r in rows if r[COL["ExternalId__c"]] is None) == NULL_KEYS
    assert sum(m["key_formats"].values()) == N


def test_explicit_account_count(tmp_path: Path):
    summary = seed_org(tmp_path, records=300, accounts=7, random_seed=1)
    assert summary["accounts"] == 7 and len(account_rows(tmp_path)) == 7
    assert {r[COL["AccountExternalId__c"]] for r in dmo_rows(tmp_path)} <= {f"ACC-{i:07d}" for i in range(1, 8)}


def test_exactly_the_manifest_rows_fail_and_for_the_stated_reason(seeded: Path, rows: list[tuple]):
    m = manifest(seeded)
    account_keys = {a[-1] for a in account_rows(seeded)}
    failing = {}
    for r in rows:
        errors = salesforce_errors(r, account_keys)
        if errors:
            failing[r[COL["ExternalId__c"]]] = errors
    assert m["bad_row_list"] == m["bad_rows"]
    listed = {b["external_id"]: b for b in m["bad_rows"]}
    assert len(listed) == BAD and None not in listed
    assert set(failing) == set(listed)
    source_column = {"Name": "Name__c", "StageName": "StageName__c", "Account.ExternalId__c": "AccountExternalId__c",
                     "Amount": "Amount__c", "Probability": "Probability__c", "CloseDate": "CloseDate__c"}
    for key, bad in listed.items():
        assert failing[key] == [bad["expected_error_code"]], (key, bad)  # one defect per row
        row = rows[bad["rowid"] - 1]
        assert row[COL["ExternalId__c"]] == key
        assert row[COL[source_column[bad["field"]]]] == bad["value"]
        assert BAD_KINDS[bad["kind"]][0] == bad["expected_error_code"] and bad["reason"]
    # every kind is represented, in a deterministic cycle
    assert set(m["bad_row_kinds"]) == set(BAD_KINDS)
    assert all(count == BAD // len(BAD_KINDS) for count in m["bad_row_kinds"].values())
    # spread over the key space rather than bunched in one format
    formats = {next(f for f, p in KEY_PATTERNS.items() if re.fullmatch(p, k)) for k in listed}
    assert len(formats) >= 3


def test_valid_rows_are_consistent(rows: list[tuple]):
    lo, hi = date(REFERENCE_DAY.year - 2, 1, 1), date(REFERENCE_DAY.year + 2, 12, 31)
    bad_probability = 0
    for r in rows:
        stage, prob, amount, close = (r[COL[c]] for c in ("StageName__c", "Probability__c", "Amount__c",
                                                           "CloseDate__c"))
        if stage in STAGE_NAMES and prob is not None and 0 <= prob <= 100:
            if stage == "Closed Won":
                assert prob == 100
            elif stage == "Closed Lost":
                assert prob == 0
            bad_probability += prob != STAGE_DEFAULT[stage]
        if amount is not None and amount < 1e16:
            assert amount > 0 and round(amount, 2) == amount
        if close is not None:
            assert lo <= date.fromisoformat(close) <= hi
        assert re.fullmatch(r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r[COL["LastModifiedDate__c"]])
    assert bad_probability < 0.15 * len(rows)  # probability matches the stage default "mostly"
    assert {r[COL["StageName__c"]] for r in rows} >= STAGE_NAMES


def test_power_law_accounts(seeded: Path, rows: list[tuple]):
    sizes = Counter(r[COL["AccountExternalId__c"]] for r in rows)
    ordered = sorted(sizes.values(), reverse=True)
    assert ordered[0] >= 0.06 * N and ordered[1] >= 0.05 * N  # two whales
    assert ordered[0] >= 10 * ordered[len(ordered) // 2]  # far above the median account
    top = manifest(seeded)["largest_accounts"]
    assert [t["opportunities"] for t in top[:3]] == ordered[:3]


@pytest.mark.parametrize(("rows_n", "accounts"), [(200_000, 5_000), (2_000_000, 50_000)])
def test_power_law_at_scale(rows_n: int, accounts: int):
    counts = _account_counts(rows_n, accounts)
    assert sum(counts) == rows_n and len(counts) == accounts and min(counts) >= 1
    assert sum(c > 10_000 for c in counts) >= 2
    assert sum(c <= 3 for c in counts) >= 0.3 * accounts  # long tail of 1-3


def test_account_counts_edge_cases():
    assert _account_counts(5, 10) == [1] * 5 + [0] * 5
    assert sum(_account_counts(120, 100)) == 120
    assert sum(_account_counts(1_000, 10)) == 1_000


def test_key_formats_unique_and_unbalanced(rows: list[tuple]):
    keys = [r[COL["ExternalId__c"]] for r in rows if r[COL["ExternalId__c"]] is not None]
    assert len(set(keys)) == len(keys)
    assert len({k.upper() for k in keys}) == len(keys)  # Salesforce external ids are case-insensitive
    assert max(len(k) for k in keys) <= 80
    found = Counter(next((f for f, p in KEY_PATTERNS.items() if re.fullmatch(p, k)), "other") for k in keys)
    assert set(found) == {name for name, _ in KEY_FORMATS}
    assert 0.55 < found["opp_dense"] / len(keys) < 0.65 and 0.15 < found["sf_legacy"] / len(keys) < 0.25
    # Equal-width split of min..max (keys as big-endian byte numbers) versus equal-count split: the first puts
    # most rows into one bucket and leaves others nearly empty.
    as_int = sorted(int.from_bytes(k.encode()[:12].ljust(12, b"\0"), "big") for k in keys)
    lo, hi = as_int[0], as_int[-1]
    buckets = Counter(min(9, (v - lo) * 10 // (hi - lo)) for v in as_int)
    assert max(buckets.values()) > 0.5 * len(keys)  # five times the even share
    assert sum(1 for b in range(10) if buckets.get(b, 0) < 0.01 * len(keys)) >= 2


def test_text_edge_cases_present(rows: list[tuple]):
    texts = [(r[COL["Name__c"]] or "") + "\x00" + (r[COL["Description__c"]] or "") for r in rows]
    checks = {
        "double quote": lambda t: '"' in t, "comma": lambda t: "," in t, "CRLF": lambda t: "\r\n" in t,
        "bare LF": lambda t: re.search(r"(?<!\r)\n", t), "bare CR": lambda t: re.search(r"\r(?!\n)", t),
        "tab": lambda t: "\t" in t, "accent": lambda t: re.search("[éüñçø]", t, re.I),
        "CJK": lambda t: re.search("[\u4e00-\u9fff\u3040-\u30ff]", t),
        "emoji": lambda t: re.search("[\U0001F300-\U0001FAFF]", t),
    }
    for column in ("Name__c", "Description__c"):  # each column on its own: the CSV writer quotes them separately
        values = [r[COL[column]] or "" for r in rows]
        for what, check in checks.items():
            assert sum(1 for t in values if check(t)) >= 3, (column, what)
        assert sum(1 for t in values if re.search(r'["\r\n\t]|[^\x00-\x7f]', t)) > 0.02 * N, column
    awkward = sum(1 for t in texts if re.search(r'["\r\n\t]|[^\x00-\x7f]', t))
    assert 0.04 * N < awkward < 0.25 * N
    for col in ("Description__c", "Type__c", "LeadSource__c"):
        values = [r[COL[col]] for r in rows]
        assert values.count(None) > 0.05 * N, col
        assert 0 < values.count("") < 0.05 * N, col  # empty string kept distinct from NULL
    assert sum(r[COL["Amount__c"]] is None for r in rows) > 0.02 * N
    assert max(len(r[COL["Description__c"]] or "") for r in rows) > 2_000
    good_names = [r[COL["Name__c"]] for r in rows if r[COL["Name__c"]] and utf16_len(r[COL["Name__c"]]) <= 120]
    assert len(good_names) >= N - BAD


def test_reseed_replaces_everything(tmp_path: Path):
    seed_org(tmp_path, records=2_000, random_seed=3, bad_rows=10)
    first = dmo_rows(tmp_path)
    with sqlite3.connect(tmp_path / "org.sqlite") as conn:
        conn.execute('INSERT INTO "Opportunity"(Id, Name) VALUES (\'006000000000001AAA\', \'left over\')')
        conn.execute("CREATE TABLE bulk_jobs (id TEXT)")
        conn.execute("INSERT INTO bulk_jobs VALUES ('750x')")
    (tmp_path / "jobs" / "750x").mkdir(parents=True)
    (tmp_path / "jobs" / "750x" / "data.csv").write_text("a,b\n")
    (tmp_path / "jobs" / "stray.csv").write_text("x\n")

    seed_org(tmp_path, records=500, accounts=12, random_seed=4, bad_rows=3)
    assert len(dmo_rows(tmp_path)) == 500 and len(account_rows(tmp_path)) == 12
    with sqlite3.connect(tmp_path / "org.sqlite") as conn:
        assert conn.execute('SELECT count(*) FROM "Opportunity"').fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM bulk_jobs").fetchone() == (0,)
    assert list((tmp_path / "jobs").iterdir()) == []
    assert manifest(tmp_path)["records"] == 500 and len(manifest(tmp_path)["bad_rows"]) == 3

    # Seeding the first parameters again over different data gives the first rows back.
    seed_org(tmp_path, records=2_000, random_seed=3, bad_rows=10)
    assert dmo_rows(tmp_path) == first


def test_seed_while_a_reader_holds_a_snapshot(tmp_path: Path):
    seed_org(tmp_path, records=1_000, random_seed=5)
    reader = sqlite3.connect(tmp_path / "datacloud.sqlite", isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute(f'SELECT count(*) FROM "{DMO_NAME}"').fetchone() == (1_000,)
        seed_org(tmp_path, records=1_500, random_seed=5)  # WAL: the writer does not wait for the reader
        assert reader.execute(f'SELECT count(*) FROM "{DMO_NAME}"').fetchone() == (1_000,)  # its snapshot
        reader.execute("COMMIT")
        assert reader.execute(f'SELECT count(*) FROM "{DMO_NAME}"').fetchone() == (1_500,)
    finally:
        reader.close()
    with sqlite3.connect(tmp_path / "datacloud.sqlite") as conn:
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert f"ix_{DMO_NAME}_ExternalId__c" in indexes and f"ix_{DMO_NAME}_AccountExternalId__c" in indexes


def test_cli(tmp_path: Path):
    out = subprocess.run([sys.executable, "-m", "emulator", "seed", "--data-dir", str(tmp_path), "--records", "300",
                          "--bad-rows", "8", "--null-keys", "2"], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    assert "records: 300" in out and "bad_rows: 8" in out and "accounts: 10" in out
    assert manifest(tmp_path)["null_key_rows"] == 2


def test_rejects_impossible_arguments(tmp_path: Path):
    with pytest.raises(ValueError):
        seed_org(tmp_path, records=10, bad_rows=8, null_keys=5)
