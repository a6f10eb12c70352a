"""The REST surface over real HTTPS with raw ``requests``: exact documented shapes, headers and error bodies."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import pytest
import requests
from simple_salesforce.api import Salesforce

from emulator import rest
from emulator.harness import EmulatorProcess
from emulator.ids import make_id
from emulator.state import Credentials, Stats, connect

V = "62.0"
N_OPPS = 2_500  # one is soft-deleted: 2,499 visible, more than one 2,000-record page
SLASH_KEY = "K'ey\\1/2 \"x\""
ACCOUNTS = [(make_id("001", 1), "Acme", "ACC-1"), (make_id("001", 2), "O'Brien \"Quoted\" Co", SLASH_KEY),
            (make_id("001", 3), "Gamma", "acc-3"), (make_id("001", 4), "Percent", "50%41")]
NOW = "2026-01-01T00:00:00.000+0000"


def opp_id(i: int) -> str:
    return make_id("006", i)


def fill_org(data_dir: Path) -> None:
    """Accounts and Opportunities written straight into the running org's SQLite (WAL: the server sees them)."""
    creds = Credentials.load_or_create(data_dir / "credentials.json")
    conn = connect(data_dir / "org.sqlite")
    conn.executemany('INSERT INTO "Account"(Id, IsDeleted, CreatedDate, OwnerId, Name, ExternalId__c) '
                     "VALUES(?, 0, ?, ?, ?, ?)", [(i, NOW, creds.user_id, n, k) for i, n, k in ACCOUNTS])
    rows = []
    for i in range(1, N_OPPS + 1):
        key = None if i % 10 == 0 else f"OPP-{i:05d}"
        if i == 7:
            key = "Q'uote\\Back\"slash"
        account = None if i % 7 == 0 else ACCOUNTS[i % 3][0]
        rows.append((opp_id(i), 1 if i == 5 else 0, NOW, creds.user_id, account, f"Deal {i:05d}", "Prospecting",
                     float(i), f"2026-{1 + i % 12:02d}-15", key, 0, 0))
    conn.executemany('INSERT INTO "Opportunity"(Id, IsDeleted, CreatedDate, OwnerId, AccountId, Name, StageName, '
                     "Amount, CloseDate, ExternalId__c, IsClosed, IsWon) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    conn.commit()
    conn.close()


VISIBLE = N_OPPS - 1
WITH_KEY = sum(1 for i in range(1, N_OPPS + 1) if i % 10 and i != 5)


@pytest.fixture(scope="module")
def org(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    proc = EmulatorProcess(tmp_path_factory.mktemp("rest_org"))
    with proc:
        fill_org(proc.data_dir)
        yield proc


def _session(org: EmulatorProcess) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE from the environment would override verify
    session.verify = org.ca_bundle
    return session


@pytest.fixture(scope="module")
def http(org: EmulatorProcess) -> Iterator[requests.Session]:
    # Closed before the emulator stops: an idle keep-alive connection would hold its graceful shutdown.
    with _session(org) as session:
        session.headers["Authorization"] = f"Bearer {org.access_token()}"
        yield session


@pytest.fixture(scope="module")
def anon(org: EmulatorProcess) -> Iterator[requests.Session]:
    with _session(org) as session:
        yield session


def url(org: EmulatorProcess, path: str) -> str:
    return f"{org.instance_url}/services/data/v{V}{path}"


def q(http: requests.Session, org: EmulatorProcess, soql: str, path: str = "/query/", **kw) -> requests.Response:
    return http.get(url(org, path), params={"q": soql}, **kw)


NOT_FOUND = [{"message": "The requested resource does not exist", "errorCode": "NOT_FOUND"}]


# -- versions, resources, auth --------------------------------------------------------------------------------------
def test_versions_need_no_session(org, anon):
    resp = anon.get(f"{org.instance_url}/services/data/")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json;charset=UTF-8"
    body = resp.json()
    assert body[0] == {"label": "Summer '14", "url": "/services/data/v31.0", "version": "31.0"}
    assert {"label": "Winter '25", "url": "/services/data/v62.0", "version": "62.0"} in body
    assert body[-1]["version"] == "66.0" and body[-1]["label"] == "Spring '26"
    assert anon.get(f"{org.instance_url}/services/data").json() == body


def test_missing_or_bad_token_is_401_list(org, anon):
    for headers in ({}, {"Authorization": "Bearer 00Dxx!nope"}):
        resp = anon.get(url(org, "/limits/"), headers=headers)
        assert resp.status_code == 401
        assert resp.headers["WWW-Authenticate"] == "Token"
        assert resp.json() == [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]


def test_bad_version_is_404(org, http):
    for path in ("/services/data/viAmABadVersion/limits/", "/services/data/v99.0/query/?q=SELECT+Id+FROM+Account",
                 "/services/data/v20.0/sobjects"):
        resp = http.get(org.instance_url + path)
        assert (resp.status_code, resp.json()) == (404, NOT_FOUND)


def test_resources_by_version_and_latest(org, http):
    resp = http.get(url(org, "/"))
    assert resp.status_code == 200
    assert resp.json() == {
        "identity": f"{org.instance_url}/id/{org.info['org_id']}/{org.info['user_id']}",
        "limits": f"/services/data/v{V}/limits", "query": f"/services/data/v{V}/query",
        "queryAll": f"/services/data/v{V}/queryAll", "sobjects": f"/services/data/v{V}/sobjects"}
    latest = http.get(f"{org.instance_url}/services/data/latest/").json()
    assert latest["query"] == "/services/data/v66.0/query"


# -- limits ---------------------------------------------------------------------------------------------------------
REQUIRED_LIMITS = {"DailyApiRequests", "DailyBulkApiBatches", "DailyBulkV2QueryJobs", "DailyBulkV2QueryFileStorageMB",
                   "DataStorageMB", "FileStorageMB", "ConcurrentAsyncGetReportInstances", "DailyAsyncApexExecutions",
                   "PermissionSets", "HourlyODataCallout", "SingleEmail", "StreamingApiConcurrentClients"}


def test_limits_shape_and_moving_api_counter(org, http):
    first = http.get(url(org, "/limits/"))
    second = http.get(url(org, "/limits"))
    assert first.status_code == second.status_code == 200
    a, b = first.json(), second.json()
    assert set(a) >= REQUIRED_LIMITS
    assert a["DailyBulkApiBatches"] == {"Max": 15000, "Remaining": 15000}
    assert a["DailyBulkV2QueryJobs"] == {"Max": 10000, "Remaining": 10000}
    assert a["PermissionSets"] == {"Max": 1500, "Remaining": 1499, "CreateCustom": {"Max": 1000, "Remaining": 999}}
    assert a["DailyApiRequests"]["Remaining"] - b["DailyApiRequests"]["Remaining"] == 1
    # The header and the body agree, and simple-salesforce can parse the header.
    usage = Salesforce.parse_api_usage(second.headers["Sforce-Limit-Info"])["api-usage"]
    assert usage.total == b["DailyApiRequests"]["Max"]
    assert usage.used == b["DailyApiRequests"]["Max"] - b["DailyApiRequests"]["Remaining"]
    # 2,500 Opportunities + 4 Accounts + 1 User at 2 KB each: 4 MB of data storage.
    assert b["DataStorageMB"] == {"Max": 10240, "Remaining": 10240 - 4}


def test_limits_bulk_counters_move_with_stats():
    stats = Stats()
    fake = SimpleNamespace(stats=stats)
    stats.add("bulk_batches", 3)
    stats.add("bulk_query_jobs", 2)
    stats.request("GET /services/data/vXX.X/query", 200)
    stats.request("POST /services/oauth2/token", 200)  # logins do not count
    body = rest.limits_body(fake, record_count=0)  # type: ignore[arg-type]
    assert body["DailyBulkApiBatches"] == {"Max": 15000, "Remaining": 14997}
    assert body["DailyBulkV2QueryJobs"] == {"Max": 10000, "Remaining": 9998}
    assert body["DailyApiRequests"] == {"Max": 100000, "Remaining": 100000 - 2}
    assert list(body) == sorted(body)
    stats.add("bulk_query_jobs_created", 5)  # the name emulator/bulk_query.py counts under
    assert rest.limits_body(fake, record_count=0)["DailyBulkV2QueryJobs"]["Remaining"] == 9995  # type: ignore[arg-type]


def test_api_limit_exhausted_is_403():
    stats = Stats()
    fake = SimpleNamespace(stats=stats, daily_api_requests_max=2)
    stats.request("GET /services/data/vXX.X/limits", 200)
    assert rest.check_api_limit(fake) is None  # type: ignore[arg-type]
    stats.request("GET /services/data/vXX.X/limits", 200)
    refused = rest.check_api_limit(fake)  # type: ignore[arg-type]
    assert refused is not None and refused.status_code == 403
    assert refused.body == b'[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]'


def test_limit_info_header_on_rest_responses(org, http):
    for resp in (http.get(url(org, "/sobjects/")), q(http, org, "SELECT Id FROM Account"),
                 q(http, org, "SELECT Nope FROM Account")):
        assert re.fullmatch(r"api-usage=\d+/100000", resp.headers["Sforce-Limit-Info"])


# -- describe -------------------------------------------------------------------------------------------------------
FIELD_KEYS = set(re.findall(r"\w+", """aggregatable aiPredictionField autoNumber byteLength calculated calculatedFormula cascadeDelete
caseSensitive compoundFieldName controllerName createable custom defaultValue defaultValueFormula defaultedOnCreate
dependentPicklist deprecatedAndHidden digits displayLocationInDecimal encrypted externalId extraTypeInfo filterable
filteredLookupInfo formulaTreatNullNumberAsZero groupable highScaleNumber htmlFormatted idLookup inlineHelpText label
length mask maskType name nameField namePointing nillable permissionable picklistValues polymorphicForeignKey
precision queryByDistance referenceTargetField referenceTo relationshipName relationshipOrder restrictedDelete
restrictedPicklist scale searchPrefilterable soapType sortable type unique updateable writeRequiresMasterRead"""))
OBJECT_KEYS = set(re.findall(r"\w+", """actionOverrides activateable associateEntityType associateParentEntity childRelationships
compactLayoutable createable custom customSetting deepCloneable defaultImplementation deletable deprecatedAndHidden
extendedBy extendsInterfaces feedEnabled fields hasSubtypes implementedBy implementsInterfaces isInterface isSubtype
keyPrefix label labelPlural layoutable listviewable lookupLayoutable mergeable mruEnabled name namedLayoutInfos
networkScopeFieldName queryable recordTypeInfos replicateable retrieveable searchLayoutable searchable
sobjectDescribeOption supportedScopes triggerable undeletable updateable urls"""))
GLOBAL_KEYS = set(re.findall(r"\w+", """activateable associateEntityType associateParentEntity createable custom customSetting
deepCloneable deletable deprecatedAndHidden feedEnabled hasSubtypes isInterface isSubtype keyPrefix label labelPlural
layoutable mergeable mruEnabled name queryable replicateable retrieveable searchable triggerable undeletable updateable
urls"""))


def test_global_describe(org, http):
    body = http.get(url(org, "/sobjects")).json()
    assert (body["encoding"], body["maxBatchSize"]) == ("UTF-8", 200)
    by_name = {s["name"]: s for s in body["sobjects"]}
    assert {"Account", "Opportunity", "User", "Organization"} <= set(by_name)
    assert set(by_name["Opportunity"]) == GLOBAL_KEYS
    assert by_name["Opportunity"]["keyPrefix"] == "006"
    assert set(by_name["Opportunity"]["urls"]) == {"compactLayouts", "rowTemplate", "approvalLayouts", "listviews",
                                                    "describe", "quickActions", "layouts", "sobject"}
    assert by_name["Opportunity"]["urls"]["rowTemplate"] == f"/services/data/v{V}/sobjects/Opportunity/{{ID}}"


def test_opportunity_describe(org, http):
    resp = http.get(url(org, "/sobjects/Opportunity/describe"))
    assert resp.status_code == 200
    d = resp.json()
    assert set(d) == OBJECT_KEYS
    assert {k: d[k] for k in ("keyPrefix", "label", "labelPlural", "name", "custom", "createable", "updateable",
                              "deletable", "queryable", "sobjectDescribeOption")} == {
        "keyPrefix": "006", "label": "Opportunity", "labelPlural": "Opportunities", "name": "Opportunity",
        "custom": False, "createable": True, "updateable": True, "deletable": True, "queryable": True,
        "sobjectDescribeOption": "FULL"}
    assert d["recordTypeInfos"][0]["recordTypeId"] == "012000000000000AAA"
    fields = {f["name"]: f for f in d["fields"]}
    assert all(set(f) == FIELD_KEYS for f in d["fields"])
    account_id = fields["AccountId"]
    assert {k: account_id[k] for k in ("type", "length", "byteLength", "nillable", "createable", "updateable",
                                       "referenceTo", "relationshipName", "soapType", "externalId", "idLookup",
                                       "label", "picklistValues", "digits", "precision", "scale")} == {
        "type": "reference", "length": 18, "byteLength": 18, "nillable": True, "createable": True, "updateable": True,
        "referenceTo": ["Account"], "relationshipName": "Account", "soapType": "tns:ID", "externalId": False,
        "idLookup": False, "label": "Account ID", "picklistValues": [], "digits": 0, "precision": 0, "scale": 0}
    stage = fields["StageName"]
    assert [p["value"] for p in stage["picklistValues"]][:3] == ["Prospecting", "Qualification", "Needs Analysis"]
    assert stage["picklistValues"][0] == {"active": True, "defaultValue": False, "label": "Prospecting",
                                          "validFor": None, "value": "Prospecting"}
    assert (stage["type"], stage["restrictedPicklist"], stage["nillable"]) == ("picklist", True, False)
    ext = fields["ExternalId__c"]
    assert (ext["externalId"], ext["unique"], ext["idLookup"], ext["custom"], ext["length"], ext["byteLength"],
            ext["caseSensitive"]) == (True, True, True, True, 80, 240, False)
    assert (fields["Amount"]["type"], fields["Amount"]["precision"], fields["Amount"]["scale"],
            fields["Amount"]["soapType"]) == ("currency", 18, 2, "xsd:double")
    assert (fields["CloseDate"]["soapType"], fields["CreatedDate"]["soapType"]) == ("xsd:date", "xsd:dateTime")
    assert fields["Id"]["soapType"] == "tns:ID" and fields["Name"]["nameField"] is True
    required = {n for n, f in fields.items() if not f["nillable"] and f["createable"] and not f["defaultedOnCreate"]}
    assert required == {"Name", "StageName", "CloseDate"}


def test_account_describe_lists_child_opportunities(org, http):
    d = http.get(url(org, "/sobjects/account/describe/")).json()
    assert d["name"] == "Account"
    rel = next(r for r in d["childRelationships"] if r["childSObject"] == "Opportunity" and r["field"] == "AccountId")
    assert rel["relationshipName"] == "Opportunities"


def test_unknown_object_is_404(org, http):
    for path in ("/sobjects/PlayingCard__c/describe", "/sobjects/PlayingCard__c", f"/sobjects/Nope/{opp_id(1)}"):
        resp = http.get(url(org, path))
        assert (resp.status_code, resp.json()) == (404, NOT_FOUND)


def test_sobject_basic_info(org, http):
    body = http.get(url(org, "/sobjects/Opportunity/")).json()
    assert set(body) == {"objectDescribe", "recentItems"}
    assert body["objectDescribe"]["name"] == "Opportunity" and body["recentItems"] == []


# -- retrieve -------------------------------------------------------------------------------------------------------
def test_retrieve_account_with_fields(org, http):
    acc_id = ACCOUNTS[1][0]
    resp = http.get(url(org, f"/sobjects/Account/{acc_id[:15]}"), params={"fields": "Name,ExternalId__c"})
    assert resp.status_code == 200
    assert resp.json() == {"attributes": {"type": "Account", "url": f"/services/data/v{V}/sobjects/Account/{acc_id}"},
                           "Name": ACCOUNTS[1][1], "ExternalId__c": SLASH_KEY}
    full = http.get(url(org, f"/sobjects/Account/{acc_id}")).json()
    assert list(full)[:3] == ["attributes", "Id", "IsDeleted"] and full["IsDeleted"] is False


def test_retrieve_user_and_organization(org, http):
    user = http.get(url(org, f"/sobjects/User/{org.info['user_id']}")).json()
    assert (user["Username"], user["IsActive"]) == (org.info["username"], True)
    organization = http.get(url(org, f"/sobjects/Organization/{org.info['org_id']}")).json()
    assert organization["Id"] == org.info["org_id"] and organization["IsSandbox"] is False


def test_retrieve_errors(org, http):
    missing = http.get(url(org, f"/sobjects/Opportunity/{opp_id(99_999)}"))
    assert (missing.status_code, missing.json()) == (404, NOT_FOUND)
    deleted = http.get(url(org, f"/sobjects/Opportunity/{opp_id(5)}"))
    assert (deleted.status_code, deleted.json()) == (404, [{"message": "entity is deleted",
                                                            "errorCode": "ENTITY_IS_DELETED", "fields": []}])
    wrong_type = http.get(url(org, f"/sobjects/Account/{opp_id(1)}"))
    assert wrong_type.status_code == 400
    assert wrong_type.json() == [{"message": f"Account ID: id value of incorrect type: {opp_id(1)}",
                                  "errorCode": "MALFORMED_ID", "fields": ["Id"]}]
    not_an_id = http.get(url(org, "/sobjects/Account/xyz"))
    assert (not_an_id.status_code, not_an_id.json()) == (404, [{
        "message": "Provided external ID field does not exist or is not accessible: xyz", "errorCode": "NOT_FOUND"}])
    bad_field = http.get(url(org, f"/sobjects/Account/{ACCOUNTS[0][0]}"), params={"fields": "Name,Bacon__c"})
    assert (bad_field.status_code, bad_field.json()) == (400, [{
        "message": "No such column 'Bacon__c' on sobject of type Account", "errorCode": "INVALID_FIELD"}])


def test_retrieve_by_external_id_with_quotes_backslash_and_slash(org, http):
    resp = http.get(url(org, f"/sobjects/Account/ExternalId__c/{quote(SLASH_KEY, safe='')}"))
    assert resp.status_code == 200
    assert resp.json()["Id"] == ACCOUNTS[1][0]
    # External ids compare case-insensitively (not a "unique case-sensitive" field).
    assert http.get(url(org, "/sobjects/Account/ExternalId__c/ACC-3")).json()["Id"] == ACCOUNTS[2][0]
    assert http.get(url(org, "/sobjects/Account/ExternalId__c/nope")).json() == NOT_FOUND
    # Decoded exactly once: "%2541" is the key "%41", not "A".
    assert http.get(url(org, "/sobjects/Account/ExternalId__c/50%2541")).json()["Id"] == ACCOUNTS[3][0]
    not_ext = http.get(url(org, "/sobjects/Account/Name/Acme"))
    assert not_ext.json() == [{"message": "Provided external ID field does not exist or is not accessible: Name",
                               "errorCode": "NOT_FOUND"}]


# -- query ----------------------------------------------------------------------------------------------------------
def test_query_both_paths_exact_shape(org, http):
    soql = "SELECT Id, Name FROM Account WHERE ExternalId__c = 'ACC-1'"
    expected = {"totalSize": 1, "done": True, "records": [{
        "attributes": {"type": "Account", "url": f"/services/data/v{V}/sobjects/Account/{ACCOUNTS[0][0]}"},
        "Id": ACCOUNTS[0][0], "Name": "Acme"}]}
    assert q(http, org, soql, "/query/").json() == expected
    assert q(http, org, soql, "/query").json() == expected


def test_count_queries(org, http):
    count = q(http, org, "SELECT COUNT() FROM Opportunity WHERE ExternalId__c != null")
    assert count.json() == {"totalSize": WITH_KEY, "done": True, "records": []}
    expr = q(http, org, "SELECT COUNT(Id) FROM Opportunity WHERE ExternalId__c != null").json()
    assert expr == {"totalSize": 1, "done": True,
                    "records": [{"attributes": {"type": "AggregateResult"}, "expr0": WITH_KEY}]}
    assert q(http, org, "SELECT COUNT() FROM Opportunity", "/queryAll/").json()["totalSize"] == N_OPPS


def test_relationship_nesting_over_http(org, http):
    rec = q(http, org, "SELECT Name, Account.ExternalId__c FROM Opportunity WHERE Name = 'Deal 00001'").json()[
        "records"][0]
    assert rec["Account"] == {"attributes": {"type": "Account",
                                             "url": f"/services/data/v{V}/sobjects/Account/{ACCOUNTS[1][0]}"},
                              "ExternalId__c": SLASH_KEY}


def test_where_with_quoted_key(org, http):
    body = q(http, org, "SELECT Id FROM Opportunity WHERE ExternalId__c = 'Q\\'uote\\\\Back\"slash'").json()
    assert [r["Id"] for r in body["records"]] == [opp_id(7)]
    body = q(http, org, "SELECT Id FROM Opportunity WHERE Account.ExternalId__c IN ('K\\'ey\\\\1/2 \"x\"') "
                        "AND Amount < 10").json()
    assert [r["Id"] for r in body["records"]] == [opp_id(1), opp_id(4)]


def test_pagination_with_batch_size(org, http):
    soql = "SELECT Id, ExternalId__c FROM Opportunity ORDER BY Amount DESC"
    page = q(http, org, soql, headers={"Sforce-Query-Options": "batchSize=1000"}).json()
    seen, urls = [], []
    while True:
        assert page["totalSize"] == VISIBLE
        seen.extend(r["Id"] for r in page["records"])
        if page["done"]:
            assert "nextRecordsUrl" not in page
            break
        urls.append(page["nextRecordsUrl"])
        assert len(page["records"]) == 1000
        page = http.get(org.instance_url + page["nextRecordsUrl"]).json()
    assert urls[0].endswith("-1000") and urls[1].endswith("-2000")
    assert re.fullmatch(rf"/services/data/v{V}/query/01g[A-Za-z0-9]{{15}}-1000", urls[0])
    assert len(seen) == len(set(seen)) == VISIBLE
    assert seen[0] == opp_id(N_OPPS) and seen[-1] == opp_id(1)
    # A fully read cursor is closed.
    gone = http.get(org.instance_url + urls[-1])
    assert (gone.status_code, gone.json()) == (400, [{"message": "invalid query locator",
                                                      "errorCode": "INVALID_QUERY_LOCATOR"}])


def test_default_page_is_2000_and_batch_size_is_clamped(org, http):
    first = q(http, org, "SELECT Id FROM Opportunity").json()
    assert (len(first["records"]), first["done"], first["totalSize"]) == (2000, False, VISIBLE)
    small = q(http, org, "SELECT Id FROM Opportunity", headers={"Sforce-Query-Options": "batchSize=10"}).json()
    assert len(small["records"]) == 200 and small["nextRecordsUrl"].endswith("-200")


def test_query_all_next_records_url_names_query(org, http):
    first = q(http, org, "SELECT Id FROM Opportunity", "/queryAll/").json()
    assert first["totalSize"] == N_OPPS and "/query/01g" in first["nextRecordsUrl"]
    locator = first["nextRecordsUrl"].rsplit("/", 1)[1]
    rest_page = http.get(url(org, f"/queryAll/{locator}")).json()
    assert rest_page["done"] is True and len(rest_page["records"]) == N_OPPS - 2000


def test_invalid_locator(org, http):
    for loc in ("01gXXXXXXXXXXXXXXX-2000", "garbage"):
        resp = http.get(url(org, f"/query/{loc}"))
        assert (resp.status_code, resp.json()) == (400, [{"message": "invalid query locator",
                                                          "errorCode": "INVALID_QUERY_LOCATOR"}])


def test_query_errors_over_http(org, http):
    cases = [
        ("SELEKT Name FROM Account", "MALFORMED_QUERY", "unexpected token: SELEKT"),
        ("SELECT Bacon__c FROM Account LIMIT 2", "INVALID_FIELD",
         "\nSELECT Bacon__c FROM Account LIMIT 2\n       ^\nERROR at Row:1:Column:8\nNo such column 'Bacon__c' on "
         "entity 'Account'. If you are attempting to use a custom field, be sure to append the '__c' after the custom "
         "field name. Please reference your WSDL or the describe call for the appropriate names."),
        ("SELECT Id FROM Foo", "INVALID_TYPE",
         "\nSELECT Id FROM Foo\n               ^\nERROR at Row:1:Column:16\nsObject type 'Foo' is not supported. If "
         "you are attempting to use a custom object, be sure to append the '__c' after the entity name. Please "
         "reference your WSDL or the describe call for the appropriate names."),
    ]
    for soql, code, message in cases:
        resp = q(http, org, soql)
        assert resp.status_code == 400
        assert resp.json() == [{"message": message, "errorCode": code}]
    no_q = http.get(url(org, "/query/"))
    assert (no_q.status_code, no_q.json()) == (400, [{"message": "A query string has to be specified",
                                                      "errorCode": "MALFORMED_QUERY"}])


def test_columns_metadata_variant(org, http):
    resp = http.get(url(org, "/query"), params={"q": "SELECT Id, Name, Account.Name FROM Opportunity",
                                                 "columns": "true"})
    body = resp.json()
    assert set(body) == {"columnMetadata", "entityName", "groupBy", "idSelected", "keyPrefix"}
    assert (body["entityName"], body["groupBy"], body["idSelected"], body["keyPrefix"]) == ("Opportunity", False,
                                                                                             True, "006")
    assert [c["columnName"] for c in body["columnMetadata"]] == ["Id", "Name", "Account"]
    assert body["columnMetadata"][2]["joinColumns"][0]["columnName"] == "Name"


def test_organization_and_user_are_queryable(org, http):
    body = q(http, org, "SELECT Id, Name FROM Organization").json()
    assert body["records"][0]["Id"] == org.info["org_id"]
    assert body["records"][0]["attributes"]["type"] == "Organization"
    user = q(http, org, f"SELECT Username FROM User WHERE Id = '{org.info['user_id']}'").json()
    assert user["records"][0]["Username"] == org.info["username"]


def test_query_more_belongs_to_its_user(org, http, anon):
    first = q(http, org, "SELECT Id FROM Opportunity").json()
    other = anon.get(org.instance_url + first["nextRecordsUrl"],
                     headers={"Authorization": f"Bearer {org.access_token()}"})
    # Another session of the same integration user may continue the cursor (Salesforce binds it to the user).
    assert other.status_code == 200 and other.json()["done"] is True


# -- SOAP login -----------------------------------------------------------------------------------------------------
SOAP = """<?xml version="1.0" encoding="utf-8" ?>
<env:Envelope xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xmlns:env="http://schemas.xmlsoap.org/soap/envelope/" xmlns:urn="urn:partner.soap.sforce.com">
  <env:Header><urn:CallOptions><urn:client>simple-salesforce</urn:client>
  <urn:defaultNamespace>sf</urn:defaultNamespace></urn:CallOptions></env:Header>
  <env:Body><n1:login xmlns:n1="urn:partner.soap.sforce.com"><n1:username>{u}</n1:username>
  <n1:password>{p}</n1:password></n1:login></env:Body></env:Envelope>"""
SOAP_HEADERS = {"content-type": "text/xml", "charset": "UTF-8", "SOAPAction": "login"}


def test_soap_login_and_faults(org, anon):
    creds = Credentials.load_or_create(org.data_dir / "credentials.json")
    token = rest.security_token(creds)
    ok = anon.post(f"{org.instance_url}/services/Soap/u/59.0", headers=SOAP_HEADERS,
                   data=SOAP.format(u=creds.username, p=creds.password + token))
    assert ok.status_code == 200 and ok.headers["Content-Type"].startswith("text/xml")
    session_id = re.search(r"<sessionId>([^<]+)</sessionId>", ok.text).group(1)
    assert f"<serverUrl>{org.instance_url}/services/Soap/u/59.0/{creds.org_id[:15]}</serverUrl>" in ok.text
    assert anon.get(url(org, "/limits/"), headers={"Authorization": f"Bearer {session_id}"}).status_code == 200

    bad = anon.post(f"{org.instance_url}/services/Soap/u/59.0", headers=SOAP_HEADERS,
                    data=SOAP.format(u=creds.username, p="wrong"))
    assert bad.status_code == 500
    assert "<sf:exceptionCode>INVALID_LOGIN</sf:exceptionCode>" in bad.text
    assert ("<sf:exceptionMessage>Invalid username, password, security token; or user locked out."
            "</sf:exceptionMessage>") in bad.text
    retired = anon.post(f"{org.instance_url}/services/Soap/u/65.0", headers=SOAP_HEADERS,
                        data=SOAP.format(u=creds.username, p=creds.password))
    assert retired.status_code == 500 and "UNSUPPORTED_API_VERSION" in retired.text
