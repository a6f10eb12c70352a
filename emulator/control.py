"""The control plane under ``/__emulator/``: faults, statistics, profile and reset. Not a Salesforce path."""

from __future__ import annotations

from dataclasses import asdict, fields

from fastapi import APIRouter, Request
from starlette.responses import Response

from .auth import expire_all_sessions, org_of
from .errors import json_response, sf_error
from .profiles import get_profile
from .state import FaultRule

router = APIRouter(prefix="/__emulator")

_RULE_FIELDS = {f.name for f in fields(FaultRule)}
# Profile settings a fault plan may change while the org runs.
_PROFILE_KNOBS = ("lock_contention_rate", "session_lifetime_s", "rest_latency_ms", "job_dequeue_delay_s",
                  "dc_result_ttl_s", "dc_first_page_max_rows", "dc_page_max_bytes", "per_record_ms",
                  "org_worker_threads", "max_batch_retries", "batch_time_limit_s", "time_scale",
                  "fail_job_after_records")


@router.get("/health")
async def health(request: Request) -> Response:
    org = org_of(request)
    return json_response({"status": "ok", "profile": org.profile.name, "instance_url": org.instance_url})


@router.get("/stats")
async def stats(request: Request) -> Response:
    org = org_of(request)
    body = org.stats.snapshot()
    for module_stats in getattr(request.app.state, "extra_stats", []):
        body.update(module_stats(org))
    return json_response(body)


@router.post("/stats/reset")
async def reset_stats(request: Request) -> Response:
    org_of(request).stats.reset()
    return Response(status_code=204)


@router.get("/faults")
async def get_faults(request: Request) -> Response:
    org = org_of(request)
    return json_response({"rules": [asdict(r) for r in org.fault_rules],
                          **{k: getattr(org.profile, k) for k in _PROFILE_KNOBS}})


@router.put("/faults")
async def put_faults(request: Request) -> Response:
    """Replace the fault plan: ``{"rules": [{"path", "status", "rate", ...}], "lock_contention_rate": 0.2, ...}``."""
    org = org_of(request)
    body = await request.json()
    try:
        rules = [FaultRule(**{k: v for k, v in r.items() if k in _RULE_FIELDS}) for r in body.get("rules", [])]
    except TypeError as exc:
        return sf_error(400, "INVALID_FAULT", str(exc))
    org.fault_rules = rules
    knobs = {k: body[k] for k in _PROFILE_KNOBS if k in body}
    if knobs:
        org.profile = org.profile.with_overrides(**knobs)
    return await get_faults(request)


@router.delete("/faults")
async def clear_faults(request: Request) -> Response:
    org = org_of(request)
    org.fault_rules = []
    org.profile = org.profile.with_overrides(lock_contention_rate=0.0, fail_job_after_records=0)
    return Response(status_code=204)


@router.post("/sessions/expire")
async def expire_sessions(request: Request) -> Response:
    return json_response({"expired": expire_all_sessions(org_of(request))})


@router.put("/profile")
async def put_profile(request: Request) -> Response:
    """Switch profile: ``{"name": "realistic", "time_scale": 10, ...overrides}``."""
    org = org_of(request)
    body = await request.json()
    try:
        profile = get_profile(body.get("name", org.profile.name), float(body.get("time_scale", 1.0)))
    except ValueError as exc:
        return sf_error(400, "INVALID_PROFILE", str(exc))
    org.profile = profile.with_overrides(**{k: v for k, v in body.items() if k not in ("name",)})
    return json_response(org.profile.as_dict())


@router.get("/profile")
async def get_profile_route(request: Request) -> Response:
    return json_response(org_of(request).profile.as_dict())


@router.post("/reset")
async def reset(request: Request) -> Response:
    """Empty the org's Opportunities and Bulk jobs and zero the stats; Accounts and Data Cloud stay."""
    org = org_of(request)
    for hook in getattr(request.app.state, "reset_hooks", []):
        hook(org)
    with org.lock:
        conn = org.db()
        conn.execute('DELETE FROM "Opportunity"')
        conn.commit()
    org.stats.reset()
    org.fault_rules = []
    return Response(status_code=204)


@router.get("/connection")
async def connection(request: Request) -> Response:
    return json_response(org_of(request).connection_info())
