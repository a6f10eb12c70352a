"""The sync's settings file (``include/sync_config.yaml``), loaded and validated with errors that name the setting."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "include" / "sync_config.yaml"
_IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_SF_FIELD = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)?$")


#: Records per internal batch: Bulk API 2.0 cuts a job's data into batches of this many and runs them side by side.
BULK_BATCH_RECORDS = 10_000


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names it."""


@dataclass(frozen=True)
class LoadSettings:
    max_records_per_job: int = 100_000
    max_bytes_per_job: int = 100_000_000
    line_ending: str = "LF"
    transient_error_codes: tuple[str, ...] = ("UNABLE_TO_LOCK_ROW", "API_TEMPORARILY_UNAVAILABLE", "UNKNOWN_EXCEPTION")
    transient_retry_budget: int = 5
    transient_backoff_s: float = 5.0
    poll_interval_s: float = 2.0
    poll_max_interval_s: float = 30.0
    job_timeout_s: float = 21_600.0
    min_defer_s: float = 10.0
    wait_before_defer_s: float = 5.0
    serial_job_records: int = 10_000  # a serial partition's jobs: one internal batch each


@dataclass(frozen=True)
class SyncConfig:
    salesforce_conn_id: str
    dmo: str
    key_column: str
    account_column: str
    dataspace: str
    target_object: str
    external_id_field: str
    mapping: dict[str, str]
    load: LoadSettings = field(default_factory=LoadSettings)
    artifacts_base_url: str = ""
    pool_name: str = "salesforce_bulk"
    pool_slots: int = 16
    pool_description: str = ""
    deadline_hours: float = 4.0

    @property
    def source_columns(self) -> list[str]:
        return list(self.mapping)

    @property
    def target_fields(self) -> list[str]:
        return list(self.mapping.values())

    def artifacts_url(self) -> str:
        """Where failure artifacts go: env ``SYNC_ARTIFACTS_URL``, the file's setting, or ``$AIRFLOW_HOME``."""
        url = os.environ.get("SYNC_ARTIFACTS_URL") or self.artifacts_base_url
        if url:
            return url
        home = os.environ.get("AIRFLOW_HOME", str(Path.home() / "airflow"))
        return f"file://{Path(home).resolve()}/sync_artifacts"


def _require(section: dict[str, Any], key: str, where: str) -> Any:
    if key not in section or section[key] in (None, ""):
        raise ConfigError(f"setting '{where}{key}' is missing")
    return section[key]


def _identifier(value: Any, name: str, pattern: re.Pattern[str] = _IDENTIFIER) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise ConfigError(f"setting '{name}' must be an API name (letters, digits, underscores), got {value!r}")
    return value


def parse_config(raw: dict[str, Any]) -> SyncConfig:
    """Validate a settings mapping; raise :class:`ConfigError` naming the first bad setting."""
    if not isinstance(raw, dict):
        raise ConfigError("the settings file must be a mapping")
    source = _require(raw, "source", "")
    target = _require(raw, "target", "")
    mapping = _require(raw, "mapping", "")
    if not isinstance(mapping, dict) or not mapping:
        raise ConfigError("setting 'mapping' must map Data Cloud columns to Salesforce fields")
    for column, sf_field in mapping.items():
        _identifier(column, f"mapping.{column}")
        _identifier(sf_field, f"mapping.{column}", _SF_FIELD)
    key_column = _identifier(_require(source, "key_column", "source."), "source.key_column")
    account_column = _identifier(_require(source, "account_column", "source."), "source.account_column")
    external_id_field = _identifier(_require(target, "external_id_field", "target."), "target.external_id_field")
    if mapping.get(key_column) != external_id_field:
        raise ConfigError(f"setting 'mapping.{key_column}' must map the key column to target.external_id_field "
                          f"({external_id_field})")
    if account_column not in mapping:
        raise ConfigError(f"setting 'source.account_column' ({account_column}) must be one of the mapped columns")
    load_raw = raw.get("load") or {}
    defaults = LoadSettings()
    try:
        load = LoadSettings(
            max_records_per_job=int(load_raw.get("max_records_per_job", defaults.max_records_per_job)),
            max_bytes_per_job=int(load_raw.get("max_bytes_per_job", defaults.max_bytes_per_job)),
            line_ending=str(load_raw.get("line_ending", defaults.line_ending)),
            transient_error_codes=tuple(load_raw.get("transient_error_codes", defaults.transient_error_codes)),
            transient_retry_budget=int(load_raw.get("transient_retry_budget", defaults.transient_retry_budget)),
            transient_backoff_s=float(load_raw.get("transient_backoff_s", defaults.transient_backoff_s)),
            poll_interval_s=float(load_raw.get("poll_interval_s", defaults.poll_interval_s)),
            poll_max_interval_s=float(load_raw.get("poll_max_interval_s", defaults.poll_max_interval_s)),
            job_timeout_s=float(load_raw.get("job_timeout_s", defaults.job_timeout_s)),
            # SYNC_MIN_DEFER_S lets in-process test runs (dag.test, which has no scheduler race) skip the wait.
            min_defer_s=float(os.environ.get("SYNC_MIN_DEFER_S") or load_raw.get("min_defer_s", defaults.min_defer_s)),
            wait_before_defer_s=float(load_raw.get("wait_before_defer_s", defaults.wait_before_defer_s)),
            serial_job_records=int(load_raw.get("serial_job_records", defaults.serial_job_records)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting 'load' has a value of the wrong type: {exc}") from None
    if not 1 <= load.max_records_per_job <= 150_000_000:
        raise ConfigError("setting 'load.max_records_per_job' must be a positive number of records")
    if not 1_000 <= load.max_bytes_per_job <= 100_000_000:
        raise ConfigError("setting 'load.max_bytes_per_job' must be at most 100000000 (Bulk API 2.0's 100 MB)")
    if not 1 <= load.serial_job_records <= BULK_BATCH_RECORDS:
        raise ConfigError("setting 'load.serial_job_records' must be 1..10000 (one Bulk API internal batch)")
    if load.line_ending not in ("LF", "CRLF"):
        raise ConfigError("setting 'load.line_ending' must be LF or CRLF")
    pool = raw.get("pool") or {}
    artifacts = raw.get("artifacts") or {}
    return SyncConfig(
        salesforce_conn_id=str(raw.get("salesforce_conn_id") or "salesforce_default"),
        dmo=_identifier(_require(source, "dmo", "source."), "source.dmo"),
        key_column=key_column,
        account_column=account_column,
        dataspace=str(source.get("dataspace") or "default"),
        target_object=_identifier(_require(target, "object", "target."), "target.object"),
        external_id_field=external_id_field,
        mapping=dict(mapping),
        load=load,
        artifacts_base_url=str(artifacts.get("base_url") or ""),
        pool_name=str(pool.get("name") or "salesforce_bulk"),
        pool_slots=int(pool.get("slots") or 10),
        pool_description=str(pool.get("description") or ""),
        deadline_hours=float(raw.get("deadline_hours") or 4),
    )


def load_config(path: str | os.PathLike[str] | None = None) -> SyncConfig:
    """Read and validate the settings file (env ``SYNC_CONFIG_PATH`` overrides the default location)."""
    import yaml

    config_path = Path(path or os.environ.get("SYNC_CONFIG_PATH") or DEFAULT_CONFIG_PATH)
    try:
        raw = yaml.safe_load(config_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"settings file {config_path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"settings file {config_path} is not valid YAML: {exc}") from None
    return parse_config(raw)
