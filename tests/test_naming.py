"""File-name and prompt templates: the safe template language, and names that never leave the output folder."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchgen.manifest import naming


def relpath(template: str, *, metadata: dict[str, str] | None = None, variant: dict[str, str] | None = None,
            item_id: str = "SKU1", index: int = 1) -> str:
    return naming.image_relpath(template, item_id=item_id, variant=variant or {}, metadata=metadata or {},
                                model="gemini-3.1-flash-image-preview", key="v1-abc", index=index)


def test_default_template_joins_variant_values_and_is_one_based() -> None:
    path = relpath("{id}{variant}_{index}", variant={"style": "studio", "size": "16:9"}, index=1)
    assert path == "SKU1_16_9_studio_1"


def test_variant_joins_values_by_variable_name_whatever_the_matrix_order() -> None:
    # The store gives a request's variant back with sorted keys; the manifest's matrix may list them in any
    # order. The name planned at expansion and the name written at download must be the same.
    in_matrix_order = relpath("{id}{variant}_{index}", variant={"style": "studio", "size": "4:5"})
    as_stored = relpath("{id}{variant}_{index}", variant={"size": "4:5", "style": "studio"})
    assert in_matrix_order == as_stored == "SKU1_4_5_studio_1"


def test_template_slash_makes_subfolders_but_a_value_slash_does_not() -> None:
    path = relpath("{category}/{id}_{index}", metadata={"category": "shoes/men"}, item_id="a/b")
    assert path == "shoes_men/a_b_1"


def test_builtin_fields_model_key_index() -> None:
    assert relpath("{model}/{key}-{index}", index=3) == "gemini-3.1-flash-image-preview/v1-abc-3"


def test_builtins_win_over_item_fields_of_the_same_name() -> None:
    assert relpath("{id}_{index}", metadata={"id": "other", "index": "9"}) == "SKU1_1"


@pytest.mark.parametrize("template", ["../{id}", "out/../../{id}", "/etc/{id}", "C:{id}", "a\\{id}", "a//{id}",
                                      "./{id}"])
def test_templates_that_escape_are_refused(template: str) -> None:
    with pytest.raises(ValueError):
        naming.check_filename_template(template)
    with pytest.raises(ValueError):
        relpath(template)


@pytest.mark.parametrize("value", ["..", "."])
def test_a_value_that_is_a_dot_segment_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="stay inside"):
        relpath("{category}/{id}", metadata={"category": value})


def test_an_empty_value_as_a_whole_segment_is_refused() -> None:
    with pytest.raises(ValueError, match="empty folder name"):
        relpath("x/{category}/{id}", metadata={"category": ""})


@pytest.mark.parametrize("value", ["../../etc/passwd", "/etc/passwd", "C:\\Windows", "a\x00b", "line\nbreak"])
def test_hostile_values_are_sanitised_into_one_segment(value: str) -> None:
    path = relpath("x/{v}", metadata={"v": value})
    assert path.startswith("x/")
    assert path.count("/") == 1
    assert "\\" not in path and "\x00" not in path and "\n" not in path


def test_missing_field_names_the_field_and_what_is_available() -> None:
    with pytest.raises(ValueError, match=r"\{colour\}.*available: .*category"):
        relpath("{colour}_{index}", metadata={"category": "x"})


@pytest.mark.parametrize("template", ["{a.__class__}", "{a[0]}", "{a!r}", "{a:>10}", "{}", "{0}", "{a", "a}"])
def test_only_plain_fields_are_allowed(template: str) -> None:
    with pytest.raises(ValueError):
        naming.compile_template(template)


def test_literal_braces_and_render() -> None:
    tpl = naming.compile_template("{{x}} {a} {b} {a}")
    assert tpl.fields == ("a", "b")
    assert tpl.render({"a": "1", "b": "2"}) == "{x} 1 2 1"
    with pytest.raises(KeyError):
        tpl.render({"a": "1"})


def test_template_without_fields_is_refused_for_file_names() -> None:
    with pytest.raises(ValueError, match="same name"):
        naming.check_filename_template("image")


def test_overlong_segment_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than"):
        relpath("{v}", metadata={"v": "x" * 300})


field_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)


@given(metadata=st.dictionaries(st.sampled_from(["a", "b", "cat"]), field_text, max_size=3),
       variant=st.dictionaries(st.sampled_from(["style", "size"]), field_text, max_size=2),
       item_id=field_text, n=st.integers(1, 4),
       template=st.sampled_from(["{id}{variant}_{index}", "{cat}/{id}_{index}", "{a}/{b}/{style}-{index}",
                                 "{model}/{key}_{index}", "x/{id}"]))
def test_name_renderer_agrees_with_image_relpath(metadata: dict[str, str], variant: dict[str, str], item_id: str,
                                                 n: int, template: str) -> None:
    """The manifest's fast renderer and the downloader's image_relpath give the same names or both refuse."""
    kwargs = {"item_id": item_id, "variant": variant, "metadata": metadata, "model": "m", "key": "k"}
    expected: list[str] | type[ValueError]
    try:
        expected = [naming.image_relpath(template, index=i, **kwargs) for i in range(1, n + 1)]  # type: ignore[arg-type]
    except ValueError:
        expected = ValueError
    try:
        got: list[str] | type[ValueError] = naming.NameRenderer(template).paths(n=n, **kwargs)  # type: ignore[arg-type]
    except ValueError:
        got = ValueError
    if got is not ValueError and expected is ValueError:
        pytest.fail(f"renderer accepted what image_relpath refused: {got}")
    assert got == expected or (expected is ValueError and got is ValueError)
    if isinstance(got, list):
        for path in got:
            assert not path.startswith("/")
            assert ".." not in path.split("/")


def test_fast_path_check_agrees_with_the_full_check() -> None:
    """check_relpath skips the segment walk for ordinary names; it must refuse exactly what the walk does."""
    import itertools

    alphabet = ["a", ".", "/", "\\", " ", "C:", "\x00", "..", "é"]
    for length in range(1, 5):
        for parts in itertools.product(alphabet, repeat=length):
            path = "".join(parts)
            outcomes = []
            for check in (naming.check_relpath, naming._check_relpath_slow):
                try:
                    outcomes.append(check(path))
                except ValueError:
                    outcomes.append(None)
            assert outcomes[0] == outcomes[1], repr(path)
