"""Start, stop and drive an emulator process from tests, benchmarks and the demo."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests


class EmulatorProcess:
    """``python -m emulator serve`` in a child process, bound to 127.0.0.1 on a free port."""

    def __init__(self, data_dir: Path, profile: str = "instant", port: int = 0, time_scale: float = 1.0,
                 log_path: Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.profile = profile
        self.port = port
        self.time_scale = time_scale
        self.log_path = log_path or self.data_dir / "emulator.log"
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}
        self._http = requests.Session()
        # REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE in the environment would override ``verify`` (requests merges the
        # environment over session settings); the control plane must trust the emulator's own CA.
        self._http.trust_env = False

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> EmulatorProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conn_file = self.data_dir / "connection.json"
        if conn_file.exists():
            conn_file.unlink()
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the child
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "emulator", "serve", "--data-dir", str(self.data_dir), "--port", str(self.port),
             "--profile", self.profile, "--time-scale", str(self.time_scale)],
            cwd=root, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(root)},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"emulator exited with {self.proc.returncode}; see {self.log_path}")
            if conn_file.exists():
                try:
                    self.info = json.loads(conn_file.read_text())
                    self._http.verify = self.info["ca_bundle"]
                    if self._http.get(self.control_url + "/health", timeout=2).ok:
                        # Later restarts reuse the port so clients keep their instance URL.
                        self.port = int(self.info["instance_url"].rsplit(":", 1)[1])
                        return self
                except (ValueError, KeyError, requests.RequestException):
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"emulator did not become ready in {timeout}s; see {self.log_path}")

    def stop(self, kill: bool = False) -> None:
        # An idle keep-alive TLS connection holds uvicorn's graceful shutdown until the client goes away; sockets
        # of failed readiness probes can linger in reference cycles (traceback -> frame), hence the collect.
        self._http.close()
        gc.collect()
        if self.proc and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- convenience ------------------------------------------------------------------------------------------
    @property
    def instance_url(self) -> str:
        return self.info["instance_url"]

    @property
    def control_url(self) -> str:
        return self.info["control_url"]

    @property
    def ca_bundle(self) -> str:
        return self.info["ca_bundle"]

    def control(self, method: str, path: str, body: Any = None) -> Any:
        resp = self._http.request(method, f"{self.control_url}/{path.lstrip('/')}", json=body, timeout=60)
        resp.raise_for_status()
        return resp.json() if resp.content else None

    def stats(self) -> dict[str, Any]:
        return self.control("GET", "stats")

    def set_faults(self, rules: list[dict[str, Any]] | None = None, **knobs: Any) -> Any:
        return self.control("PUT", "faults", {"rules": rules or [], **knobs})

    def clear_faults(self) -> None:
        self.control("DELETE", "faults")

    def reset(self) -> None:
        self.control("POST", "reset")

    def access_token(self) -> str:
        """A core session via client credentials, for raw-HTTP tests."""
        resp = self._http.post(f"{self.instance_url}/services/oauth2/token",
                               data={"grant_type": "client_credentials"},
                               auth=(self.info["client_id"], self.info["client_secret"]), timeout=30)
        resp.raise_for_status()
        return resp.json()["access_token"]

    def seed(self, records: int, accounts: int | None = None, random_seed: int = 42, bad_rows: int = 0,
             null_keys: int = 0) -> str:
        cmd = [sys.executable, "-m", "emulator", "seed", "--data-dir", str(self.data_dir), "--records", str(records),
               "--random-seed", str(random_seed), "--bad-rows", str(bad_rows), "--null-keys", str(null_keys)]
        if accounts is not None:
            cmd += ["--accounts", str(accounts)]
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(root)})
        return out.stdout
