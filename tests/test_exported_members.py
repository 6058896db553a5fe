import ims_fhir


def test_all_is_sorted_and_complete() -> None:
    assert ims_fhir.__all__ == sorted(ims_fhir.__all__, key=lambda n: (not n.isupper(), n))
    public = {
        name
        for name in dir(ims_fhir)
        if not name.startswith("_") and not isinstance(getattr(ims_fhir, name), type(ims_fhir))
    }
    assert public | {"__version__"} == set(ims_fhir.__all__)


def test_every_exported_member_names_the_public_module() -> None:
    # Defined in private modules, shown as ims_fhir.X in tracebacks and reprs (as httpx does).
    for name in ims_fhir.__all__:
        member = getattr(ims_fhir, name)
        if isinstance(member, type) or callable(member):
            assert member.__module__ == "ims_fhir", name


def test_an_error_in_a_traceback_names_the_public_module() -> None:
    import traceback

    try:
        raise ims_fhir.ConnectError("down")
    except ims_fhir.ConnectError as exc:
        text = "".join(traceback.format_exception(exc))
    assert "ims_fhir.ConnectError: down" in text
    assert "_exceptions" not in text.splitlines()[-1]
