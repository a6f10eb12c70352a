"""Alerts: the deadline callback's message, the optional webhook, and that a broken webhook never raises."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace
from typing import Any

import pytest

from sf_datacloud_sync import callbacks

CONTEXT = {"dag_run": {"dag_id": "datacloud_opportunity_sync", "dag_run_id": "scheduled__2026-11-28T02:00:00+00:00",
                       "state": "running"},
           "deadline": {"id": "x", "deadline_time": "2026-11-28 06:00:00+00:00"}}


@pytest.fixture
def webhook(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(callbacks.WEBHOOK_ENV, f"http://127.0.0.1:{server.server_port}/hook")
    yield received
    server.shutdown()


def test_deadline_message_names_the_run() -> None:
    text = callbacks.deadline_message(CONTEXT, 4)
    assert text.startswith("Airflow: datacloud_opportunity_sync run scheduled__2026-11-28T02:00:00+00:00 has not "
                           "finished 4 h after it was queued (deadline 2026-11-28 06:00:00+00:00, state running)")
    assert "make status" in text
    assert "run ?" in callbacks.deadline_message(None)


def test_deadline_callback_is_awaitable_and_posts(webhook: list[dict[str, Any]]) -> None:
    message = asyncio.run(callbacks.deadline_missed(context=CONTEXT, interval_hours=4))
    assert webhook == [{"text": message}]


def test_a_broken_webhook_is_logged_not_raised(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(callbacks.WEBHOOK_ENV, "http://127.0.0.1:9/nothing-listens-here")
    assert asyncio.run(callbacks.deadline_missed(context=CONTEXT)).startswith("Airflow:")
    callbacks.run_failed({"dag_run": SimpleNamespace(run_id="r1", dag_id="d"), "reason": "task_failure"})
    assert "could not post" in caplog.text


def test_run_failed_posts(webhook: list[dict[str, Any]]) -> None:
    callbacks.run_failed({"dag_run": SimpleNamespace(run_id="r1", dag_id="datacloud_opportunity_sync"),
                          "reason": "task_failure"})
    assert webhook[0]["text"].startswith("Airflow: datacloud_opportunity_sync run r1 failed (task_failure)")


def test_webhook_url_from_a_connection() -> None:
    conn = SimpleNamespace(host="hooks.example.com", schema="https", port=None, extra_dejson={"path": "/services/x"})
    assert callbacks._url_from_connection(conn) == "https://hooks.example.com/services/x"
    assert callbacks._url_from_connection(SimpleNamespace(host="https://h/x", schema=None, port=None,
                                                          extra_dejson={})) == "https://h/x"
