"""The mapping layer: IMS records to FHIR R4 resources and back, and the published artifacts.

Imports the record layer only; the client, the sync engine and the command line build on it.
Internal: the public API is :mod:`ims_fhir` itself.
"""
