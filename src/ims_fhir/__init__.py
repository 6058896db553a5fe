"""ims-fhir: IMS encounters to FHIR R4 and back, and in sync with FHIR servers."""

from ._exceptions import FieldIssue, ImsFhirError, MappingError, RecordError, RecordLocation
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
from ._terminology import CANONICAL, Terminology, terminology
from ._version import __version__

__all__ = [
    "CANONICAL",
    "AdverseEvent",
    "Assessment",
    "Clinic",
    "Consent",
    "Diagnosis",
    "ElectricalStimulation",
    "Encounter",
    "FieldIssue",
    "Finding",
    "HumanName",
    "Identifier",
    "ImsFhirError",
    "MappingError",
    "NeedledSite",
    "PainScore",
    "Patient",
    "Practitioner",
    "ReadRecord",
    "RecordError",
    "RecordLocation",
    "Terminology",
    "Treatment",
    "__version__",
    "read_records",
    "record_json_schema",
    "terminology",
    "validate_record",
]
