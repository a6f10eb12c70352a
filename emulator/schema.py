"""Field metadata of the objects this org has: the single source for describe, validation and storage."""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = (
    ("Prospecting", 10, False, False), ("Qualification", 10, False, False), ("Needs Analysis", 20, False, False),
    ("Value Proposition", 50, False, False), ("Id. Decision Makers", 60, False, False),
    ("Perception Analysis", 70, False, False), ("Proposal/Price Quote", 75, False, False),
    ("Negotiation/Review", 90, False, False), ("Closed Won", 100, True, True), ("Closed Lost", 0, True, False),
)
OPPORTUNITY_TYPES = ("Existing Customer - Upgrade", "Existing Customer - Replacement", "Existing Customer - Downgrade",
                     "New Customer")
LEAD_SOURCES = ("Web", "Phone Inquiry", "Partner Referral", "Purchased List", "Other")
INDUSTRIES = ("Agriculture", "Banking", "Chemicals", "Education", "Energy", "Finance", "Healthcare", "Manufacturing",
              "Media", "Retail", "Technology", "Telecommunications", "Transportation", "Utilities")


@dataclass(frozen=True)
class Field:
    name: str
    type: str  # Salesforce describe type: id, string, textarea, picklist, currency, percent, date, datetime, ...
    label: str
    length: int = 0
    precision: int = 0
    scale: int = 0
    nillable: bool = True
    createable: bool = True
    updateable: bool = True
    external_id: bool = False
    unique: bool = False
    id_lookup: bool = False
    picklist: tuple[str, ...] = ()
    restricted: bool = False
    reference_to: tuple[str, ...] = ()
    relationship_name: str | None = None
    defaulted_on_create: bool = False
    calculated: bool = False

    @property
    def sql_type(self) -> str:
        if self.type in ("currency", "percent", "double"):
            return "REAL"
        if self.type in ("int", "boolean"):
            return "INTEGER"
        return "TEXT"

    @property
    def required_on_create(self) -> bool:
        return not self.nillable and self.createable and not self.defaulted_on_create


def _system_fields() -> list[Field]:
    return [
        Field("Id", "id", "Record ID", length=18, nillable=False, createable=False, updateable=False, id_lookup=True),
        Field("IsDeleted", "boolean", "Deleted", nillable=False, createable=False, updateable=False,
              defaulted_on_create=True),
        Field("CreatedDate", "datetime", "Created Date", nillable=False, createable=False, updateable=False,
              defaulted_on_create=True),
        Field("CreatedById", "reference", "Created By ID", length=18, nillable=False, createable=False,
              updateable=False, reference_to=("User",), relationship_name="CreatedBy", defaulted_on_create=True),
        Field("LastModifiedDate", "datetime", "Last Modified Date", nillable=False, createable=False,
              updateable=False, defaulted_on_create=True),
        Field("LastModifiedById", "reference", "Last Modified By ID", length=18, nillable=False, createable=False,
              updateable=False, reference_to=("User",), relationship_name="LastModifiedBy", defaulted_on_create=True),
        Field("SystemModstamp", "datetime", "System Modstamp", nillable=False, createable=False, updateable=False,
              defaulted_on_create=True),
    ]


def _owner() -> Field:
    return Field("OwnerId", "reference", "Owner ID", length=18, nillable=False, reference_to=("User",),
                 relationship_name="Owner", defaulted_on_create=True)


ACCOUNT = [
    *_system_fields(), _owner(),
    Field("Name", "string", "Account Name", length=255, nillable=False, id_lookup=True),
    Field("Type", "picklist", "Account Type", length=255, picklist=("Customer - Direct", "Customer - Channel",
                                                                    "Prospect", "Partner", "Other")),
    Field("Industry", "picklist", "Industry", length=255, picklist=INDUSTRIES),
    Field("BillingCountry", "string", "Billing Country", length=80),
    Field("ExternalId__c", "string", "External ID", length=80, external_id=True, unique=True, id_lookup=True),
]

OPPORTUNITY = [
    *_system_fields(), _owner(),
    Field("AccountId", "reference", "Account ID", length=18, reference_to=("Account",), relationship_name="Account"),
    Field("Name", "string", "Name", length=120, nillable=False, id_lookup=True),
    Field("Description", "textarea", "Description", length=32000),
    Field("StageName", "picklist", "Stage", length=255, nillable=False, picklist=tuple(s[0] for s in STAGES),
          restricted=True),
    Field("Amount", "currency", "Amount", precision=18, scale=2),
    Field("Probability", "percent", "Probability (%)", precision=3, scale=0),
    Field("CloseDate", "date", "Close Date", nillable=False),
    Field("Type", "picklist", "Opportunity Type", length=255, picklist=OPPORTUNITY_TYPES),
    Field("LeadSource", "picklist", "Lead Source", length=255, picklist=LEAD_SOURCES),
    Field("IsClosed", "boolean", "Closed", nillable=False, createable=False, updateable=False, calculated=True,
          defaulted_on_create=True),
    Field("IsWon", "boolean", "Won", nillable=False, createable=False, updateable=False, calculated=True,
          defaulted_on_create=True),
    Field("ExternalId__c", "string", "External ID", length=80, external_id=True, unique=True, id_lookup=True),
]

USER = [
    *_system_fields(),
    Field("Username", "string", "Username", length=80, nillable=False, unique=True, id_lookup=True),
    Field("Name", "string", "Full Name", length=121, createable=False, updateable=False),
    Field("FirstName", "string", "First Name", length=40),
    Field("LastName", "string", "Last Name", length=80, nillable=False),
    Field("Email", "email", "Email", length=128, nillable=False),
    Field("IsActive", "boolean", "Active", nillable=False, defaulted_on_create=True),
    Field("UserType", "picklist", "User Type", length=40, createable=False, updateable=False,
          picklist=("Standard",)),
    Field("TimeZoneSidKey", "picklist", "Time Zone", length=40, nillable=False, picklist=("GMT",)),
]

ORGANIZATION = [
    Field("Id", "id", "Organization ID", length=18, nillable=False, createable=False, updateable=False),
    Field("Name", "string", "Name", length=80, nillable=False, createable=False),
    Field("OrganizationType", "picklist", "Edition", length=40, createable=False, updateable=False,
          picklist=("Enterprise Edition",)),
    Field("InstanceName", "string", "Instance Name", length=5, createable=False, updateable=False),
    Field("IsSandbox", "boolean", "Is Sandbox", nillable=False, createable=False, updateable=False),
    Field("NamespacePrefix", "string", "Namespace Prefix", length=15, createable=False, updateable=False),
]


@dataclass(frozen=True)
class SObject:
    name: str
    label: str
    label_plural: str
    key_prefix: str
    fields: list[Field] = field(default_factory=list)
    createable: bool = True

    def field(self, name: str) -> Field | None:
        return self.field_map.get(name.lower())

    @property
    def field_map(self) -> dict[str, Field]:
        return {f.name.lower(): f for f in self.fields}


OBJECTS: dict[str, SObject] = {
    "Account": SObject("Account", "Account", "Accounts", "001", ACCOUNT),
    "Opportunity": SObject("Opportunity", "Opportunity", "Opportunities", "006", OPPORTUNITY),
    "User": SObject("User", "User", "Users", "005", USER),
    "Organization": SObject("Organization", "Organization", "Organizations", "00D", ORGANIZATION, createable=False),
}


def get_object(name: str) -> SObject | None:
    """Case-insensitive lookup, as Salesforce resolves object names."""
    for key, obj in OBJECTS.items():
        if key.lower() == name.lower():
            return obj
    return None


# The Data Cloud DMO the sync reads: column name -> Data Cloud type (as query-sql metadata reports it).
DMO_NAME = "Opportunity_Sync__dlm"
DMO_COLUMNS: dict[str, str] = {
    "ExternalId__c": "Varchar",
    "AccountExternalId__c": "Varchar",
    "Name__c": "Varchar",
    "StageName__c": "Varchar",
    "CloseDate__c": "Date",
    "Amount__c": "Numeric",
    "Probability__c": "Numeric",
    "Type__c": "Varchar",
    "LeadSource__c": "Varchar",
    "Description__c": "Varchar",
    "LastModifiedDate__c": "TimestampTZ",
}
