"""Bulk API 2.0 CSV encoding and chunking: formats, quoting, limits (the emulator round trip is in test_transfer)."""

from __future__ import annotations

import csv
import datetime as dt
import io
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sf_datacloud_sync.utils.csv_encoder import CsvEncoder, Lane, format_value, iter_chunks, iter_lane_chunks

TRICKY = [
    "O'Brien\"; DROP TABLE x;--",
    'say "hi", then leave',
    "line1\nline2",
    "crlf\r\ninside",
    "lone\rcarriage return",
    "\ufeffstarts with a BOM",
    "back\\slash\\\\n",
    "tab\there",
    "ünïcødé ✓ 日本語 🚀",
    "  spaces kept  ",
    "#N/A",
    "",
]


def parse(data: bytes, delimiter: str = ",") -> list[list[str]]:
    assert not data.startswith(b"\xef\xbb\xbf"), "no BOM before the header"
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline=""), delimiter=delimiter))


@pytest.mark.parametrize("line_ending", ["LF", "CRLF"])
@pytest.mark.parametrize(("delimiter", "char"), [("COMMA", ","), ("TAB", "\t"), ("PIPE", "|"), ("SEMICOLON", ";"),
                                                 ("CARET", "^"), ("BACKQUOTE", "`")])
def test_tricky_text_round_trips(line_ending, delimiter, char):
    enc = CsvEncoder(["Key", "Text"], ["Varchar", "Varchar"], line_ending=line_ending, delimiter=delimiter)
    rows = [(f"K{i}{char}x", text) for i, text in enumerate(TRICKY)]
    data = enc.header_bytes + enc.encode_rows(rows)
    assert parse(data, char) == [["Key", "Text"], *[list(r) for r in rows]]
    terminator = b"\r\n" if line_ending == "CRLF" else b"\n"
    assert data.endswith(terminator) and data.startswith(b"Key" + char.encode() + b"Text" + terminator)


def test_lone_cr_is_quoted_under_lf():
    # The stdlib writer alone would leave "a\rb" bare under an LF terminator; Bulk would then split the record.
    enc = CsvEncoder(["A", "B"], line_ending="LF")
    assert enc.encode_rows([("a\rb", "c")]) == b'"a\rb",c\n'
    assert enc.encode_rows([("plain", "c"), ("x\r", "y")]) == b'plain,c\n"x\r",y\n'


def test_value_holding_the_writer_sentinel_still_round_trips():
    enc = CsvEncoder(["A", "B"])
    rows = [("x\r\uffff\ny", "ok"), ("plain", "b\rc")]
    data = enc.encode_rows(rows)
    assert data == b'"x\r\xef\xbf\xbf\ny",ok\nplain,"b\rc"\n'
    assert parse(enc.header_bytes + data)[1:] == [list(r) for r in rows]


def test_quotes_doubled_and_minimal_quoting():
    enc = CsvEncoder(["A", "B", "C"])
    assert enc.encode_rows([('O\'Brien"; DROP', "a,b", "plain")]) == b'"O\'Brien""; DROP","a,b",plain\n'


def test_null_and_empty_stay_distinct():
    enc = CsvEncoder(["A", "B"])
    assert enc.encode_rows([(None, "")]) == b"#N/A,\n"
    assert CsvEncoder(["A", "B"], null_as="").encode_rows([(None, "")]) == b",\n"


def test_values_by_python_type():
    tz = dt.timezone(dt.timedelta(hours=-5))
    row = (
        dt.date(2024, 2, 29),
        dt.datetime(2024, 2, 29, 23, 30, 1, 123456, tzinfo=tz),
        dt.datetime(2024, 1, 1, 0, 0),
        Decimal("1E+20"),
        Decimal("-0.000000123"),
        1e20,
        1.5e-7,
        0.1,
        True,
        False,
        42,
        dt.time(13, 5, 7, 250000),
    )
    enc = CsvEncoder([f"F{i}" for i in range(len(row))])
    assert enc.encode_rows([row]).decode().rstrip("\n").split(",") == [
        "2024-02-29", "2024-03-01T04:30:01.123Z", "2024-01-01T00:00:00.000Z", "100000000000000000000",
        "-0.000000123", "100000000000000000000", "0.00000015", "0.1", "true", "false", "42", "13:05:07.250Z"]


def test_declared_column_types_normalise_strings():
    enc = CsvEncoder(["N", "D", "T", "B", "I"], ["Numeric", "Date", "TimestampTZ", "Bool", "BigInt"])
    out = enc.encode_rows([
        ("1.5E+3", "2024-05-06", "2024-05-06T10:00:00+02:00", "True", "7"),
        (12.25, "2024-05-06T23:00:00", "2024-05-06 10:00:00.5", False, 8),
        ("19143.000000000000000000", dt.datetime(2024, 5, 6, 23, 0, tzinfo=dt.UTC), "2024-05-06T08:00:00.000Z",
         "false", None),
        ("not a number", "garbage", "not a time", "TRUE", ""),
    ]).decode().splitlines()
    assert out == [
        "1500,2024-05-06,2024-05-06T08:00:00.000Z,true,7",
        "12.25,2024-05-06,2024-05-06T10:00:00.500Z,false,8",
        "19143.000000000000000000,2024-05-06,2024-05-06T08:00:00.000Z,false,#N/A",
        # Values that cannot be normalised go to Salesforce as they are: it rejects that row, visibly.
        "not a number,garbage,not a time,true,",
    ]


def test_wrong_row_width_is_a_clear_error():
    enc = CsvEncoder(["A", "B"])
    with pytest.raises(ValueError, match="row has 3 values for 2 columns"):
        enc.encode_rows([("a", "b"), ("a", "b", "c")])


def test_format_value_subclasses():
    class MyInt(int):
        pass

    assert format_value(MyInt(5)) == "5"
    assert format_value(b"bytes") == "bytes"


# -- chunking -------------------------------------------------------------------------------------------------
def _rows(n: int) -> list[tuple[str, str]]:
    return [(f"K{i:05d}", TRICKY[i % len(TRICKY)] * (1 + i % 3)) for i in range(n)]


def _records(chunks) -> list[list[str]]:
    out = []
    for c in chunks:
        data = c.data if isinstance(c.data, bytes) else c.data.read()
        parsed = parse(data)
        assert parsed[0] == ["Key", "Text"]
        assert len(parsed) - 1 == c.records and len(data) == c.nbytes
        out += parsed[1:]
    return out


def test_chunks_split_by_records_and_keep_keys():
    rows = _rows(25)
    chunks = list(iter_chunks(rows, ["Key", "Text"], max_records=10, max_bytes=10_000, key_index=0))
    assert [c.records for c in chunks] == [10, 10, 5]
    assert [(c.first_key, c.last_key) for c in chunks] == [("K00000", "K00009"), ("K00010", "K00019"),
                                                            ("K00020", "K00024")]
    assert _records(chunks) == [list(r) for r in rows]


def test_a_chunk_never_ends_inside_a_run_of_equal_keys():
    # Duplicate keys across a chunk boundary: a resume "after key K00009" would skip the second K00009.
    keys = [f"K{i:05d}" for i in range(9)] + ["K00009"] * 3 + [f"K{i:05d}" for i in range(10, 18)] + [None] * 25
    rows = [(k, f"row {i}") for i, k in enumerate(keys)]
    chunks = list(iter_chunks(rows, ["Key", "Text"], max_records=10, max_bytes=10_000, key_index=0, batch_rows=4))
    # 9 + the run of 3; then 8 + 2 NULLs, extended by the NULL run but cut at 2 × 10 (bounded); the rest.
    assert [c.records for c in chunks] == [12, 20, 13]
    assert [(c.first_key, c.last_key) for c in chunks] == [("K00000", "K00009"), ("K00010", None), (None, None)]
    assert _records(chunks) == [[k if k is not None else "#N/A", t] for k, t in rows]
    # Without a key there is no notion of a run: plain record limits.
    assert [c.records for c in iter_chunks(rows, ["Key", "Text"], 10, 10_000)] == [10, 10, 10, 10, 5]


@settings(max_examples=60, deadline=None)
@given(max_bytes=st.integers(min_value=120, max_value=3_000), max_records=st.integers(min_value=1, max_value=40),
       n=st.integers(min_value=0, max_value=120), batch_rows=st.integers(min_value=1, max_value=50))
def test_chunks_never_exceed_max_bytes_and_lose_nothing(max_bytes, max_records, n, batch_rows):
    rows = _rows(n)
    chunks = list(iter_chunks(rows, ["Key", "Text"], max_records, max_bytes, key_func=lambda r: r[0],
                              batch_rows=batch_rows))
    assert all(c.nbytes <= max_bytes and 1 <= c.records <= max_records for c in chunks)
    assert _records(chunks) == [list(r) for r in rows]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.text(), st.one_of(st.none(), st.text())), max_size=30),
       st.sampled_from(["LF", "CRLF"]))
def test_any_text_round_trips(rows, line_ending):
    rows = [(a.replace("\x00", ""), b.replace("\x00", "") if b is not None else None) for a, b in rows]
    enc = CsvEncoder(["A", "B"], line_ending=line_ending)
    parsed = parse(enc.header_bytes + enc.encode_rows(rows))
    assert parsed[1:] == [[a, "#N/A" if b is None else b] for a, b in rows]


def test_row_larger_than_max_bytes_names_its_key():
    rows = [("small", "x"), ("huge", "y" * 500)]
    with pytest.raises(ValueError, match="key 'huge'"):
        list(iter_chunks(rows, ["Key", "Text"], 10, 200, key_index=0))


def test_header_larger_than_max_bytes():
    with pytest.raises(ValueError, match="header alone"):
        list(iter_chunks([], ["A" * 50], 10, 20))


def test_chunks_are_read_lazily():
    consumed = []

    def source():
        for row in _rows(100):
            consumed.append(row)
            yield row

    chunks = iter_chunks(source(), ["Key", "Text"], max_records=10, max_bytes=100_000, batch_rows=5)
    next(chunks)
    assert len(consumed) == 10


def test_spooled_chunks():
    chunks = list(iter_chunks(_rows(30), ["Key", "Text"], 10, 100_000, key_index=0, spool_threshold=64))
    assert all(hasattr(c.data, "read") for c in chunks)
    assert len(_records(chunks)) == 30


# -- through the emulator: upload, then read the records back from the org -------------------------------------------
@pytest.mark.parametrize("line_ending", ["LF", "CRLF"])
def test_round_trip_through_the_org(clean_emulator, monkeypatch, line_ending):
    from sf_datacloud_sync.hooks.salesforce_bulk2 import SalesforceBulk2Hook

    monkeypatch.setenv("AIRFLOW_CONN_SALESFORCE_DEFAULT", clean_emulator.info["airflow_conn"])
    bulk = SalesforceBulk2Hook()
    header = ["ExternalId__c", "Name", "StageName", "CloseDate", "Amount", "Description"]
    descriptions = [t for t in TRICKY if t not in ("", "#N/A")] + [None]
    keys = ["O'Brien\"; DROP TABLE x;--", "back\\slash\\", "ünï-日本-🚀", "a,b", "q\"q", "plain"]
    rows = [(f"{keys[i % len(keys)]}#{i}", f"Deal {i}", "Prospecting", dt.date(2026, 1, 1 + i),
             Decimal("1E+3") * i, text) for i, text in enumerate(descriptions)]
    chunks = list(iter_chunks(rows, header, max_records=5, max_bytes=100_000, key_index=0,
                              column_types=["Varchar", "Varchar", "Varchar", "Date", "Numeric", "Varchar"],
                              line_ending=line_ending))
    assert len(chunks) == 3
    for chunk in chunks:
        job = bulk.submit_ingest_job("Opportunity", chunk.data, external_id_field="ExternalId__c",
                                     line_ending=line_ending)
        wait = bulk.wait_for_job(job["id"], timeout=60, poll_interval=0.05)
        assert wait.succeeded and wait.records_failed == 0, list(bulk.iter_job_results(job["id"], "failed"))
    found = {r["ExternalId__c"]: r for r in bulk.iter_query(
        "SELECT ExternalId__c, Name, CloseDate, Amount, Description FROM Opportunity")}
    assert set(found) == {r[0] for r in rows}
    for key, name, _, close, amount, text in rows:
        got = found[key]
        assert (got["Name"], got["CloseDate"]) == (name, close.isoformat())
        assert Decimal(got["Amount"] or "0") == amount
        assert got["Description"] == (text or ""), key  # None was sent as #N/A: null in the org
    bulk.close()


# -- several serial partitions in one job ------------------------------------------------------------------------------
def lane(name: str, n: int, *, expected: int | None = None, start: int = 0) -> Lane:
    rows = [(f"{name}-{i:03d}", name) for i in range(start, n)]
    return Lane(rows, lambda row: [row[1], row[0]], position=None if not start else [name, f"{name}-{start - 1:03d}"],
                sent=start, expected=n if expected is None else expected)


def lane_chunks(lanes: list[Lane], batch: int, **kw) -> list[tuple[list[list[str]], object]]:
    out = []
    for c in iter_lane_chunks(lanes, ["ExternalId__c", "Lane"], batch, kw.pop("max_bytes", 10_000_000), **kw):
        data = c.data if isinstance(c.data, bytes) else c.data.read()
        rows = parse(data)[1:]
        assert c.records == len(rows)
        out.append((rows, c.last_key))
    return out


def runs(rows: list[list[str]]) -> list[tuple[str, int]]:
    """``(lane, rows)`` per contiguous run of one lane's rows."""
    result: list[tuple[str, int]] = []
    for _, name in rows:
        if result and result[-1][0] == name:
            result[-1] = (name, result[-1][1] + 1)
        else:
            result.append((name, 1))
    return result


def test_lane_chunks_take_one_batch_of_each_lane_per_job_whole_batches_first():
    # C is listed first but ends within the first step: it goes last, so A and B each fill one whole batch.
    chunks = lane_chunks([lane("C", 3), lane("A", 25), lane("B", 10)], 10)
    assert [runs(rows) for rows, _ in chunks] == [[("A", 10), ("B", 10), ("C", 3)], [("A", 10)], [("A", 5)]]
    # Each lane's rows keep their order and none is lost or repeated.
    sent = [row for rows, _ in chunks for row in rows]
    for name, n in (("A", 25), ("B", 10), ("C", 3)):
        assert [r[0] for r in sent if r[1] == name] == [f"{name}-{i:03d}" for i in range(n)]
    # The marks: where each lane resumes once the chunk is at Salesforce.
    assert chunks[0][1] == [{"after": ["C", "C-002"], "sent": 3}, {"after": ["A", "A-009"], "sent": 10},
                            {"after": ["B", "B-009"], "sent": 10}]
    assert chunks[-1][1][1] == {"after": ["A", "A-024"], "sent": 25}


def test_lane_chunks_resume_from_the_marks_and_trust_rows_over_expectations():
    # A resumes after its 12th row; B turns out to hold more rows than expected.
    chunks = lane_chunks([lane("A", 30, start=12), lane("B", 14, expected=5)], 10)
    assert [runs(rows) for rows, _ in chunks] == [[("A", 10), ("B", 10)], [("A", 8), ("B", 4)]]
    assert chunks[-1][1] == [{"after": ["A", "A-029"], "sent": 30}, {"after": ["B", "B-013"], "sent": 14}]


def test_lane_chunks_cut_a_step_at_max_bytes():
    header = len(b"ExternalId__c,Lane\n")
    chunks = lane_chunks([lane("A", 10), lane("B", 10)], 10, max_bytes=header + 15 * len(b"A-000,A\n"))
    assert [runs(rows) for rows, _ in chunks] == [[("A", 10), ("B", 5)], [("B", 5)]]
    assert chunks[0][1][1] == {"after": ["B", "B-004"], "sent": 5}
