"""ims-fhir: IMS encounters to FHIR R4 and back, and in sync with FHIR servers."""

from ._exceptions import FieldIssue, ImsFhirError, MappingError, RecordError, RecordLocation
from ._from_fhir import MappingReport, SkippedResource, from_fhir
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
from ._to_fhir import to_fhir, to_fhir_json, to_resources, to_transaction
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
    "MappingReport",
    "NeedledSite",
    "PainScore",
    "Patient",
    "Practitioner",
    "ReadRecord",
    "RecordError",
    "RecordLocation",
    "SkippedResource",
    "Terminology",
    "Treatment",
    "__version__",
    "from_fhir",
    "read_records",
    "record_json_schema",
    "terminology",
    "to_fhir",
    "to_fhir_json",
    "to_resources",
    "to_transaction",
    "validate_record",
]
