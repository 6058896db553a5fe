"""The client layer: the FHIR HTTP client, asynchronous and blocking, with its authentication.

It knows HTTP and FHIR's REST API, not IMS records; the sync engine and the command line build
on it. Internal: the public API is :mod:`ims_fhir` itself.
"""
