"""The command line layer: ``ims-fhir`` and its configuration, a thin layer over the library.

The top layer: it may import every other one, and none imports it. Internal: the public API is
:mod:`ims_fhir` itself.
"""
