"""
### Data Cloud → Salesforce Opportunity sync

Every night at **02:00 UTC** this DAG upserts the rows of the Data Cloud object `Opportunity_Sync__dlm` into
Salesforce **Opportunities** on the external id `ExternalId__c`, through Bulk API 2.0. Settings (objects, column →
field mapping, artifact location, pool size) live in `include/sync_config.yaml` and are read when the tasks run.

| task | what it does |
|---|---|
| `discover` | Checks everything **before writing anything** — the Salesforce connection, that the Data Cloud object and every mapped column exist, that every mapped Opportunity field exists and is createable/updateable, that `ExternalId__c` is an External ID and `Account.ExternalId__c` resolves — then splits the rows into balanced partitions from the real key distribution (one SQL pass). |
| `load_partition` (one per partition) | Streams its key range out of Data Cloud into Bulk API 2.0 upsert jobs, retries rows that failed for transient reasons (`UNABLE_TO_LOCK_ROW`, ...) in follow-up jobs, writes rows that failed for good to a CSV artifact. Keeps a job ledger, so a retry or a clear **resumes** where it stopped and never uploads a row twice. Shown as `P03 [OPP-0420…, OPP-0630)` in the Grid view. |
| `verify` | Runs even when partitions failed. Fails the run unless every partition reported, every partition accounts for each row (`rows = upserted + failed`), and Salesforce's count of Opportunities with an external id equals Data Cloud's rows with an external id minus the permanently failed ones (± `tolerance`). Logs a table per partition. |

#### Params (Trigger DAG w/ config)
* **partitions** (15, 1–1023): partitions loaded in parallel; more partitions = more parallel Bulk jobs (the pool
  caps them). With `account` each partition is one Bulk job of at most 10,000 rows at a time, so 15 matches an
  org's batch threads (Salesforce publishes 15–20).
* **target_partition_rows** (empty): when set, the partition count is `rows / target_partition_rows` instead.
* **partition_key** (`account`): `account` keeps all Opportunities of one Account in the same partition and loads
  each partition one job (one 10,000-row internal batch) at a time, so two batches never lock the same Account row
  (`UNABLE_TO_LOCK_ROW`); Accounts with more than 10,000 Opportunities (Salesforce's data skew) are packed into
  lanes of their own, largest first, and every partition is sized in whole batches. `external_id` gives even key
  ranges loaded in large parallel jobs (fewer API requests) but lets batches contend for the same Accounts.
* **partitions_per_task** (5): with `account`, one task loads this many partitions (similar sizes together), each Bulk
  job holding one 10,000-row batch of each, which the org runs side by side: about that many times fewer Bulk API
  requests at the same speed (2M rows: 41 jobs instead of 201). The task is the unit a clear restarts; its ledger
  resumes each partition after its own last committed row. 1: one task per partition.
* **max_records_per_job** (100,000): rows per Bulk job (Salesforce splits jobs into 10,000-row batches); with
  `account` a job holds at most `load.serial_job_records` (10,000) rows of each partition of its task.
* **dry_run** (false): run `discover` and each partition's read, write nothing to Salesforce.
* **tolerance** (0): allowed difference between Salesforce's and Data Cloud's counts in `verify` (e.g. for
  Opportunities with an external id that are created outside this sync).

#### Restart one partition
Grid view → `load_partition` → pick the map index (its label shows the key range, or `P01 5 lanes ACC-…, …`
for a group of partitions, which restarts together) → **Clear** with **Downstream** ticked (so `verify`
re-checks). It resumes from its ledger: jobs already at Salesforce are re-attached, not re-sent. **Mark failed**
stops a running partition and aborts its open Bulk jobs. From the CLI / REST:
`POST /api/v2/dags/datacloud_opportunity_sync/clearTaskInstances` with
`{"dag_run_id": "...", "task_ids": [["load_partition", 3]], "include_downstream": true, "dry_run": false}`.

#### Where failed rows are
One CSV per partition with failures: `<artifacts>/datacloud_opportunity_sync/<run_id>/<partition>_failed.csv`
(external id, error code, message, fields, the row as sent, Bulk job id). `<artifacts>` is `SYNC_ARTIFACTS_URL`,
else `artifacts.base_url` in the settings file, else `$AIRFLOW_HOME/sync_artifacts`. `verify`'s log lists them.

#### Operations
* Pool `salesforce_bulk` must exist, counting deferred tasks (a task in a missing pool is never scheduled):
  `airflow pools set salesforce_bulk 16 "Salesforce Bulk API 2.0 jobs" --include-deferred`.
* Deadline alert: if a run has not finished `SYNC_DEADLINE_HOURS` (default 4) hours after it was queued, the
  triggerer logs an alert and posts it to `SYNC_ALERT_WEBHOOK_URL` / connection `datacloud_sync_alerts` if set.
  The variable is read when the DAG is parsed (set it for the dag-processor); `0` turns the alert off, which
  `airflow dags test` needs on Airflow 3.3.2.
* A failed partition is retried 3 times, after 2 minutes and then twice as long each time (Airflow adds up to the
  same again as jitter; at most 30 min). `SYNC_LOAD_RETRY_DELAY_S` (read when the DAG is parsed) sets the first delay.
* Progress while running: `make status` (one line per partition: state, range, rows processed, failed, open jobs).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference, Param, TriggerRule, dag, task

from sf_datacloud_sync.callbacks import deadline_missed, run_failed
from sf_datacloud_sync.operators.load_partition import LoadPartitionOperator
from sf_datacloud_sync.setup import DEFAULT_POOL

DAG_ID = "datacloud_opportunity_sync"
# The parse-time knobs are environment variables (cheap to read, no file I/O while the DAG is parsed).
# SYNC_DEADLINE_HOURS=0 switches the deadline alert off: needed for `dag.test()` / `airflow dags test` on 3.3.2,
# which crash when a run with a deadline alert succeeds (they pass the alert itself where its database id belongs).
DEADLINE_HOURS = float(os.environ.get("SYNC_DEADLINE_HOURS", "4"))
# First retry delay of a partition (doubles per retry, capped at 30 min). The real-executor tests shorten it so that
# a killed attempt is retried in seconds; production keeps 2 minutes (time for a Salesforce outage to pass).
LOAD_RETRY_DELAY = timedelta(seconds=float(os.environ.get("SYNC_LOAD_RETRY_DELAY_S", "120")))
POOL = os.environ.get("SYNC_POOL", DEFAULT_POOL)
# Partitions of one run allowed to hold a worker slot or a Bulk job at once; the pool caps all runs together. With
# partition_key=account each partition keeps one job of one internal batch at Salesforce: 16 partitions keep an
# org's 15-20 batch threads busy.
MAX_PARALLEL_PARTITIONS = 16

PARAMS = {
    "partitions": Param(15, type="integer", minimum=1, maximum=1023, title="Partitions",
                        description="How many partitions to load in parallel (1-1023; a NULL-key bucket is added "
                                    "when needed, within Airflow's 1024 mapped tasks). With partition_key=account "
                                    "Accounts over 10,000 rows get lanes of their own, which count towards it."),
    "target_partition_rows": Param(None, type=["null", "integer"], minimum=1, title="Target rows per partition",
                                   description="Optional. When set, the number of partitions is the row count "
                                               "divided by this (ignores 'Partitions')."),
    "partition_key": Param("account", type="string", enum=["account", "external_id"], title="Partition key",
                           values_display={"account": "Account (no lock contention between partitions)",
                                           "external_id": "External ID (evenly sized partitions)"},
                           description="account: an Account's Opportunities stay in one partition, so parallel "
                                       "jobs do not lock the same Account. external_id: even ranges of the key."),
    "partitions_per_task": Param(5, type="integer", minimum=1, maximum=100, title="Partitions per task",
                                 description="partition_key=account: load this many partitions in one task, each "
                                             "Bulk job holding one 10,000-row batch of each (about that many times "
                                             "fewer Bulk API requests; a clear restarts the whole group). 1: one "
                                             "task and one single-batch job at a time per partition."),
    "max_records_per_job": Param(100_000, type="integer", minimum=1, maximum=150_000_000,
                                 title="Max records per Bulk job",
                                 description="Rows per Bulk API 2.0 job (Salesforce processes them in batches "
                                             "of 10,000)."),
    "dry_run": Param(False, type="boolean", title="Dry run",
                     description="Validate the setup, plan the partitions and read the rows; write nothing."),
    "tolerance": Param(0, type="integer", minimum=0, title="Count tolerance",
                       description="Allowed difference between Salesforce's and Data Cloud's counts in verify."),
}


@dag(
    dag_id=DAG_ID,
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["salesforce", "data-cloud", "bulk-api-2", "opportunity"],
    params=PARAMS,
    render_template_as_native_obj=True,  # "{{ params.dry_run }}" reaches the operator as a bool, not "False"
    default_args={
        "owner": "data-engineering",
        "retries": 3,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": 2.0,  # 1, 2, 4 min (jittered)
        "max_retry_delay": timedelta(minutes=30),
    },
    deadline=DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=timedelta(hours=DEADLINE_HOURS),
        callback=AsyncCallback(deadline_missed, kwargs={"interval_hours": DEADLINE_HOURS}),
        name="sync-late",
    ) if DEADLINE_HOURS > 0 else None,
    on_failure_callback=run_failed,
)
def datacloud_opportunity_sync() -> None:
    @task(execution_timeout=timedelta(minutes=30))
    def discover(params: dict[str, Any] | None = None, ti: Any = None) -> list[dict[str, Any]]:
        """Validate both ends, then plan balanced partitions (``sf_datacloud_sync.discover``)."""
        from sf_datacloud_sync.discover import run_discover

        return run_discover(params or {}, ti)

    @task(trigger_rule=TriggerRule.ALL_DONE, retries=2, execution_timeout=timedelta(minutes=15))
    def verify(params: dict[str, Any] | None = None, ti: Any = None) -> dict[str, Any]:
        """Reconcile partitions, Data Cloud and Salesforce; fail the run on any gap (``sf_datacloud_sync.verify``)."""
        from sf_datacloud_sync.verify import run_verify

        return run_verify(params or {}, ti)

    loaded = LoadPartitionOperator.partial(
        task_id="load_partition",
        pool=POOL,
        pool_slots=1,
        map_index_template="{{ task.partition_label }}",
        max_records_per_job="{{ params.max_records_per_job }}",
        dry_run="{{ params.dry_run }}",
        retries=3,
        retry_delay=LOAD_RETRY_DELAY,
        retry_exponential_backoff=2.0,
        max_retry_delay=timedelta(minutes=30),
        max_active_tis_per_dagrun=MAX_PARALLEL_PARTITIONS,
    ).expand_kwargs(discover())
    loaded >> verify()


datacloud_opportunity_sync()
