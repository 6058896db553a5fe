"""``python -m ims_fhir``: the command line."""

from .cli.commands import main

main()
