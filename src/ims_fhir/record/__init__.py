"""The record layer: the IMS encounter record, its vocabulary, and reading records from files.

The bottom layer: it imports nothing else of ims-fhir but the shared ``_exceptions`` and
``_version``. ``mapping`` builds on it. Internal: the public API is :mod:`ims_fhir` itself.
"""
