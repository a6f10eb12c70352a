"""The CSV of rows Salesforce rejected for good, one file per partition, written through ``ObjectStoragePath``.

Rows arrive job by job while ``failedResults`` / ``unprocessedrecords`` are streamed. Each finished job gets
its own *part* (no header, overwritten if the job's results are read again after a crash, so a resumed task
never duplicates rows); when the partition is done the parts are concatenated, byte-streamed, into
``<base>/<dag_id>/<run_id>/<partition>_failed.csv`` and removed. Object stores cannot append, which is why
parts exist at all. Memory stays flat: rows are written as they are read.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

ERROR_COLUMNS = ("external_id", "error_code", "error_message", "error_fields")
JOB_COLUMN = "sf_job_id"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=:-]+")
_COPY_CHUNK = 1 << 20


def safe_name(text: str) -> str:
    """A path segment for a label or run id: runs of anything but ``[A-Za-z0-9._+=:-]`` become ``_``.

    >>> safe_name("P03 [OPP-0420…, OPP-0630)")
    'P03_OPP-0420_OPP-0630'
    """
    return _UNSAFE.sub("_", text).strip("_.") or "_"


def artifact_dir(base_url: str, dag_id: str, run_id: str) -> ObjectStoragePath:
    from airflow.sdk import ObjectStoragePath

    return ObjectStoragePath(base_url.rstrip("/")) / safe_name(dag_id) / safe_name(run_id)


class PartWriter:
    """Writes one job's permanently failed rows (no header) and counts them."""

    def __init__(self, path: ObjectStoragePath, job_id: str, columns: Sequence[str]) -> None:
        self.path = path
        self.job_id = job_id
        self.columns = list(columns)
        self.rows = 0
        self._file: Any = None
        self._writer: Any = None

    def write(self, external_id: str, code: str, message: str, fields: str, record: dict[str, str]) -> None:
        """``record`` maps the source columns to the values as uploaded (the result CSV echoes them)."""
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8", newline="")
            self._writer = csv.writer(self._file)
        self._writer.writerow([external_id, code, message, fields, *(record.get(c, "") for c in self.columns),
                               self.job_id])
        self.rows += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None
        elif self.path.exists():
            # A re-read found no permanent rows where an earlier (crashed) read wrote some: drop the stale part.
            self.path.unlink()

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FailedRowsArtifact:
    """Where one partition's permanently failed rows go.

    :param base_url: the artifacts root (``SyncConfig.artifacts_url()``), any ``ObjectStoragePath`` URL.
    :param dag_id: the DAG id; a folder level.
    :param run_id: the DAG run id; a folder level, so every run keeps its own files.
    :param name: the partition's file name stem (``safe_name(label)``).
    :param source_columns: the Data Cloud columns written after the error columns, in this order.
    """

    def __init__(self, base_url: str, dag_id: str, run_id: str, name: str, source_columns: Sequence[str]) -> None:
        self.directory = artifact_dir(base_url, dag_id, run_id)
        self.name = safe_name(name)
        self.source_columns = list(source_columns)

    @property
    def header(self) -> list[str]:
        return [*ERROR_COLUMNS, *self.source_columns, JOB_COLUMN]

    @property
    def path(self) -> ObjectStoragePath:
        return self.directory / f"{self.name}_failed.csv"

    def part_path(self, job_id: str) -> ObjectStoragePath:
        return self.directory / ".parts" / self.name / f"{safe_name(job_id)}.csv"

    def part(self, job_id: str) -> PartWriter:
        return PartWriter(self.part_path(job_id), job_id, self.source_columns)

    def assemble(self, job_ids: Sequence[str]) -> str | None:
        """Concatenate the parts of ``job_ids`` (in that order) under one header; remove them.

        Returns the artifact's URL, or ``None`` when no part holds a row (then no file is left behind).
        Safe to call again after a crash: parts are only removed once the artifact is complete.
        """
        parts = [p for p in (self.part_path(j) for j in job_ids) if p.exists()]
        if not parts:
            if self.path.exists():
                self.path.unlink()  # a stale artifact of an earlier attempt that counted rows differently
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = io.StringIO()
        csv.writer(header).writerow(self.header)
        # One binary write pass: object stores have no append mode.
        with self.path.open("wb") as out:
            out.write(header.getvalue().encode("utf-8"))
            for part in parts:
                with part.open("rb") as src:
                    while chunk := src.read(_COPY_CHUNK):
                        out.write(chunk)
        for part in parts:
            part.unlink()
        return str(self.path)
