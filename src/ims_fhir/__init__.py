"""ims-fhir: IMS encounters to FHIR R4 and back, and in sync with FHIR servers."""

from ._exceptions import (
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ConflictError,
    ConnectError,
    FhirError,
    FieldIssue,
    GoneError,
    ImsFhirError,
    InvalidResponseError,
    MappingError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    RateLimitError,
    RecordError,
    RecordLocation,
    ServerError,
    StateError,
    StatusError,
    TimeoutException,
    TransportError,
    UnprocessableEntityError,
    UnsafeServerError,
    VersionConflictError,
)
from ._version import __version__
from .client.asynchronous import AsyncFhirClient
from .client.auth import BearerAuth, ClientCredentialsAuth, SmartBackendAuth, TokenAuth
from .client.blocking import FhirClient
from .client.http import ClientOptions, Outcome, RetryPolicy
from .mapping.convert import NdjsonPerType
from .mapping.from_fhir import MappingReport, SkippedResource, from_fhir
from .mapping.questionnaire_response import (
    from_questionnaire_response,
    to_questionnaire_response,
)
from .mapping.to_fhir import to_fhir, to_fhir_json, to_resources, to_transaction
from .record.codes import (
    AdverseEventCode,
    DiagnosisCode,
    MuscleCode,
    NeedleResponseCode,
    PainTimingCode,
    SeverityCode,
    SideCode,
    SignCode,
    SiteRoleCode,
    SpinalLevelCode,
    TrophedemaTestCode,
    VisitTypeCode,
)
from .record.model import (
    AdverseEvent,
    Assessment,
    Clinic,
    Consent,
    Diagnosis,
    ElectricalStimulation,
    Encounter,
    Finding,
    HumanName,
    Identifier,
    NeedledSite,
    PainScore,
    Patient,
    Practitioner,
    Treatment,
)
from .record.reader import ReadRecord, read_records, validate_record
from .record.schema import record_json_schema
from .record.synthetic import synthetic_encounters
from .record.terminology import CANONICAL, Terminology, terminology
from .sync.bulk import BulkProgress, bulk_pull, bulk_pull_all, rebuild_ndjson
from .sync.capabilities import Check, check_capabilities
from .sync.pull import pull, pull_all
from .sync.push import Pusher, PushResult, PushSummary, push
from .sync.state import StateStore

__all__ = [
    "CANONICAL",
    "AdverseEvent",
    "AdverseEventCode",
    "Assessment",
    "AsyncFhirClient",
    "AuthenticationError",
    "BadRequestError",
    "BearerAuth",
    "BulkProgress",
    "Check",
    "ClientCredentialsAuth",
    "ClientOptions",
    "Clinic",
    "ConfigurationError",
    "ConflictError",
    "ConnectError",
    "Consent",
    "Diagnosis",
    "DiagnosisCode",
    "ElectricalStimulation",
    "Encounter",
    "FhirClient",
    "FhirError",
    "FieldIssue",
    "Finding",
    "GoneError",
    "HumanName",
    "Identifier",
    "ImsFhirError",
    "InvalidResponseError",
    "MappingError",
    "MappingReport",
    "MuscleCode",
    "NdjsonPerType",
    "NeedleResponseCode",
    "NeedledSite",
    "NotFoundError",
    "Outcome",
    "PainScore",
    "PainTimingCode",
    "Patient",
    "PermissionDeniedError",
    "Practitioner",
    "ProtocolError",
    "PushResult",
    "PushSummary",
    "Pusher",
    "RateLimitError",
    "ReadRecord",
    "RecordError",
    "RecordLocation",
    "RetryPolicy",
    "ServerError",
    "SeverityCode",
    "SideCode",
    "SignCode",
    "SiteRoleCode",
    "SkippedResource",
    "SmartBackendAuth",
    "SpinalLevelCode",
    "StateError",
    "StateStore",
    "StatusError",
    "Terminology",
    "TimeoutException",
    "TokenAuth",
    "TransportError",
    "Treatment",
    "TrophedemaTestCode",
    "UnprocessableEntityError",
    "UnsafeServerError",
    "VersionConflictError",
    "VisitTypeCode",
    "__version__",
    "bulk_pull",
    "bulk_pull_all",
    "check_capabilities",
    "from_fhir",
    "from_questionnaire_response",
    "pull",
    "pull_all",
    "push",
    "read_records",
    "rebuild_ndjson",
    "record_json_schema",
    "synthetic_encounters",
    "terminology",
    "to_fhir",
    "to_fhir_json",
    "to_questionnaire_response",
    "to_resources",
    "to_transaction",
    "validate_record",
]

# Tracebacks and reprs name the public module (ims_fhir.ConnectError), not the private one.
for _name in __all__:
    _member = globals()[_name]
    if isinstance(_member, type) or callable(_member):
        _member.__module__ = __name__
del _name, _member
