"""The single source of ims-fhir's version."""

__version__ = "0.1.0"
