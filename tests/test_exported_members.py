import ims_fhir


def test_all_is_sorted_and_complete() -> None:
    assert ims_fhir.__all__ == sorted(ims_fhir.__all__, key=lambda n: (not n.isupper(), n))
    public = {
        name
        for name in dir(ims_fhir)
        if not name.startswith("_") and not isinstance(getattr(ims_fhir, name), type(ims_fhir))
    }
    assert public | {"__version__"} == set(ims_fhir.__all__)


def test_every_exported_member_lives_in_a_private_module() -> None:
    for name in ims_fhir.__all__:
        member = getattr(ims_fhir, name)
        module = getattr(member, "__module__", None)
        if module is not None and module.startswith("ims_fhir"):
            assert module.split(".")[1].startswith("_"), name
