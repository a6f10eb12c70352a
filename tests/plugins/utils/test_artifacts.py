"""The failed-rows artifact: parts per job, idempotent rewrites, one streamed CSV at the end."""

from __future__ import annotations

import csv
import io

from sf_datacloud_sync.utils.artifacts import FailedRowsArtifact, safe_name

COLUMNS = ["ExternalId__c", "Name__c", "Description__c"]


def _artifact(tmp_path, name="P03 [OPP-0420…, OPP-0630)") -> FailedRowsArtifact:
    return FailedRowsArtifact(f"file://{tmp_path}", "my_dag", "manual__2026-01-01T00:00:00+00:00", name, COLUMNS)


def _rows(url: str) -> list[list[str]]:
    from airflow.sdk import ObjectStoragePath

    with ObjectStoragePath(url).open("r", encoding="utf-8", newline="") as f:
        return list(csv.reader(io.StringIO(f.read())))


def test_safe_name():
    assert safe_name("P03 [OPP-0420…, OPP-0630)") == "P03_OPP-0420_OPP-0630"
    assert safe_name("manual__2026-01-01T00:00:00+00:00") == "manual__2026-01-01T00:00:00+00:00"
    assert safe_name("a/b?c#d") == "a_b_c_d"
    assert safe_name("…") == "_"


def test_parts_are_concatenated_under_one_header_and_removed(tmp_path):
    art = _artifact(tmp_path)
    with art.part("750A") as part:
        part.write("OPP-1", "REQUIRED_FIELD_MISSING", "Required fields are missing: [Name]", "Name",
                   {"ExternalId__c": "OPP-1", "Name__c": "#N/A", "Description__c": 'multi\nline, "quoted"'})
    with art.part("750B") as part:
        pass  # no permanent failures: no file
    with art.part("750C") as part:
        part.write("OPP-9", "STRING_TOO_LONG", "Name: data value too large", "Name",
                   {"ExternalId__c": "OPP-9", "Name__c": "x" * 130})
    assert not art.part_path("750B").exists()
    url = art.assemble(["750A", "750B", "750C"])
    assert url == str(art.path)
    assert url.endswith("/my_dag/manual__2026-01-01T00:00:00+00:00/P03_OPP-0420_OPP-0630_failed.csv")
    rows = _rows(url)
    assert rows[0] == ["external_id", "error_code", "error_message", "error_fields", *COLUMNS, "sf_job_id"]
    assert rows[1] == ["OPP-1", "REQUIRED_FIELD_MISSING", "Required fields are missing: [Name]", "Name", "OPP-1",
                       "#N/A", 'multi\nline, "quoted"', "750A"]
    assert rows[2][:2] == ["OPP-9", "STRING_TOO_LONG"] and rows[2][-2:] == ["", "750C"]
    assert len(rows) == 3
    assert not art.part_path("750A").exists() and not art.part_path("750C").exists()


def test_rewriting_a_part_replaces_it(tmp_path):
    art = _artifact(tmp_path)
    for _ in range(2):  # the results of one job read twice (a crash in between): no duplicate rows
        with art.part("750A") as part:
            part.write("OPP-1", "X", "m", "", {})
    with art.part("750B") as part:
        part.write("OPP-2", "X", "m", "", {})
    with art.part("750B") as part:
        pass  # read again, nothing failed for good this time: the stale part goes
    url = art.assemble(["750A", "750B"])
    assert [r[0] for r in _rows(url)[1:]] == ["OPP-1"]


def test_no_rows_means_no_artifact(tmp_path):
    art = _artifact(tmp_path)
    assert art.assemble(["750A"]) is None
    assert not art.path.exists()
