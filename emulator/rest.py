"""REST API: versions, resources, limits, describe, record retrieve, SOQL query/queryAll/queryMore, SOAP login.

Shapes follow ``shared/reference/salesforce_api.md`` §1-3 and §6. Helpers others may reuse:

* :func:`limit_info_header` / :func:`rest_response` add ``Sforce-Limit-Info: api-usage=N/M`` to a response;
* :func:`api_usage` and :func:`check_api_limit` read and enforce ``DailyApiRequests``;
* :func:`resolve_version` turns the ``vXX.X`` path segment into ``"XX.X"`` (``None``: answer 404 NOT_FOUND).
"""

from __future__ import annotations

import hashlib
import itertools
import re
import secrets
import threading
import time
import weakref
from array import array
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from . import soql
from .auth import Session, issue_token, org_of, require_session
from .errors import json_response, not_found, sf_error
from .ids import case_safe, make_id
from .schema import OBJECTS, Field, SObject, get_object
from .state import Credentials, Org

router = APIRouter()

# -- versions -------------------------------------------------------------------------------------------------------
# 21.0-30.0 were retired in Summer '25; 66.0 (Spring '26) is the newest generally available release.
FIRST_VERSION = 31
LAST_VERSION = 66
VERSIONS = [f"{v}.0" for v in range(FIRST_VERSION, LAST_VERSION + 1)]
SOAP_LOGIN_LAST_VERSION = 64  # "SOAP API login() not available in API version 65.0 onwards"


def release_label(major: int) -> str:
    """``31 -> "Summer '14"``: three releases a year, Winter named after the following year."""
    n = major - 31
    season = ("Summer", "Winter", "Spring")[n % 3]
    return f"{season} '{14 + (n + 2) // 3:02d}"


def resolve_version(segment: str) -> str | None:
    """``"v62.0"`` or ``"latest"`` → ``"62.0"``; ``None`` for anything else (answer 404 NOT_FOUND)."""
    if segment == "latest":
        return VERSIONS[-1]
    m = re.fullmatch(r"v(\d+)\.0", segment)
    if m is None or not FIRST_VERSION <= int(m.group(1)) <= LAST_VERSION:
        return None
    return f"{m.group(1)}.0"


# -- API usage ------------------------------------------------------------------------------------------------------
DAILY_API_REQUESTS_MAX = 100_000  # Enterprise Edition base allocation
DAILY_BULK_API_BATCHES_MAX = 15_000
DAILY_BULK_V2_QUERY_JOBS_MAX = 10_000
DATA_STORAGE_MB_MAX = 10_240
RECORD_STORAGE_BYTES = 2048  # Salesforce counts most records as 2 KB of data storage
# Paths whose calls count against DailyApiRequests (login, OAuth and the versions list do not).
_COUNTED_PREFIXES = ("/services/data/v", "/services/async/", "/services/apexrest/")


def api_usage(org: Org) -> tuple[int, int]:
    """``(used, max)`` of ``DailyApiRequests``; ``used`` includes the request being answered."""
    requests = dict(org.stats.requests)  # a C-level copy: safe against concurrent increments
    used = sum(n for key, n in requests.items() if key.partition(" ")[2].startswith(_COUNTED_PREFIXES))
    return used + 1, int(getattr(org, "daily_api_requests_max", DAILY_API_REQUESTS_MAX))


def limit_info_header(org: Org) -> dict[str, str]:
    used, total = api_usage(org)
    return {"Sforce-Limit-Info": f"api-usage={used}/{total}"}


def rest_response(org: Org, body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response carrying ``Sforce-Limit-Info`` as every real REST response does."""
    return json_response(body, status, {**limit_info_header(org), **(headers or {})})


def rest_error(org: Org, status: int, code: str, message: str, fields: list[str] | None = None) -> Response:
    return sf_error(status, code, message, fields, headers=limit_info_header(org))


def check_api_limit(org: Org) -> Response | None:
    """403 REQUEST_LIMIT_EXCEEDED once the daily allocation is spent, else ``None``."""
    used, total = api_usage(org)
    if used > total:
        return sf_error(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
    return None


@dataclass(frozen=True)
class Call:
    org: Org
    version: str  # "62.0"
    session: Session


async def _enter(request: Request, version: str) -> Call | Response:
    """Common prologue: version (404 if unknown), session (401), profile latency, daily limit (403)."""
    org = org_of(request)
    v = resolve_version(version)
    if v is None:
        return not_found()
    session = require_session(request)
    await org.profile.rest_delay()
    refused = check_api_limit(org)
    if refused is not None:
        return refused
    return Call(org, v, session)


def on_startup(org: Org) -> None:
    soql.ensure_indexes(org.db())


def on_reset(org: Org) -> None:
    """``POST /__emulator/reset`` empties Opportunities: open query locators would point at deleted rows."""
    cursor_store(org).clear()


def extra_stats(org: Org) -> dict[str, Any]:
    return {"rest_open_query_cursors": len(cursor_store(org))}


# -- versions and resources -----------------------------------------------------------------------------------------
@router.get("/services/data")
@router.get("/services/data/")
async def versions(request: Request) -> Response:
    await org_of(request).profile.rest_delay()
    body = [{"label": release_label(int(v.split(".")[0])), "url": f"/services/data/v{v}", "version": v}
            for v in VERSIONS]
    return json_response(body)


@router.get("/services/data/{version}")
@router.get("/services/data/{version}/")
async def resources(version: str, request: Request) -> Response:
    call = await _enter(request, version)
    if isinstance(call, Response):
        return call
    org, v = call.org, call.version
    base = f"/services/data/v{v}"
    return rest_response(org, {
        "identity": org.identity_url(),
        "limits": f"{base}/limits",
        "query": f"{base}/query",
        "queryAll": f"{base}/queryAll",
        "sobjects": f"{base}/sobjects",
    })


# -- limits ---------------------------------------------------------------------------------------------------------
# Allocations that nothing in this org consumes, from the documented example (§3.4).
_STATIC_LIMITS: dict[str, int] = {
    "ActiveScratchOrgs": 3, "AnalyticsExternalDataSizeMB": 40_960, "ConcurrentAsyncGetReportInstances": 200,
    "ConcurrentEinsteinDataInsightsStoryCreation": 5, "ConcurrentEinsteinDiscoveryStoryCreation": 2,
    "ConcurrentSyncReportRuns": 20, "DailyAnalyticsDataflowJobExecutions": 60,
    "DailyAnalyticsUploadedFilesSizeMB": 51_200, "DailyFunctionsApiCallLimit": 235_000,
    "DailyAsyncApexExecutions": 250_000, "DailyAsyncApexTests": 500, "DailyBulkV2QueryFileStorageMB": 976_562,
    "DailyDeliveredPlatformEvents": 10_000, "DailyDurableGenericStreamingApiEvents": 10_000,
    "DailyDurableStreamingApiEvents": 10_000, "DailyEinsteinDataInsightsStoryCreation": 1_000,
    "DailyEinsteinDiscoveryPredictAPICalls": 50_000, "DailyEinsteinDiscoveryPredictionsByCDC": 500_000,
    "DailyEinsteinDiscoveryStoryCreation": 100, "DailyGenericStreamingApiEvents": 10_000, "DailyScratchOrgs": 6,
    "DailyStandardVolumePlatformEvents": 10_000, "DailyStreamingApiEvents": 10_000, "DailyWorkflowEmails": 1_000,
    "DurableStreamingApiConcurrentClients": 20, "FileStorageMB": 1_024, "HourlyAsyncReportRuns": 1_200,
    "HourlyDashboardRefreshes": 200, "HourlyDashboardResults": 5_000, "HourlyDashboardStatuses": 999_999_999,
    "HourlyLongTermIdMapping": 100_000, "HourlyManagedContentPublicRequests": 50_000, "HourlyODataCallout": 20_000,
    "HourlyPublishedPlatformEvents": 50_000, "HourlyPublishedStandardVolumePlatformEvents": 100_000,
    "HourlyShortTermIdMapping": 100_000, "HourlySyncReportRuns": 500, "HourlyTimeBasedWorkflow": 50,
    "MassEmail": 10, "MonthlyEinsteinDiscoveryStoryCreation": 500, "Package2VersionCreates": 6,
    "Package2VersionCreatesWithoutValidation": 500, "PlatformEventTriggersWithParallelProcessing": 5,
    "PrivateConnectOutboundCalloutHourlyLimitMB": 0, "SingleEmail": 15, "StreamingApiConcurrentClients": 20,
}


def _record_counts(org: Org, names: list[str]) -> dict[str, int]:
    conn = org.db()
    return {name: int(conn.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0]) for name in names}


def limits_body(org: Org, record_count: int) -> dict[str, Any]:
    counters = dict(org.stats.counters)
    used, total = api_usage(org)

    def pair(maximum: int, consumed: int = 0) -> dict[str, int]:
        return {"Max": maximum, "Remaining": max(0, maximum - consumed)}

    storage_mb = record_count * RECORD_STORAGE_BYTES // (1024 * 1024)
    moving = {
        "DailyApiRequests": pair(total, used),
        "DailyBulkApiBatches": pair(DAILY_BULK_API_BATCHES_MAX, counters.get("bulk_batches", 0)),
        # The query module counts "bulk_query_jobs_created"; "bulk_query_jobs" is the agreed name. Either moves it.
        "DailyBulkV2QueryJobs": pair(DAILY_BULK_V2_QUERY_JOBS_MAX, max(counters.get("bulk_query_jobs", 0),
                                                                       counters.get("bulk_query_jobs_created", 0))),
        "DataStorageMB": pair(DATA_STORAGE_MB_MAX, storage_mb),
        "PermissionSets": {**pair(1_500, 1), "CreateCustom": pair(1_000, 1)},
    }
    body = {**{k: pair(v) for k, v in _STATIC_LIMITS.items()}, **moving}
    return dict(sorted(body.items()))


@router.get("/services/data/{version}/limits")
@router.get("/services/data/{version}/limits/")
async def limits(version: str, request: Request) -> Response:
    call = await _enter(request, version)
    if isinstance(call, Response):
        return call
    org = call.org
    counts = await run_in_threadpool(_record_counts, org, [n for n in OBJECTS if n not in ("Organization",)])
    return rest_response(org, limits_body(org, sum(counts.values())))


@router.get("/services/data/{version}/limits/recordCount")
async def record_count(version: str, request: Request) -> Response:
    call = await _enter(request, version)
    if isinstance(call, Response):
        return call
    org = call.org
    wanted = request.query_params.get("sObjects")
    names = [o.name for o in (get_object(n) for n in (wanted.split(",") if wanted else OBJECTS)) if o is not None]
    counts = await run_in_threadpool(_record_counts, org, names)
    return rest_response(org, {"sObjects": [{"count": n, "name": name} for name, n in counts.items()]})


# -- describe -------------------------------------------------------------------------------------------------------
_SOAP_TYPES = {"id": "tns:ID", "reference": "tns:ID", "boolean": "xsd:boolean", "currency": "xsd:double",
               "percent": "xsd:double", "double": "xsd:double", "int": "xsd:int", "date": "xsd:date",
               "datetime": "xsd:dateTime"}
_NOT_GROUPABLE = frozenset({"textarea", "currency", "percent", "double", "datetime"})
_SYSTEM_FIELDS = frozenset({"Id", "IsDeleted", "CreatedDate", "CreatedById", "LastModifiedDate", "LastModifiedById",
                            "SystemModstamp"})


def describe_field(f: Field) -> dict[str, Any]:
    """The 57 keys of a describe field result (§3.5)."""
    t = f.type
    text = t in soql.TEXT_TYPES
    length = f.length if text or t in soql.ID_TYPES else 0
    long_text = t == "textarea" and f.length > 255
    numeric = t in ("currency", "percent", "double")
    return {
        "aggregatable": t != "boolean" and not long_text,
        "aiPredictionField": False,
        "autoNumber": False,
        "byteLength": length * 3 if text else (18 if t in soql.ID_TYPES else 0),
        "calculated": f.calculated,
        "calculatedFormula": None,
        "cascadeDelete": False,
        "caseSensitive": False,
        "compoundFieldName": None,
        "controllerName": None,
        "createable": f.createable,
        "custom": f.name.endswith("__c"),
        "defaultValue": False if t == "boolean" else None,
        "defaultValueFormula": None,
        "defaultedOnCreate": f.defaulted_on_create,
        "dependentPicklist": False,
        "deprecatedAndHidden": False,
        "digits": 9 if t == "int" else 0,
        "displayLocationInDecimal": False,
        "encrypted": False,
        "externalId": f.external_id,
        "extraTypeInfo": "plaintextarea" if t == "textarea" else None,
        "filterable": not long_text,
        "filteredLookupInfo": None,
        "formulaTreatNullNumberAsZero": False,
        "groupable": t not in _NOT_GROUPABLE,
        "highScaleNumber": False,
        "htmlFormatted": False,
        "idLookup": f.id_lookup,
        "inlineHelpText": None,
        "label": f.label,
        "length": length,
        "mask": None,
        "maskType": None,
        "name": f.name,
        "nameField": f.name == "Name",
        "namePointing": False,
        "nillable": f.nillable,
        "permissionable": f.nillable and f.updateable and f.name not in _SYSTEM_FIELDS,
        "picklistValues": [{"active": True, "defaultValue": False, "label": v, "validFor": None, "value": v}
                           for v in f.picklist],
        "polymorphicForeignKey": False,
        "precision": f.precision if numeric else 0,
        "queryByDistance": False,
        "referenceTargetField": None,
        "referenceTo": list(f.reference_to),
        "relationshipName": f.relationship_name,
        "relationshipOrder": None,
        "restrictedDelete": False,
        "restrictedPicklist": f.restricted,
        "scale": f.scale if numeric else 0,
        "searchPrefilterable": t == "reference",
        "soapType": _SOAP_TYPES.get(t, "xsd:string"),
        "sortable": not long_text,
        "type": t,
        "unique": f.unique,
        "updateable": f.updateable,
        "writeRequiresMasterRead": False,
    }


def _object_urls(obj: SObject, v: str, instance_url: str | None = None) -> dict[str, str]:
    base = f"/services/data/v{v}/sobjects/{obj.name}"
    urls = {
        "compactLayouts": f"{base}/describe/compactLayouts",
        "rowTemplate": f"{base}/{{ID}}",
        "approvalLayouts": f"{base}/describe/approvalLayouts",
    }
    if instance_url:
        urls["uiDetailTemplate"] = f"{instance_url}/{{ID}}"
        urls["uiEditTemplate"] = f"{instance_url}/{{ID}}/e"
    urls["listviews"] = f"{base}/listviews"
    urls["describe"] = f"{base}/describe"
    if instance_url:
        urls["uiNewRecord"] = f"{instance_url}/{obj.key_prefix}/e"
    urls["quickActions"] = f"{base}/quickActions"
    urls["layouts"] = f"{base}/describe/layouts"
    urls["sobject"] = base
    return urls


def _object_flags(obj: SObject) -> dict[str, Any]:
    data_object = obj.name in ("Account", "Opportunity")
    return {
        "activateable": False,
        "associateEntityType": None,
        "associateParentEntity": None,
        "createable": obj.createable,
        "custom": obj.name.endswith("__c"),
        "customSetting": False,
        "deepCloneable": False,
        "deletable": data_object,
        "deprecatedAndHidden": False,
        "feedEnabled": data_object,
        "hasSubtypes": False,
        "isInterface": False,
        "isSubtype": False,
        "keyPrefix": obj.key_prefix,
        "label": obj.label,
        "labelPlural": obj.label_plural,
        "layoutable": obj.name != "Organization",
        "mergeable": obj.name == "Account",
        "mruEnabled": obj.name != "Organization",
        "name": obj.name,
        "queryable": True,
        "replicateable": True,
        "retrieveable": True,
        "searchable": obj.name != "Organization",
        "triggerable": obj.name != "Organization",
        "undeletable": data_object,
        "updateable": obj.name != "Organization",
    }


def global_describe_entry(obj: SObject, v: str) -> dict[str, Any]:
    return {**_object_flags(obj), "urls": _object_urls(obj, v)}


def _child_relationships(obj: SObject) -> list[dict[str, Any]]:
    out = []
    for child in OBJECTS.values():
        for f in child.fields:
            if obj.name in f.reference_to:
                # Only a child's "main" lookup carries a plural relationship name (Account.Opportunities).
                named = f.relationship_name == obj.name
                out.append({
                    "cascadeDelete": named,
                    "childSObject": child.name,
                    "deprecatedAndHidden": False,
                    "field": f.name,
                    "junctionIdListNames": [],
                    "junctionReferenceTo": [],
                    "relationshipName": child.label_plural if named else None,
                    "restrictedDelete": False,
                })
    return out


def describe_object(obj: SObject, v: str, instance_url: str) -> dict[str, Any]:
    flags = _object_flags(obj)
    master = "012000000000000AAA"
    body: dict[str, Any] = {
        "actionOverrides": [],
        "childRelationships": _child_relationships(obj),
        "compactLayoutable": flags["layoutable"],
        "defaultImplementation": None,
        "extendedBy": None,
        "extendsInterfaces": None,
        "fields": [describe_field(f) for f in obj.fields],
        "implementedBy": None,
        "implementsInterfaces": None,
        "listviewable": None,
        "lookupLayoutable": None,
        "namedLayoutInfos": [],
        "networkScopeFieldName": None,
        "recordTypeInfos": [{
            "active": True, "available": True, "defaultRecordTypeMapping": True, "developerName": "Master",
            "master": True, "name": "Master", "recordTypeId": master,
            "urls": {"layout": f"/services/data/v{v}/sobjects/{obj.name}/describe/layouts/{master}"},
        }] if flags["layoutable"] else [],
        "searchLayoutable": flags["searchable"],
        "sobjectDescribeOption": "FULL",
        "supportedScopes": [{"label": f"All {obj.label_plural.lower()}", "name": "everything"}],
        "urls": _object_urls(obj, v, instance_url),
        **flags,
    }
    return dict(sorted(body.items()))


_DESCRIBE_CACHE: dict[tuple[str, str, str], bytes] = {}


@router.get("/services/data/{version}/sobjects")
@router.get("/services/data/{version}/sobjects/")
async def global_describe(version: str, request: Request) -> Response:
    call = await _enter(request, version)
    if isinstance(call, Response):
        return call
    org, v = call.org, call.version
    return rest_response(org, {"encoding": "UTF-8", "maxBatchSize": 200,
                               "sobjects": [global_describe_entry(o, v) for o in OBJECTS.values()]})


@router.get("/services/data/{version}/sobjects/{sobject}/describe")
@router.get("/services/data/{version}/sobjects/{sobject}/describe/")
async def sobject_describe(version: str, sobject: str, request: Request) -> Response:
    call = await _enter(request, version)
    if isinstance(call, Response):
        return call
    org, v = call.org, call.version
    obj = get_object(sobject)
    if obj is None:
        return rest_error(org, 404, "NOT_FOUND", "The requested resource does not exist")
    key = (obj.name, v, org.instance_url)
    if key not in _DESCRIBE_CACHE:
        _DESCRIBE_CACHE[key] = json_response(describe_object(obj, v, org.instance_url)).body
    return Response(_DESCRIBE_CACHE[key], media_type="application/json;charset=UTF-8",
                    headers=limit_info_header(org))


@router.get("/services/data/{version}/sobjects/{sobject}")
@router.get("/services/data/{version}/sobjects/{sobject}/")
async def sobject_basic_info(version: str, sobject: str, request: Request) -> Response:
    call = await _enter(request, version)
    if isinstance(call, Response):
        return call
    org, v = call.org, call.version
    obj = get_object(sobject)
    if obj is None:
        return rest_error(org, 404, "NOT_FOUND", "The requested resource does not exist")
    return rest_response(org, {"objectDescribe": global_describe_entry(obj, v), "recentItems": []})


# -- record retrieve ------------------------------------------------------------------------------------------------
_ID_SHAPE = re.compile(r"[a-zA-Z0-9]{15}(?:[a-zA-Z0-9]{3})?")


def _select_fields(org: Org, obj: SObject, raw: str | None) -> list[Field] | Response:
    if raw is None:
        return list(obj.fields)
    chosen: list[Field] = []
    for name in (n.strip() for n in raw.split(",")):
        if not name:
            continue
        f = obj.field(name)
        if f is None:
            return rest_error(org, 400, "INVALID_FIELD", f"No such column '{name}' on sobject of type {obj.name}")
        if f not in chosen:
            chosen.append(f)
    return chosen


def _fetch_record(org: Org, obj: SObject, fields: list[Field], where: str, value: str, v: str) -> list[dict]:
    """Matching records (at most 2); a soft-deleted one is returned as ``{"_deleted": True}``."""
    deleted_col = '"IsDeleted"' if obj.field("IsDeleted") is not None else "0"
    cols = ", ".join(['"Id"', deleted_col, *(f'"{f.name}"' for f in fields)])
    sql = f'SELECT {cols} FROM "{obj.name}" WHERE {where} LIMIT 2'
    out: list[dict] = []
    for row in org.db().execute(sql, (value,)).fetchall():
        if row[1]:
            out.append({"_deleted": True})
            continue
        rec: dict[str, Any] = {"attributes": {"type": obj.name,
                                              "url": f"/services/data/v{v}/sobjects/{obj.name}/{row[0]}"}}
        for f, val in zip(fields, row[2:], strict=True):
            rec[f.name] = soql.to_json_value(f.type, val)
        out.append(rec)
    return out


def _one_record(org: Org, found: list[dict]) -> Response:
    live = [r for r in found if "_deleted" not in r]
    if not live:
        if found:
            return rest_error(org, 404, "ENTITY_IS_DELETED", "entity is deleted", [])
        return rest_error(org, 404, "NOT_FOUND", "The requested resource does not exist")
    if len(live) > 1:
        # 300 Multiple Choices: the body lists the matching records' URLs.
        return rest_response(org, [r["attributes"]["url"] for r in live], status=300)
    return rest_response(org, live[0])


@router.get("/services/data/{version}/sobjects/{sobject}/{record_id}")
async def retrieve(version: str, sobject: str, record_id: str, request: Request) -> Response:
    call = await _enter(request, version)
    if isinstance(call, Response):
        return call
    org, v = call.org, call.version
    obj = get_object(sobject)
    if obj is None:
        return rest_error(org, 404, "NOT_FOUND", "The requested resource does not exist")
    if not _ID_SHAPE.fullmatch(record_id):
        # A segment that is not an id is read as an external-id field name (upsert/retrieve by external id).
        return rest_error(org, 404, "NOT_FOUND",
                          f"Provided external ID field does not exist or is not accessible: {record_id}")
    full = case_safe(record_id[:15])
    if record_id[:3] != obj.key_prefix or (len(record_id) == 18 and full[15:] != record_id[15:].upper()):
        return rest_error(org, 400, "MALFORMED_ID", f"{obj.label} ID: id value of incorrect type: {record_id}",
                          ["Id"])
    fields = _select_fields(org, obj, request.query_params.get("fields"))
    if isinstance(fields, Response):
        return fields
    found = await run_in_threadpool(_fetch_record, org, obj, fields, '"Id" = ?', full, v)
    return _one_record(org, found)


@router.get("/services/data/{version}/sobjects/{sobject}/{field_name}/{value:path}")
async def retrieve_by_external_id(version: str, sobject: str, field_name: str, value: str,
                                  request: Request) -> Response:
    call = await _enter(request, version)
    if isinstance(call, Response):
        return call
    org, v = call.org, call.version
    obj = get_object(sobject)
    if obj is None:
        return rest_error(org, 404, "NOT_FOUND", "The requested resource does not exist")
    f = obj.field(field_name)
    if f is None or not (f.external_id or f.name == "Id"):
        return rest_error(org, 404, "NOT_FOUND",
                          f"Provided external ID field does not exist or is not accessible: {field_name}")
    # The path is percent-decoded once (an encoded "/" in a key is kept by the :path converter); "+" stays "+".
    key = value
    if f.name == "Id":
        if not _ID_SHAPE.fullmatch(key):
            return rest_error(org, 404, "NOT_FOUND", "The requested resource does not exist")
        key = case_safe(key[:15])
    fields = _select_fields(org, obj, request.query_params.get("fields"))
    if isinstance(fields, Response):
        return fields
    where = f'"{f.name}" = ?' + (" COLLATE NOCASE" if f.type in soql.TEXT_TYPES else "")
    found = await run_in_threadpool(_fetch_record, org, obj, fields, where, key, v)
    return _one_record(org, found)


# -- SOQL -----------------------------------------------------------------------------------------------------------
DEFAULT_BATCH = 2000
MIN_BATCH = 200
MAX_CURSORS_PER_USER = 10  # "A user can have up to 10 query cursors open at a time"
CURSOR_IDLE_S = 15 * 60  # "Query locators expire after 15 minutes of inactivity"
MAX_AGGREGATE_ROWS = 2000


@dataclass
class Cursor:
    locator: str
    plan: soql.Plan
    rowids: array
    user_id: str
    batch: int
    last_used: float = field(default_factory=time.monotonic)


class CursorStore:
    """Open query locators of one org: materialised rowid lists, so queryMore never re-runs the query."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cursors: dict[str, Cursor] = {}
        self._serial = itertools.count(secrets.randbelow(1 << 40))

    def open(self, plan: soql.Plan, rowids: array, user_id: str, batch: int) -> Cursor:
        with self._lock:
            self._expire()
            mine = sorted((c for c in self._cursors.values() if c.user_id == user_id), key=lambda c: c.last_used)
            for old in mine[:max(0, len(mine) - MAX_CURSORS_PER_USER + 1)]:
                del self._cursors[old.locator]
            cursor = Cursor(make_id("01g", next(self._serial)), plan, rowids, user_id, batch)
            self._cursors[cursor.locator] = cursor
            return cursor

    def get(self, locator: str, user_id: str) -> Cursor | None:
        with self._lock:
            self._expire()
            cursor = self._cursors.get(locator)
            if cursor is None or cursor.user_id != user_id:
                return None
            cursor.last_used = time.monotonic()
            return cursor

    def close(self, locator: str) -> None:
        with self._lock:
            self._cursors.pop(locator, None)

    def _expire(self) -> None:
        deadline = time.monotonic() - CURSOR_IDLE_S
        for key in [k for k, c in self._cursors.items() if c.last_used < deadline]:
            del self._cursors[key]

    def clear(self) -> None:
        with self._lock:
            self._cursors.clear()

    def __len__(self) -> int:
        return len(self._cursors)


_STORES: weakref.WeakKeyDictionary[Org, CursorStore] = weakref.WeakKeyDictionary()


def cursor_store(org: Org) -> CursorStore:
    store = _STORES.get(org)
    if store is None:
        store = _STORES[org] = CursorStore()
    return store


def batch_size(request: Request, default: int = DEFAULT_BATCH) -> int:
    """``Sforce-Query-Options: batchSize=N``, kept within the documented 200..2000."""
    header = request.headers.get("sforce-query-options", "")
    m = re.search(r"batchSize\s*=\s*(\d+)", header, re.IGNORECASE)
    if m is None:
        return default
    return max(MIN_BATCH, min(DEFAULT_BATCH, int(m.group(1))))


def _page(org: Org, cursor: Cursor, offset: int, batch: int, v: str) -> dict[str, Any]:
    ids = cursor.rowids[offset:offset + batch].tolist()
    rows = cursor.plan.rows_by_rowid(org.db(), ids)
    body: dict[str, Any] = {"totalSize": len(cursor.rowids), "done": offset + batch >= len(cursor.rowids)}
    if not body["done"]:
        body["nextRecordsUrl"] = f"/services/data/v{v}/query/{cursor.locator}-{offset + batch}"
    body["records"] = [cursor.plan.record(r, v) for r in rows]
    return body


def _run_query(org: Org, plan: soql.Plan, v: str, batch: int, user_id: str) -> dict[str, Any]:
    conn = org.db()
    if plan.kind == "count":
        return {"totalSize": plan.count(conn), "done": True, "records": []}
    if plan.kind == "aggregate":
        rows = plan.aggregate_rows(conn)
        if len(rows) > MAX_AGGREGATE_ROWS:
            raise soql.SoqlError("MALFORMED_QUERY", "Aggregate query does not support queryMore(), use LIMIT to "
                                                    "restrict the results to a single batch")
        return {"totalSize": len(rows), "done": True, "records": [plan.record(r, v) for r in rows]}
    rows = plan.first_rows(conn, batch + 1)
    if len(rows) <= batch:
        return {"totalSize": len(rows), "done": True, "records": [plan.record(r, v) for r in rows]}
    cursor = cursor_store(org).open(plan, plan.rowids(conn), user_id, batch)
    return _page(org, cursor, 0, batch, v)


async def _query(request: Request, version: str, include_deleted: bool) -> Response:
    call = await _enter(request, version)
    if isinstance(call, Response):
        return call
    org, v = call.org, call.version
    session = call.session
    if "explain" in request.query_params:
        return rest_error(org, 400, "MALFORMED_QUERY", "Query plan explanation is not supported by this org")
    text = request.query_params.get("q")
    try:
        plan = soql.compile_query(text or "", include_deleted)
        if request.query_params.get("columns", "").lower() == "true":
            return rest_response(org, plan.column_metadata())
        body = await run_in_threadpool(_run_query, org, plan, v, batch_size(request), session.user_id)
    except soql.SoqlError as exc:
        return rest_error(org, exc.status, exc.error_code, exc.message)
    return rest_response(org, body)


async def _query_more(request: Request, version: str, locator: str) -> Response:
    call = await _enter(request, version)
    if isinstance(call, Response):
        return call
    org, v = call.org, call.version
    session = call.session
    m = re.fullmatch(r"(01g[A-Za-z0-9]{15})-(\d+)", locator)
    store = cursor_store(org)
    cursor = store.get(m.group(1), session.user_id) if m else None
    if m is None or cursor is None:
        return rest_error(org, 400, "INVALID_QUERY_LOCATOR", "invalid query locator")
    body = await run_in_threadpool(_page, org, cursor, int(m.group(2)), batch_size(request, cursor.batch), v)
    if body["done"]:
        store.close(cursor.locator)  # a fully read cursor is closed, as Salesforce does
    return rest_response(org, body)


@router.get("/services/data/{version}/query")
@router.get("/services/data/{version}/query/")
async def query(version: str, request: Request) -> Response:
    return await _query(request, version, include_deleted=False)


@router.get("/services/data/{version}/queryAll")
@router.get("/services/data/{version}/queryAll/")
async def query_all(version: str, request: Request) -> Response:
    return await _query(request, version, include_deleted=True)


@router.get("/services/data/{version}/query/{locator}")
@router.get("/services/data/{version}/queryAll/{locator}")
async def query_more(version: str, locator: str, request: Request) -> Response:
    # nextRecordsUrl of a queryAll names /query/; both resources accept the same locator.
    return await _query_more(request, version, locator)


# -- SOAP login (partner API) ---------------------------------------------------------------------------------------
_SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
MAX_SOAP_LOGIN_BYTES = 10 * 1024  # "request size <= 10 KB"


def security_token(creds: Credentials) -> str:
    """The integration user's security token: derived from the org's secrets, stable per data directory."""
    digest = hashlib.sha256(f"{creds.client_secret}:{creds.username}".encode()).hexdigest()
    return digest[:24].upper()


def _soap_fault(code: str, message: str) -> Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/'
        'envelope/" xmlns:sf="urn:fault.partner.soap.sforce.com" xmlns:xsi="http://www.w3.org/2001/XMLSchema-'
        f'instance"><soapenv:Body><soapenv:Fault><faultcode>sf:{code}</faultcode><faultstring>{code}: '
        f'{escape(message)}</faultstring><detail><sf:LoginFault xsi:type="sf:LoginFault"><sf:exceptionCode>{code}'
        f'</sf:exceptionCode><sf:exceptionMessage>{escape(message)}</sf:exceptionMessage></sf:LoginFault></detail>'
        "</soapenv:Fault></soapenv:Body></soapenv:Envelope>"
    )
    return Response(body, status_code=500, media_type="text/xml; charset=utf-8")


def _soap_login_fields(raw: bytes) -> dict[str, str] | None:
    try:
        root = ElementTree.fromstring(raw)
    except ElementTree.ParseError:
        return None
    body = root.find(f"{{{_SOAP_ENV}}}Body")
    if body is None:
        return None
    login = next((el for el in body if el.tag.rsplit("}", 1)[-1] == "login"), None)
    if login is None:
        return None
    return {el.tag.rsplit("}", 1)[-1]: (el.text or "") for el in login}


@router.post("/services/Soap/u/{version}")
async def soap_login(version: str, request: Request) -> Response:
    org = org_of(request)
    await org.profile.rest_delay()
    m = re.fullmatch(r"(\d+)\.0", version)
    if m is None or not FIRST_VERSION <= int(m.group(1)) <= SOAP_LOGIN_LAST_VERSION:
        return _soap_fault("UNSUPPORTED_API_VERSION", f"Invalid Api version specified on URL: {version}")
    raw = await request.body()
    if len(raw) > MAX_SOAP_LOGIN_BYTES:
        return _soap_fault("INVALID_LOGIN", "Invalid username, password, security token; or user locked out.")
    fields = _soap_login_fields(raw)
    if fields is None:
        return _soap_fault("INVALID_LOGIN", "Invalid username, password, security token; or user locked out.")
    creds = org.credentials
    password = fields.get("password", "")
    # The token may be omitted: loopback counts as a trusted IP range of this org.
    ok = fields.get("username") == creds.username and password in (creds.password,
                                                                       creds.password + security_token(creds))
    if not ok:
        return _soap_fault("INVALID_LOGIN", "Invalid username, password, security token; or user locked out.")
    session = issue_token(org, creds.user_id, None)
    org15 = creds.org_id[:15]
    base = org.instance_url
    info = {
        "accessibilityMode": "false", "chatterExternal": "false", "currencySymbol": "$",
        "orgAttachmentFileSizeLimit": "5242880", "orgDefaultCurrencyIsoCode": "USD",
        "orgDefaultCurrencyLocale": "en_US", "orgDisallowHtmlAttachments": "false", "orgHasPersonAccounts": "false",
        "organizationId": creds.org_id, "organizationMultiCurrency": "false",
        "organizationName": "Data Cloud Sync Emulator", "profileId": make_id("00e", 1), "roleId": None,
        "sessionSecondsValid": str(int(org.profile.session_lifetime_s)), "userDefaultCurrencyIsoCode": None,
        "userEmail": "integration@example.com", "userFullName": "Integration User", "userId": creds.user_id,
        "userLanguage": "en_US", "userLocale": "en_US", "userName": creds.username, "userTimeZone": "GMT",
        "userType": "Standard", "userUiSkin": "Theme3",
    }
    user_info = "".join(f'<{k} xsi:nil="true"/>' if val is None else f"<{k}>{escape(val)}</{k}>"
                        for k, val in info.items())
    body = (
        '<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/'
        'envelope/" xmlns="urn:partner.soap.sforce.com" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        "<soapenv:Body><loginResponse><result>"
        f"<metadataServerUrl>{base}/services/Soap/m/{version}/{org15}</metadataServerUrl>"
        "<passwordExpired>false</passwordExpired><sandbox>false</sandbox>"
        f"<serverUrl>{base}/services/Soap/u/{version}/{org15}</serverUrl>"
        f"<sessionId>{escape(session)}</sessionId><userId>{creds.user_id}</userId>"
        f"<userInfo>{user_info}</userInfo>"
        "</result></loginResponse></soapenv:Body></soapenv:Envelope>"
    )
    return Response(body, media_type="text/xml; charset=utf-8")

