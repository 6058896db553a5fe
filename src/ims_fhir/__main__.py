"""``python -m ims_fhir``: the command line."""

from ._cli import main

main()
