"""Airflow plugin of the Data Cloud → Opportunity sync: one listener, for the emergency stop.

Marking a ``load_partition`` task instance (or its DAG run) failed through the UI or the REST API makes the API
server abort the partition's Bulk jobs still open at Salesforce (``sf_datacloud_sync.stop.MarkedFailedListener``),
also when neither the operator's nor the trigger's ``on_kill`` can run. The API server therefore needs the
Salesforce connection and network access to Salesforce, like the workers and the triggerer.

The package itself stays out of Airflow's plugin scan (``plugins/.airflowignore``); only this file is loaded.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from sf_datacloud_sync.stop import MarkedFailedListener


class DatacloudSyncPlugin(AirflowPlugin):
    name = "sf_datacloud_sync"
    listeners = [MarkedFailedListener()]
