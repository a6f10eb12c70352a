"""Hooks, operators and triggers that sync Salesforce Data Cloud rows into Salesforce through Bulk API 2.0.

Lives under ``plugins/`` so that every Airflow component, the triggerer included, can import it.
"""

from __future__ import annotations

__version__ = "0.1.0"
