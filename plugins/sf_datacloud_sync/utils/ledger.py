"""The job ledger of one ``load_partition`` task instance, kept in Airflow's task state store.

The ledger is what makes a partition resumable: every Bulk job the task creates is written to it *before* its
data is uploaded, and every step after that (uploaded, closed, finished, results read) updates it. A retry, a
clear or a resume after deferral reads it back and knows exactly which rows are at Salesforce, which jobs to
re-attach to and where the Data Cloud stream continues. It is one JSON value under :data:`LEDGER_KEY`, so every
save is atomic.

Format (``version`` 1)::

    {
      "version": 1, "run_id": "...", "label": "P03 [...)", "bounds": [key, lower, upper, null_bucket],
      "conn_id": "salesforce_default",   # the jobs' connection (the API server aborts them on "mark failed")
      "phase": "streaming" | "waiting" | "results" | "done" | "failed",
      "attempt": 2,                      # try number that last wrote the ledger
      "started_at": 1767225600.0, "updated_at": ..., "finished_at": ... (once done),
      "stream": {"committed": ["OPP-0000000420"], "done": false, "next_seq": 7},
      "jobs": {                          # jobs whose results are not counted yet
        "750...": {"seq": 6, "round": 0, "attempt": 2, "state": "UploadComplete", "records": 300,
                   "first": ["OPP-..."], "last": ["OPP-..."], "processed": 0, "failed": 0, "error": null}
      },
      "done_jobs": {"count": 12, "ids": ["750...", ...]},   # counted jobs: ids capped at MAX_JOB_IDS
      "rounds": 1,                       # follow-up rounds submitted so far (0 = only the source stream)
      "pending_round": {"round": 2, "parents": ["750..."]} | null,
      "counters": {"rows": 2000, "upserted": 1950, "failed": 20, "retried": 37, "by_code": {"CODE": n}},
      "artifact_parts": ["750...", ...], "artifact": "file:///.../P03_..._failed.csv" | null,
      "progress": {"read": 2000, "uploaded": 2000, "jobs_done": 12, "jobs_open": 0, "failed": 20, ...}
    }

Job ``state`` is Salesforce's (``UploadComplete``, ``InProgress``, ``JobComplete``, ``Failed``, ``Aborted``)
plus two of our own before the job is closed: ``Open`` (created; the upload may or may not have reached
Salesforce) and ``Uploaded`` (the upload was acknowledged, the close was not). A job that failed as a whole for a
reason a person must fix gets ``"fatal": true`` (and ``"fatal_seen": true`` once a later attempt saw it).

Keys are lists (the partition's ordering columns, see ``order_columns``) so that ``range_query`` can resume
strictly after ``stream.committed``. ``stream.committed`` is the last key of the last source job whose upload
completed; source jobs are uploaded one after the other in key order, so everything up to it is at Salesforce.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

LEDGER_KEY = "load_partition.ledger"
LEDGER_VERSION = 1
MAX_JOB_IDS = 50

OPEN = "Open"
UPLOADED = "Uploaded"
UPLOAD_COMPLETE = "UploadComplete"
IN_PROGRESS = "InProgress"
JOB_COMPLETE = "JobComplete"
FAILED = "Failed"
ABORTED = "Aborted"
TERMINAL_STATES = frozenset({JOB_COMPLETE, FAILED, ABORTED})
# Closed at Salesforce: nothing more to upload, the job runs (or waits in Salesforce's queue) by itself.
RUNNING_STATES = frozenset({UPLOAD_COMPLETE, IN_PROGRESS})
# Not finished at Salesforce: what a stop has to abort.
UNFINISHED_STATES = frozenset({OPEN, UPLOADED, *RUNNING_STATES})


class StateStore(Protocol):
    """What the ledger needs of ``context["task_state_store"]``."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def set(self, key: str, value: Any) -> None: ...


class Ledger:
    """A partition's jobs, counters and stream position; plain JSON inside.

    :param data: The stored value (see the module docstring).
    """

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    # -- life cycle --------------------------------------------------------------------------------------------
    @classmethod
    def new(cls, *, run_id: str, label: str, bounds: list[Any], attempt: int = 1) -> Ledger:
        now = time.time()
        return cls({
            "version": LEDGER_VERSION, "run_id": run_id, "label": label, "bounds": list(bounds), "phase": "streaming",
            "attempt": attempt, "started_at": now, "updated_at": now,
            "stream": {"committed": None, "done": False, "next_seq": 0},
            "jobs": {}, "done_jobs": {"count": 0, "ids": []}, "rounds": 0, "pending_round": None,
            "counters": {"rows": 0, "upserted": 0, "failed": 0, "retried": 0, "by_code": {}},
            "artifact_parts": [], "artifact": None, "progress": {},
        })

    @classmethod
    def load(cls, store: StateStore, *, run_id: str, label: str, bounds: list[Any],
             attempt: int = 1) -> tuple[Ledger, Ledger | None]:
        """The ledger of this run and partition, and a *stale* one found in its place, if any.

        The store is scoped to the DAG run in Airflow 3.3 (``dag_run_id, task_id, map_index``), so a new run
        starts empty by itself; ``run_id`` and the partition bounds are still checked, so that a ledger written
        for other rows (the partitions were re-discovered with other bounds) is never resumed.
        """
        raw = store.get(LEDGER_KEY, None)
        if isinstance(raw, dict) and raw.get("version") == LEDGER_VERSION:
            found = cls(raw)
            if raw.get("run_id") == run_id and list(raw.get("bounds") or []) == list(bounds):
                found.data["attempt"] = attempt
                return found, None
            return cls.new(run_id=run_id, label=label, bounds=bounds, attempt=attempt), found
        return cls.new(run_id=run_id, label=label, bounds=bounds, attempt=attempt), None

    def save(self, store: StateStore) -> None:
        self.data["updated_at"] = time.time()
        store.set(LEDGER_KEY, self.data)

    # -- accessors ---------------------------------------------------------------------------------------------
    @property
    def jobs(self) -> dict[str, dict[str, Any]]:
        return self.data["jobs"]

    @property
    def counters(self) -> dict[str, Any]:
        return self.data["counters"]

    @property
    def stream(self) -> dict[str, Any]:
        return self.data["stream"]

    @property
    def phase(self) -> str:
        return self.data["phase"]

    @phase.setter
    def phase(self, value: str) -> None:
        self.data["phase"] = value

    @property
    def rounds(self) -> int:
        return int(self.data["rounds"])

    @property
    def is_fresh(self) -> bool:
        return not self.jobs and not self.data["done_jobs"]["count"] and not self.stream["done"] \
            and self.stream["committed"] is None

    def job_ids(self, states: Iterable[str], *, round_: int | None = None) -> list[str]:
        """Ids of the uncounted jobs in ``states`` (optionally of one round), in creation order."""
        wanted = set(states)
        return [j for j, e in sorted(self.jobs.items(), key=lambda kv: (kv[1]["round"], kv[1]["seq"]))
                if e["state"] in wanted and (round_ is None or e["round"] == round_)]

    def running_job_ids(self) -> list[str]:
        return self.job_ids(RUNNING_STATES)

    def finished_job_ids(self) -> list[str]:
        return self.job_ids(TERMINAL_STATES)

    def all_job_ids(self) -> list[str]:
        """Counted then uncounted ids, capped at :data:`MAX_JOB_IDS`, and the total number of jobs."""
        ids = list(self.data["done_jobs"]["ids"]) + [j for j in self.job_ids(
            {OPEN, UPLOADED, *RUNNING_STATES, *TERMINAL_STATES}) if j not in self.data["done_jobs"]["ids"]]
        return ids[:MAX_JOB_IDS]

    @property
    def job_count(self) -> int:
        return int(self.data["done_jobs"]["count"]) + len(self.jobs)

    def submitted_records(self, round_: int) -> int:
        """Records already uploaded in follow-up round ``round_`` (re-derived rows to skip on resume)."""
        return sum(e["records"] for e in self.jobs.values()
                   if e["round"] == round_ and e["state"] != OPEN)

    # -- job transitions ---------------------------------------------------------------------------------------
    def next_seq(self) -> int:
        seq = int(self.stream["next_seq"])
        self.stream["next_seq"] = seq + 1
        return seq

    def job_opened(self, job_id: str, *, seq: int, round_: int, attempt: int, records: int,
                   last_key: Any, first_key: Any = None) -> None:
        """Recorded *before* the upload starts: a crash from here on leaves a job we know about.

        ``records``, ``first_key`` and ``last_key`` describe the chunk about to be uploaded; they only count once
        the upload is acknowledged (:meth:`job_uploaded`).
        """
        self.jobs[job_id] = {"seq": seq, "round": round_, "attempt": attempt, "state": OPEN,
                             "records": int(records), "first": _jsonable(first_key), "last": _jsonable(last_key),
                             "processed": 0, "failed": 0, "error": None}

    def job_uploaded(self, job_id: str) -> None:
        """The upload was acknowledged: the rows are at Salesforce. Source rows count from here on."""
        entry = self.jobs[job_id]
        if entry["state"] != OPEN:
            return
        entry["state"] = UPLOADED
        if entry["round"] == 0:
            self.counters["rows"] += int(entry["records"])
            self.stream["committed"] = entry["last"]

    def correct_job(self, job_id: str, *, records: int, last_key: Any, first_key: Any = None) -> None:
        """Replace an uploaded source job's row count and last key (the stream's own figures win)."""
        entry = self.jobs.get(job_id)
        if entry is None:
            return
        if entry["round"] == 0 and entry["state"] != OPEN:
            self.counters["rows"] += int(records) - int(entry["records"])
            if self.stream["committed"] == entry["last"]:
                self.stream["committed"] = _jsonable(last_key)
        entry.update(records=int(records), first=_jsonable(first_key), last=_jsonable(last_key))

    def job_closed(self, job_id: str, state: str = UPLOAD_COMPLETE) -> None:
        self.jobs[job_id]["state"] = state

    def job_status(self, job_id: str, info: Mapping[str, Any]) -> None:
        """Salesforce's view of a job (``get_job`` answer, or one entry of the trigger event)."""
        entry = self.jobs.get(job_id)
        if entry is None:
            return
        state = info.get("state")
        if state and entry["state"] not in TERMINAL_STATES:
            entry["state"] = state
        for ours, theirs in (("processed", "numberRecordsProcessed"), ("failed", "numberRecordsFailed")):
            value = info.get(ours, info.get(theirs))
            if value is not None:
                entry[ours] = int(value)
        error = info.get("error", info.get("errorMessage"))
        if error:
            entry["error"] = str(error)[:1000]

    def drop_job(self, job_id: str) -> dict[str, Any] | None:
        """Forget a job (aborted before its upload was known to be complete); its rows will be sent again."""
        entry = self.jobs.pop(job_id, None)
        if entry and entry["round"] == 0 and entry["state"] != OPEN:
            self.counters["rows"] -= int(entry["records"])
        return entry

    def rewind_stream(self, job_ids: Iterable[str]) -> None:
        """Drop source jobs and every source job after the first of them; stream again from before it.

        Used when a source job failed as a whole for a reason the user has to fix (e.g. a header field that
        does not exist): once fixed, its rows must be read again with the new mapping. Later source jobs are
        dropped too, so that the stream stays one contiguous run of keys. Only called while no source job is
        counted yet: a source job that failed as a whole stops the task before the first round counts any job,
        so the job before the first dropped one is still in :attr:`jobs` with its last key.
        """
        source = {j: e for j, e in self.jobs.items() if e["round"] == 0}
        seqs = [source[j]["seq"] for j in job_ids if j in source]
        if not seqs:
            return
        first = min(seqs)
        ordered = sorted(source.items(), key=lambda kv: kv[1]["seq"])
        before = [e for _, e in ordered if e["seq"] < first and e["state"] != OPEN]
        for job_id, entry in ordered:
            if entry["seq"] >= first:
                self.drop_job(job_id)
        self.stream["committed"] = before[-1]["last"] if before else None
        self.stream["done"] = False

    # -- rounds ------------------------------------------------------------------------------------------------
    def begin_round(self, round_: int, parents: list[str]) -> None:
        self.data["pending_round"] = {"round": round_, "parents": list(parents)}

    @property
    def pending_round(self) -> dict[str, Any] | None:
        return self.data.get("pending_round")

    def finish_round(self, tallies: Mapping[str, Mapping[str, Any]], *, round_: int, submitted_any: bool) -> None:
        """Count the parents' results and forget them; one save makes the whole round visible at once.

        :param tallies: per parent job: ``upserted``, ``failed`` (permanent), ``retried``, ``by_code``,
            ``artifact`` (whether a part file was written).
        """
        done = self.data["done_jobs"]
        c = self.counters
        for job_id, t in tallies.items():
            self.jobs.pop(job_id, None)
            done["count"] += 1
            if len(done["ids"]) < MAX_JOB_IDS:
                done["ids"].append(job_id)
            c["upserted"] += int(t["upserted"])
            c["failed"] += int(t["failed"])
            c["retried"] += int(t["retried"])
            for code, n in (t.get("by_code") or {}).items():
                c["by_code"][code] = c["by_code"].get(code, 0) + int(n)
            if t.get("artifact") and job_id not in self.data["artifact_parts"]:
                self.data["artifact_parts"].append(job_id)
        if submitted_any:
            self.data["rounds"] = max(self.rounds, round_)
        self.data["pending_round"] = None

    # -- progress ----------------------------------------------------------------------------------------------
    def set_progress(self, **values: Any) -> dict[str, Any]:
        """The small dict ``make status`` prints; derived counts are filled in here."""
        progress = self.data.setdefault("progress", {})
        progress.update(values)
        running = [e for e in self.jobs.values() if e["state"] not in TERMINAL_STATES]
        progress.update(
            uploaded=self.counters["rows"],
            jobs_done=self.data["done_jobs"]["count"] + sum(1 for e in self.jobs.values()
                                                             if e["state"] in TERMINAL_STATES),
            jobs_open=len(running),
            failed=self.counters["failed"],
            retried=self.counters["retried"],
            rounds=self.rounds,
            phase=self.phase,
            at=time.time(),
        )
        return progress


def _jsonable(key: Any) -> Any:
    """Keys travel as JSON lists (tuples would come back as lists anyway)."""
    if isinstance(key, tuple):
        return list(key)
    return key


def read_progress(value: Any) -> dict[str, Any] | None:
    """The progress part of a stored ledger value (for ``make status``), or ``None``."""
    if isinstance(value, dict) and value.get("version") == LEDGER_VERSION:
        return {"label": value.get("label"), "phase": value.get("phase"), **(value.get("progress") or {})}
    return None
