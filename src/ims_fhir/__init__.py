"""ims-fhir: IMS encounters to FHIR R4 and back, and in sync with FHIR servers."""

from ._async_client import AsyncFhirClient
from ._auth import BearerAuth, ClientCredentialsAuth, SmartBackendAuth, TokenAuth
from ._check import Check, check_capabilities
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
from ._from_fhir import MappingReport, SkippedResource, from_fhir
from ._http import ClientOptions, Outcome, RetryPolicy
from ._pull import pull, pull_all
from ._reader import ReadRecord, read_records, validate_record
from ._record import (
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
from ._schema import record_json_schema
from ._state import StateStore
from ._sync import Pusher, PushResult, PushSummary, push
from ._sync_client import FhirClient
from ._synthetic import synthetic_encounters
from ._terminology import CANONICAL, Terminology, terminology
from ._to_fhir import to_fhir, to_fhir_json, to_resources, to_transaction
from ._version import __version__

__all__ = [
    "CANONICAL",
    "AdverseEvent",
    "Assessment",
    "AsyncFhirClient",
    "AuthenticationError",
    "BadRequestError",
    "BearerAuth",
    "Check",
    "ClientCredentialsAuth",
    "ClientOptions",
    "Clinic",
    "ConfigurationError",
    "ConflictError",
    "ConnectError",
    "Consent",
    "Diagnosis",
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
    "NeedledSite",
    "NotFoundError",
    "Outcome",
    "PainScore",
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
    "SkippedResource",
    "SmartBackendAuth",
    "StateError",
    "StateStore",
    "StatusError",
    "Terminology",
    "TimeoutException",
    "TokenAuth",
    "TransportError",
    "Treatment",
    "UnprocessableEntityError",
    "UnsafeServerError",
    "VersionConflictError",
    "__version__",
    "check_capabilities",
    "from_fhir",
    "pull",
    "pull_all",
    "push",
    "read_records",
    "record_json_schema",
    "synthetic_encounters",
    "terminology",
    "to_fhir",
    "to_fhir_json",
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
