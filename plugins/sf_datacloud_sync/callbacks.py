"""Alerts: the deadline alert (the nightly run is late) and the run-failed callback.

Both always log. They also post a short JSON message (``{"text": ...}``, the shape Slack, Teams and Mattermost
incoming webhooks accept) when a webhook is configured, in this order:

* the environment variable ``SYNC_ALERT_WEBHOOK_URL``;
* the Airflow connection ``datacloud_sync_alerts`` (any type; ``host`` holds the full ``https://`` URL, or
  ``schema`` + ``host`` + ``port`` + the path in ``extra.path``).

A failing webhook is logged and never raised: an alert must not turn into a second incident. The deadline
callback runs in the **triggerer** (``AsyncCallback``), which is why it lives in ``plugins/`` and is async.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

ALERT_CONN_ID = "datacloud_sync_alerts"
WEBHOOK_ENV = "SYNC_ALERT_WEBHOOK_URL"


def _url_from_connection(conn: Any) -> str | None:
    host = (conn.host or "").strip()
    if not host:
        return None
    if "://" in host:
        return host
    scheme = conn.schema or "https"
    port = f":{conn.port}" if conn.port else ""
    path = (conn.extra_dejson or {}).get("path", "")
    return f"{scheme}://{host}{port}{path}"


async def _webhook_url_async() -> str | None:
    if url := os.environ.get(WEBHOOK_ENV):
        return url
    try:
        from airflow.sdk import BaseHook

        return _url_from_connection(await BaseHook.aget_connection(ALERT_CONN_ID))
    except Exception:  # not configured (the usual case) or unreachable: logging is the alert then
        return None


def _webhook_url() -> str | None:
    if url := os.environ.get(WEBHOOK_ENV):
        return url
    try:
        from airflow.sdk import BaseHook

        return _url_from_connection(BaseHook.get_connection(ALERT_CONN_ID))
    except Exception:
        return None


def deadline_message(context: dict[str, Any] | None, interval_hours: float | None = None) -> str:
    """The alert text from the small context the scheduler hands deadline callbacks (``dag_run``, ``deadline``)."""
    context = context or {}
    run = context.get("dag_run") or {}
    deadline = context.get("deadline") or {}
    late = f"{interval_hours:g} h after it was queued " if interval_hours else ""
    return (f"Airflow: {run.get('dag_id', 'datacloud_opportunity_sync')} run {run.get('dag_run_id') or run.get('run_id', '?')} "
            f"has not finished {late}(deadline {deadline.get('deadline_time', '?')}, state {run.get('state', '?')}). "
            f"Check the partitions still running or failed: `make status` or the Grid view.")


async def deadline_missed(context: dict[str, Any] | None = None, interval_hours: float | None = None,
                          **_: Any) -> str:
    """``AsyncCallback`` of the DAG's deadline alert: log, and post to the alert webhook when one is configured."""
    message = deadline_message(context, interval_hours)
    log.warning("%s", message)
    url = await _webhook_url_async()
    if url:
        try:
            import httpx

            async with httpx.AsyncClient(timeout=10) as client:
                (await client.post(url, json={"text": message})).raise_for_status()
        except Exception:
            log.exception("could not post the deadline alert to the webhook")
    return message


def run_failed(context: dict[str, Any]) -> None:
    """DAG ``on_failure_callback``: one line naming the run and the failed tasks, logged and posted."""
    dag_run = context.get("dag_run")
    run_id = getattr(dag_run, "run_id", "?")
    dag_id = getattr(dag_run, "dag_id", "datacloud_opportunity_sync")
    reason = context.get("reason") or ""
    message = (f"Airflow: {dag_id} run {run_id} failed{f' ({reason})' if reason else ''}. The verify task's log has "
               f"the reconciliation table; failed rows are in the artifacts it lists.")
    log.error("%s", message)
    url = _webhook_url()
    if url:
        try:
            import httpx

            httpx.post(url, json={"text": message}, timeout=10).raise_for_status()
        except Exception:
            log.exception("could not post the failure alert to the webhook")
