"""The sync layer: push records to a FHIR server and pull them back, with the local state store.

Imports the record, mapping and client layers; the command line builds on it. Internal: the
public API is :mod:`ims_fhir` itself.
"""
