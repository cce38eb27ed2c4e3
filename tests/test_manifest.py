"""Manifests: expansion rules, stable keys, and every bad input of issue 4 with file, place and field."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from batchgen import catalog
from batchgen.errors import ManifestError, Problem
from batchgen.manifest.load import load_job, open_manifest, validate
from batchgen.models import GenerationRequest, PlannedRequest, request_key

NB2 = catalog.NANO_BANANA_2


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def png(path: Path, fmt: str = "PNG") -> Path:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 120, 200)).save(buf, format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def expand(path: Path) -> tuple[list[PlannedRequest], list[Problem]]:
    manifest = open_manifest(path)
    requests = list(manifest.requests())
    return requests, manifest.problems


def problems_of(path: Path) -> list[Problem]:
    """Every problem, whether raised at open or collected while expanding."""
    try:
        _, problems = expand(path)
    except ManifestError as error:
        return error.problems
    return problems


def only_problem(path: Path) -> Problem:
    problems = problems_of(path)
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


CATALOGUE = """\
name: cat
defaults:
  model: gemini-3.1-flash-image-preview
items_csv: products.csv
prompt: "A {style} photo of a {colour} {name}"
matrix:
  style: [studio, lifestyle]
  size: [1:1, 4:5, 16:9]
output:
  filename: "{category}/{sku}{variant}_{index}"
"""
PRODUCTS = "sku,name,colour,category\nA1,mug,blue,kitchen\nA2,lamp,yellow,home\n"


@pytest.fixture
def catalogue(tmp_path: Path) -> Path:
    write(tmp_path / "products.csv", PRODUCTS)
    return write(tmp_path / "cat.yaml", CATALOGUE)


# --- expansion rules -------------------------------------------------------------------------------


def test_catalogue_expands_items_times_matrix(catalogue: Path) -> None:
    requests, problems = expand(catalogue)
    assert problems == []
    assert len(requests) == 2 * 2 * 3
    first = requests[0]
    assert first.item_id == "A1"  # sku picked as the id
    assert first.variant == {"style": "studio", "size": "1:1"}  # unquoted 1:1 is not YAML base-60
    assert first.request.size == "1:1"
    assert first.request.model == NB2
    assert first.request.prompt == "A studio photo of a blue mug"
    assert first.metadata == {"sku": "A1", "name": "mug", "colour": "blue", "category": "kitchen"}
    assert first.source == f"{catalogue.parent / 'products.csv'} row 2"
    assert [r.request.size for r in requests[:3]] == ["1:1", "4:5", "16:9"]


def test_every_yielded_request_passes_full_validation_and_keys_match(catalogue: Path) -> None:
    requests, _ = expand(catalogue)
    for planned in requests:
        rebuilt = GenerationRequest.model_validate(planned.request.model_dump())
        assert rebuilt == planned.request
        assert request_key(planned.item_id, planned.variant, planned.request) == planned.key
        assert PlannedRequest.model_validate(planned.model_dump()) == planned


def test_keys_are_stable_new_rows_add_keys_changed_rows_change_keys(catalogue: Path) -> None:
    before = {r.key for r in expand(catalogue)[0]}
    assert before == {r.key for r in expand(catalogue)[0]}
    write(catalogue.parent / "products.csv", PRODUCTS + "A3,sock,red,shoes\n")
    grown = {r.key for r in expand(catalogue)[0]}
    assert before < grown and len(grown - before) == 6
    write(catalogue.parent / "products.csv", PRODUCTS.replace("blue", "green") + "A3,sock,red,shoes\n")
    changed = {r.key for r in expand(catalogue)[0]}
    assert len(changed - grown) == 6  # only A1's six requests changed
    assert len(grown & changed) == 12


def test_item_columns_override_defaults(tmp_path: Path) -> None:
    write(tmp_path / "p.csv", "sku,name,model,n\nA,mug,,\nB,lamp,gpt-image-1.5,3\n")
    path = write(tmp_path / "j.yaml", "defaults: {model: z-image-turbo, n: 2}\nitems_csv: p.csv\n"
                 "prompt: 'a {name}'\n")
    requests, problems = expand(path)
    assert problems == []
    assert [(r.request.model, r.request.n) for r in requests] == [("z-image-turbo", 2), ("gpt-image-1.5", 3)]
    assert "model" not in requests[0].metadata  # parameters are not metadata


def test_matrix_variable_named_like_a_parameter_sets_it(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", "prompt: a cat\nmatrix:\n  model: [z-image-turbo, gpt-image-1]\n"
                 "  n: [1, 2]\n")
    requests, problems = expand(path)
    assert problems == []
    assert [(r.request.model, r.request.n) for r in requests] == [
        ("z-image-turbo", 1), ("z-image-turbo", 2), ("gpt-image-1", 1), ("gpt-image-1", 2)]
    assert requests[0].item_id == "j"  # no items: one item named after the job


def test_inline_items_with_override_and_template(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", """\
defaults: {model: z-image-turbo}
prompt: "{thing} in {place}"
items:
  - {id: a, thing: a cat, place: Paris}
  - {id: b, thing: a dog, place: Rome, prompt: "my own prompt", size: "9:16"}
""")
    requests, problems = expand(path)
    assert problems == []
    assert [r.request.prompt for r in requests] == ["a cat in Paris", "my own prompt"]
    assert requests[1].request.size == "9:16"
    assert requests[1].source.endswith("line 5")


def test_csv_job_bom_quotes_multiline_and_url_lists(tmp_path: Path) -> None:
    png(tmp_path / "imgs" / "a.png")
    png(tmp_path / "imgs" / "b.jpg", "JPEG")
    text = ('id,prompt,model,image_urls,shop\n'
            '1,"Edit this, please\nsecond line",qwen-image-edit,imgs/a.png|imgs/b.jpg,x\n'
            '2,plain,qwen-image-edit,"[""imgs/a.png"", ""https://e.com/x.png""]",y\n'
            '3,plain,qwen-image-edit,"imgs/a.png\nimgs/b.jpg",z\n')
    path = tmp_path / "job.csv"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    requests, problems = expand(path)
    assert problems == []
    assert requests[0].request.prompt == "Edit this, please\nsecond line"
    a, b = str(tmp_path / "imgs" / "a.png"), str(tmp_path / "imgs" / "b.jpg")
    assert requests[0].request.image_urls == (a, b)  # absolute, relative to the CSV
    assert requests[1].request.image_urls == (a, "https://e.com/x.png")
    assert requests[2].request.image_urls == (a, b)
    assert requests[0].metadata == {"id": "1", "shop": "x"}
    assert requests[0].source == f"{path} row 2"
    assert requests[1].source == f"{path} row 3"  # a multi-line cell is still one row


def test_csv_without_id_column_numbers_rows_and_skips_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "j.csv", "prompt,colour\na cat,red\n\nb dog,blue\n,\n")
    requests, problems = expand(path)
    assert problems == []
    assert [r.item_id for r in requests] == ["2", "4"]


def test_local_paths_in_yaml_resolve_against_the_manifest(tmp_path: Path) -> None:
    png(tmp_path / "photos" / "mug.png")
    png(tmp_path / "mask.png")
    path = write(tmp_path / "j.yaml", "defaults: {model: gpt-4o-image, image_urls: [photos/mug.png], "
                 "mask_url: mask.png}\nprompt: edit it\n")
    (request,), problems = expand(path)
    assert problems == []
    assert request.request.image_urls == (str(tmp_path / "photos" / "mug.png"),)
    assert request.request.mask_url == str(tmp_path / "mask.png")
    assert request.request.local_paths() == [str(tmp_path / "photos" / "mug.png"), str(tmp_path / "mask.png")]


def test_load_job_settings_and_paths(catalogue: Path) -> None:
    write(catalogue, CATALOGUE + "run:\n  rate: 300/min\n  max_credits: 50\n  fallback_models: [z-image-turbo]\n")
    job = load_job(catalogue)
    assert job.name == "cat"
    assert job.run.rate == "300/min" and job.run.max_credits == 50
    assert job.output_dir() == (catalogue.parent / "out" / "cat").resolve()
    assert job.default_db_path() == catalogue.parent / "cat.batchgen.db"
    csv_job = load_job(catalogue.parent / "products.csv")
    assert csv_job.name == "products" and csv_job.manifest_path.is_absolute()


def test_fingerprint_follows_yaml_and_csv(catalogue: Path) -> None:
    first = open_manifest(catalogue).fingerprint()
    assert open_manifest(catalogue).fingerprint() == first
    write(catalogue.parent / "products.csv", PRODUCTS + "A3,sock,red,shoes\n")
    second = open_manifest(catalogue).fingerprint()
    assert second != first
    write(catalogue, CATALOGUE.replace("studio", "bright studio"))
    assert open_manifest(catalogue).fingerprint() != second


def test_validate_summary(catalogue: Path) -> None:
    write(catalogue.parent / "products.csv", "sku,name,colour,category,model,n\nA1,mug,blue,k,,\n"
          "A2,lamp,red,h,z-image-turbo,2\n")
    summary = validate(catalogue)
    assert summary.requests == 12 and summary.images == 6 + 12
    assert summary.by_model[NB2].requests == 6
    assert summary.by_model["z-image-turbo"].images == 12
    expected = catalog.MODELS[NB2].credits_for(6) + catalog.MODELS["z-image-turbo"].credits_for(12)
    assert summary.credits == pytest.approx(expected)
    as_dict = summary.to_dict()
    assert as_dict["by_model"]["z-image-turbo"] == {"requests": 6, "images": 12, "credits": 6.0}
    json.dumps(as_dict)


def test_problems_are_capped_with_a_count_of_the_rest(tmp_path: Path) -> None:
    rows = "".join(f"{i},x,bogus-model\n" for i in range(120))
    path = write(tmp_path / "j.csv", "id,prompt,model\n" + rows)
    manifest = open_manifest(path)
    assert list(manifest.requests()) == []
    assert len(manifest.problems) == 50
    with pytest.raises(ManifestError) as raised:
        manifest.raise_if_problems()
    assert raised.value.truncated == 70
    assert "and 70 more problems" in str(raised.value)


def test_one_bad_row_does_not_hide_the_good_ones(tmp_path: Path) -> None:
    path = write(tmp_path / "j.csv", "id,prompt,size\na,cat,1:1\nb,dog,7:7\nc,eel,\n")
    requests, problems = expand(path)
    assert [r.item_id for r in requests] == ["a", "c"]
    assert [str(p) for p in problems] == [
        f'{path} row 3: size: "7:7" is not accepted by gpt-image-1.5; use one of '
        + ", ".join(catalog.MODELS["gpt-image-1.5"].sizes)]


# --- bad input: every case of issue 4 -----------------------------------------------------------------


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", "name: x\nprompt: [unclosed\nmatrix: {}\n")
    problem = only_problem(path)
    assert problem.file == str(path) and problem.location and problem.location.startswith("line ")
    assert "YAML syntax error" in problem.message


def test_yaml_syntax_error_points_where_an_unclosed_quote_starts(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", 'name: x\nprompt: "hi\nmodel: m\nitems:\n  - {id: a}\nrun: {rate: 5/s}\n')
    problem = only_problem(path)
    assert (problem.location, problem.field) == ("line 2", None)
    assert problem.message == ("YAML syntax error: the quoted text that starts here is never closed (found the "
                               "end of the file at line 7)")


def test_yaml_indentation_error_stays_at_the_line_that_breaks_it(tmp_path: Path) -> None:
    # A block mapping starts at the enclosing key (here line 1, the whole file): its start says nothing, so
    # the line PyYAML stopped at is the place, and the mapping's start is named beside it.
    path = write(tmp_path / "j.yaml", "name: x\ndefaults:\n  model: m\n size: 1:1\nprompt: hi\n")
    problem = only_problem(path)
    assert problem.location == "line 4"
    assert "(in the mapping that starts on line 1); check the indentation" in problem.message


def test_duplicate_keys_are_problems_at_any_depth_listed_with_the_others(tmp_path: Path) -> None:
    # YAML keeps the last value of a repeated key without a word; here each repeat is a problem at its line.
    path = write(tmp_path / "j.yaml", "name: x\n"
                 "base: &b {model: z-image-turbo}\n"       # line 2: an unknown key, reported too
                 "defaults:\n  <<: *b\n  model: gpt-image-1\n  n: 1\n  n: 2\n"  # a merged key is no repeat
                 'prompt: "hi {thing}"\n'
                 "items:\n  - {id: a, thing: cat, thing: dog}\n  - id: b\n    thing: cow\n    id: c\n"
                 "matrix:\n  style: [a]\n  style: [b]\n"
                 "prompt: again\n")                           # line 17
    problems = problems_of(path)
    assert [(p.location, p.field) for p in problems[:5]] == [
        ("line 7", "defaults.n"), ("line 10", "items.0.thing"), ("line 13", "items.1.id"),
        ("line 16", "matrix.style"), ("line 17", "prompt")], [str(p) for p in problems]
    assert problems[0].message.startswith("is set again (also set on line 6)")
    assert "also set earlier on this line" in problems[1].message
    assert "also set on line 8" in problems[4].message
    assert ("line 2", "base") in [(p.location, p.field) for p in problems[5:]]
    with pytest.raises(ManifestError) as raised:
        load_job(path)
    assert [p.field for p in raised.value.problems][:5] == [p.field for p in problems[:5]]


def test_a_key_repeated_at_the_top_level_is_refused(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "j.yaml", "name: x\nprompt: hi\nprompt: again\n"))
    assert (problem.file, problem.location, problem.field) == (str(tmp_path / "j.yaml"), "line 3", "prompt")
    assert "line 2" in problem.message


def test_unknown_keys_name_line_key_and_allowed_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", "prompt: a cat\nmatirx:\n  style: [a]\nrun:\n  ratee: 5/s\n")
    problems = problems_of(path)
    assert [(p.location, p.field) for p in problems] == [("line 2", "matirx"), ("line 5", "run.ratee")]
    assert "allowed keys: name, defaults, prompt" in problems[0].message
    assert "rate" in problems[1].message


def test_missing_prompt_yaml_without_template(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "j.yaml", "defaults: {model: z-image-turbo}\n"))
    assert problem.field == "prompt" and "missing" in problem.message


def test_missing_prompt_inline_item(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", "items:\n  - {id: a, prompt: ok}\n  - {id: b}\n")
    problem = only_problem(path)
    assert (problem.location, problem.field) == ("line 3", "prompt")


def test_missing_prompt_empty_cell(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "j.csv", "id,prompt\na,cat\nb,  \n"))
    assert (problem.location, problem.field) == ("row 3", "prompt")
    # A CSV job has no manifest to hold a template: the hint says where its prompt goes.
    assert "prompt column" in problem.message and "template" not in problem.message


def test_missing_prompt_in_yaml_items_csv_suggests_a_template(tmp_path: Path) -> None:
    write(tmp_path / "items.csv", "id,prompt\na,cat\nb,\n")
    problem = only_problem(write(tmp_path / "j.yaml", "items_csv: items.csv\n"))
    assert problem.field == "prompt" and "prompt: (a template)" in problem.message


def test_csv_without_prompt_column(tmp_path: Path) -> None:
    path = write(tmp_path / "j.csv", "id,description\na,cat\n")
    problem = only_problem(path)
    assert problem.file == str(path) and problem.field == "prompt"
    assert "no prompt column" in problem.message and "id, description" in problem.message


def test_items_csv_without_prompt_column_or_template(tmp_path: Path) -> None:
    write(tmp_path / "p.csv", "sku,name\nA,mug\n")
    problem = only_problem(write(tmp_path / "j.yaml", "items_csv: p.csv\n"))
    assert problem.field == "prompt" and "prompt column" in problem.message


def test_template_field_missing_from_csv_columns_is_one_file_level_problem(tmp_path: Path) -> None:
    write(tmp_path / "p.csv", "sku,name\nA,mug\nB,lamp\n")
    path = write(tmp_path / "j.yaml", "items_csv: p.csv\nprompt: 'a {colour} {name}'\n")
    problem = only_problem(path)
    assert problem.file == str(path) and problem.location == "line 2" and problem.field == "prompt"
    assert "{colour}" in problem.message and "sku" in problem.message


def test_template_field_an_inline_item_lacks(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", "prompt: 'a {colour} {name}'\nitems:\n  - {id: a, name: mug, colour: red}\n"
                 "  - {id: b, name: lamp}\n")
    problem = only_problem(path)
    assert (problem.location, problem.field) == ("line 4", "prompt")
    assert "{colour}" in problem.message and "has: id, name" in problem.message


def test_template_field_empty_in_a_row(tmp_path: Path) -> None:
    write(tmp_path / "p.csv", "sku,name,colour\nA,mug,red\nB,lamp,\n")
    problem = only_problem(write(tmp_path / "j.yaml", "items_csv: p.csv\nprompt: 'a {colour} {name}'\n"))
    assert problem.file == str(tmp_path / "p.csv") and problem.location == "row 3"
    assert "{colour}" in problem.message


def test_a_rows_fields_are_its_columns_and_the_shared_fields_apart(tmp_path: Path) -> None:
    # The CSV has no id column (sku is the id): "it has: id, sku" named a column that is not there.
    write(tmp_path / "p.csv", "sku,name,colour\nA,mug,red\nB,lamp,\n")
    path = write(tmp_path / "j.yaml", "items_csv: p.csv\nprompt: 'a {colour} {style} {name}'\n"
                 "matrix: {style: [flat]}\n")
    problem = only_problem(path)
    assert problem.location == "row 3"
    assert problem.message == ("the template uses {colour}, which this item does not have or leaves empty; "
                               "it has: name, sku; every item also has {id}, {style}")


def test_a_template_without_items_fills_matrix_variables_and_id(tmp_path: Path) -> None:
    # Without items the job is one item whose id is the job name (docs/manifest.md): {id} and the matrix
    # variables are all a template can use, and both are there.
    path = write(tmp_path / "j.yaml", "name: mx2\nprompt: hi {style} from {id}\nmatrix: {style: [a, b]}\n")
    requests, problems = expand(path)
    assert problems == []
    assert [(r.item_id, r.request.prompt) for r in requests] == [("mx2", "hi a from mx2"), ("mx2", "hi b from mx2")]
    requests, problems = expand(write(tmp_path / "k.yaml", "name: solo\nprompt: hi {id}\n"))
    assert problems == [] and [r.request.prompt for r in requests] == ["hi solo"]


def test_a_template_without_items_names_only_the_fields_it_cannot_fill(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", "name: mx\nprompt: '{style} {colour} {id} {colour}'\nmatrix: {style: [a]}\n")
    problem = only_problem(path)
    assert (problem.location, problem.field) == ("line 2", "prompt")
    assert problem.message.startswith("the template uses {colour}, which is neither a matrix variable nor {id}")
    assert "{style}" not in problem.message and "no items" in problem.message


def test_unsafe_template_syntax_is_refused(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "j.yaml", "prompt: '{name.__class__}'\nitems: [{name: a}]\n"))
    assert problem.field == "prompt" and "only plain {field}" in problem.message


def test_unknown_model(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "j.csv", "id,prompt,model\na,cat,gpt-5-image\n"))
    assert (problem.location, problem.field) == ("row 2", "model")
    assert problem.message.startswith('"gpt-5-image" is not in the catalogue; use one of ')
    assert NB2 in problem.message


def test_unknown_model_in_defaults_names_yaml_line(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", "prompt: a\ndefaults:\n  model: banana\nitems: [{id: x}]\n")
    problem = only_problem(path)
    assert problem.field == "model" and '"banana"' in problem.message


def test_bad_size_for_model_message_matches_the_issue(tmp_path: Path) -> None:
    path = write(tmp_path / "products.csv", "sku,prompt,model,size\n" + "".join(
        f"S{i},cat,{NB2},1:1\n" for i in range(15)) + f"S17,cat,{NB2},1024x1024\n")
    problem = only_problem(path)
    assert str(problem).startswith(f'{path} row 17: size: "1024x1024" is not accepted by {NB2}; use one of 1:1, '
                                   "16:9, ")


def test_pixel_size_is_fine_for_gpt_models(tmp_path: Path) -> None:
    requests, problems = expand(write(tmp_path / "j.csv", "prompt,model,size\ncat,gpt-image-1,1024x1536\n"))
    assert problems == [] and requests[0].request.size == "1024x1536"


@pytest.mark.parametrize("n", ["0", "5", "-1"])
def test_n_out_of_range(tmp_path: Path, n: str) -> None:
    problem = only_problem(write(tmp_path / "j.csv", f"prompt,n\ncat,{n}\n"))
    assert (problem.location, problem.field) == ("row 2", "n")
    assert problem.message == f"{n} is out of range; use 1 to 4"


def test_n_not_a_number(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "j.csv", "prompt,n\ncat,two\n"))
    assert problem.field == "n" and '"two" is not a whole number' in problem.message


def test_n_out_of_range_in_matrix_is_reported_once_per_item(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", "prompt: cat\nmatrix:\n  n: [1, 9]\n  style: [a, b]\n")
    problems = problems_of(path)
    assert [(p.field, p.message) for p in problems] == [("n", "9 is out of range; use 1 to 4")]


def test_too_many_reference_images(tmp_path: Path) -> None:
    urls = "|".join(f"https://example.com/{i}.png" for i in range(15))
    problem = only_problem(write(tmp_path / "j.csv", f"prompt,model,image_urls\ncat,qwen-image-edit,{urls}\n"))
    assert (problem.location, problem.field) == ("row 2", "image_urls")
    assert "15 reference images; at most 14" in problem.message


def test_mask_on_a_model_without_masks(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "j.csv", "prompt,model,mask_url,image_urls\n"
                                 f"cat,{NB2},https://e.com/m.png,https://e.com/a.png\n"))
    assert problem.field == "mask_url" and "not supported by" in problem.message
    assert "gpt-4o-image" in problem.message


def test_editing_model_without_reference_images(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "j.csv", "prompt,model\ncat,qwen-image-edit\n"))
    assert (problem.location, problem.field) == ("row 2", "image_urls")
    assert "editing model" in problem.message


def test_prompt_over_2000_characters(tmp_path: Path) -> None:
    long = "x" * 2001
    problem = only_problem(write(tmp_path / "j.csv", f"prompt\n{'y' * 2000}\n{long}\n"))
    assert (problem.location, problem.field) == ("row 3", "prompt")
    assert "2001 characters" in problem.message and "at most 2000" in problem.message


def test_template_that_renders_over_2000_characters(tmp_path: Path) -> None:
    write(tmp_path / "p.csv", f"sku,text\nA,{'z' * 1996}\n")
    problem = only_problem(write(tmp_path / "j.yaml", "items_csv: p.csv\nprompt: 'long {text}'\n"))
    assert problem.location == "row 2" and "2000" in problem.message


def test_missing_local_image(tmp_path: Path) -> None:
    path = write(tmp_path / "j.csv", "sku,prompt,model,image_urls\nA,cat,qwen-image-edit,photos/missing.png\n")
    problem = only_problem(path)
    assert (problem.file, problem.location, problem.field) == (str(path), "row 2", "image_urls")
    assert str(tmp_path / "photos" / "missing.png") in problem.message and "does not exist" in problem.message


def test_oversized_local_image(tmp_path: Path) -> None:
    big = png(tmp_path / "big.png")
    with big.open("ab") as fh:
        fh.write(b"\x00" * (catalog.MAX_REFERENCE_IMAGE_BYTES + 10))
    problem = only_problem(write(tmp_path / "j.csv", "prompt,model,image_urls\ncat,qwen-image-edit,big.png\n"))
    assert problem.field == "image_urls" and "at most 4 MB" in problem.message


def test_local_file_that_is_not_an_image(tmp_path: Path) -> None:
    write(tmp_path / "fake.jpg", "not really a jpeg")
    problem = only_problem(write(tmp_path / "j.csv", "prompt,model,image_urls\ncat,qwen-image-edit,fake.jpg\n"))
    assert "use a JPEG, PNG or WebP" in problem.message


def test_missing_local_image_in_yaml_defaults_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", "prompt: a\ndefaults:\n  model: qwen-image-edit\n  image_urls: [gone.png]\n"
                 "items:\n  - {id: a}\n  - {id: b}\n")
    problems = problems_of(path)
    assert len(problems) == 2  # one per item: each request would fail
    assert all(p.field == "image_urls" and "does not exist" in p.message for p in problems)


def test_shared_photo_is_checked_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    png(tmp_path / "p.png")
    calls: list[Path] = []
    import batchgen.manifest.localfiles as lf

    real = lf.check_reference_image

    def counting(path: Path, *, mask: bool = False) -> str:
        calls.append(path)
        return real(path, mask=mask)

    monkeypatch.setattr(lf, "check_reference_image", counting)
    rows = "".join(f"{i},edit,qwen-image-edit,p.png\n" for i in range(50))
    requests, problems = expand(write(tmp_path / "j.csv", "id,prompt,model,image_urls\n" + rows))
    assert problems == [] and len(requests) == 50
    assert calls == [tmp_path / "p.png"]


def test_non_http_scheme_is_refused(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "j.csv", "prompt,model,image_urls\ncat,qwen-image-edit,ftp://x/a.png\n"))
    assert problem.field == "image_urls" and "neither an http(s) URL nor a local file path" in problem.message


def test_duplicate_item_ids_in_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "p.csv", "sku,prompt\nA,cat\nB,dog\nA,eel\nC,fox\nA,gnu\n")
    problem = only_problem(path)
    assert (problem.file, problem.location, problem.field) == (str(path), "rows 4, 6", "sku")
    assert '"A" is already used by row 2' in problem.message


def test_duplicate_item_ids_inline(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", "prompt: a\nitems:\n  - {id: x}\n  - {id: y}\n  - {id: x}\n")
    problem = only_problem(path)
    assert (problem.location, problem.field) == ("line 5", "id")
    assert "line 3" in problem.message


def test_explicit_id_field_missing_from_csv(tmp_path: Path) -> None:
    write(tmp_path / "p.csv", "sku,prompt\nA,cat\n")
    problem = only_problem(write(tmp_path / "j.yaml", "items_csv: p.csv\nid_field: code\n"))
    assert problem.field == "id_field" and '"code" is not a column' in problem.message


def test_empty_id_cell(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "j.csv", "id,prompt\na,cat\n,dog\n"))
    assert (problem.location, problem.field) == ("row 3", "id")


def test_empty_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "j.csv", "")
    problem = only_problem(path)
    assert problem.file == str(path) and "is empty" in problem.message


def test_csv_with_header_only(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "j.csv", "id,prompt\n"))
    assert "no rows" in problem.message


def test_missing_items_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", "prompt: a\nitems_csv: nowhere.csv\n")
    problem = only_problem(path)
    assert (problem.file, problem.location, problem.field) == (str(path), "line 2", "items_csv")
    assert "does not exist" in problem.message


def test_missing_manifest_and_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        open_manifest(tmp_path / "none.yaml")
    with pytest.raises(ManifestError, match="not a manifest type"):
        load_job(write(tmp_path / "j.txt", "x"))


@pytest.mark.parametrize("filename", ["../{sku}_{index}", "/tmp/{sku}_{index}", "{sku}/../../x_{index}"])
def test_filename_template_that_escapes(tmp_path: Path, filename: str) -> None:
    write(tmp_path / "p.csv", "sku,prompt\nA,cat\n")
    path = write(tmp_path / "j.yaml", f"items_csv: p.csv\noutput:\n  filename: '{filename}'\n")
    problem = only_problem(path)
    assert (problem.file, problem.location, problem.field) == (str(path), "line 3", "output.filename")
    assert "inside the output folder" in problem.message or "absolute" in problem.message


def test_untrusted_csv_values_cannot_escape(tmp_path: Path) -> None:
    write(tmp_path / "p.csv", "sku,category,prompt\nA,../../../etc,cat\nB,..,dog\n")
    path = write(tmp_path / "j.yaml", "items_csv: p.csv\noutput:\n  filename: '{category}/{sku}_{index}'\n")
    requests, problems = expand(path)
    assert [r.item_id for r in requests] == ["A"]  # "../../../etc" is sanitised to one segment
    assert [(p.location, p.field) for p in problems] == [("row 3", "output.filename")]
    assert "stay inside the output folder" in problems[0].message


def test_unknown_filename_field(tmp_path: Path) -> None:
    write(tmp_path / "p.csv", "sku,prompt\nA,cat\n")
    problem = only_problem(write(tmp_path / "j.yaml", "items_csv: p.csv\noutput: {filename: '{colour}_{index}'}\n"))
    assert problem.field == "output.filename" and "{colour}" in problem.message


def test_two_requests_writing_the_same_file(tmp_path: Path) -> None:
    write(tmp_path / "p.csv", "sku,category,prompt\nA,x,cat\nB,x,dog\n")
    path = write(tmp_path / "j.yaml", "items_csv: p.csv\nmatrix: {style: [a, b]}\n"
                 "output: {filename: '{category}/{style}_{index}'}\n")
    problems = problems_of(path)
    assert len(problems) == 2
    assert {p.location for p in problems} == {"row 3"}
    assert all(p.field == "output.filename" and "row 2" in p.message for p in problems)


def test_template_without_index_and_n_above_one_collides(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "j.yaml", "prompt: a\ndefaults: {n: 2}\noutput: {filename: '{id}'}\n"))
    assert problem.field == "output.filename" and "{index}" in problem.message


def test_names_differing_only_in_case_collide(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "j.csv", "sku,prompt\nab,cat\nAB,dog\n"))
    assert problem.field == "output.filename" and problem.location == "row 3"


def test_run_settings_are_checked(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", "prompt: a\nrun:\n  rate: fast\n  max_wait: soon\n"
                 "  fallback_models: [z-image-turbo, nope]\n  concurrency: 0\n")
    problems = problems_of(path)
    # A bad value in run: does not hide the others: all four come back together.
    assert {(p.location, p.field) for p in problems} == {
        ("line 6", "run.concurrency"), ("line 3", "run.rate"), ("line 4", "run.max_wait"),
        ("line 5", "run.fallback_models")}
    write(path, "prompt: a\nrun:\n  rate: fast\n  max_wait: soon\n  fallback_models: [z-image-turbo, nope]\n")
    problems = problems_of(path)
    assert [(p.location, p.field) for p in problems] == [
        ("line 3", "run.rate"), ("line 4", "run.max_wait"), ("line 5", "run.fallback_models")]
    assert '"nope" is not in the catalogue' in problems[2].message


def test_matrix_problems(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", "prompt: a\nmatrix:\n  style: []\n  prompt: [x]\n  index: [1]\n"
                 "  size: [1:1, 1:1]\n")
    problems = problems_of(path)
    assert [p.field for p in problems] == ["matrix.style", "matrix.prompt", "matrix.index", "matrix.size"]
    assert "empty" in problems[0].message and "twice" in problems[3].message


def test_matrix_variable_clashing_with_a_csv_column(tmp_path: Path) -> None:
    write(tmp_path / "p.csv", "sku,size,prompt\nA,1:1,cat\n")
    problem = only_problem(write(tmp_path / "j.yaml", "items_csv: p.csv\nmatrix: {size: [1:1, 16:9]}\n"))
    assert problem.location == "row 1" and problem.field == "size"


def test_both_items_and_items_csv(tmp_path: Path) -> None:
    write(tmp_path / "p.csv", "sku,prompt\nA,cat\n")
    problem = only_problem(write(tmp_path / "j.yaml", "items_csv: p.csv\nitems: [{id: a, prompt: b}]\n"))
    assert problem.field == "items_csv" and "not both" in problem.message


def test_wrong_type_in_schema(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", "prompt: a\ndefaults:\n  n: many\nmatrix: [a, b]\n")
    problems = problems_of(path)
    assert [(p.location, p.field) for p in problems] == [("line 3", "defaults.n"), ("line 4", "matrix")]
    assert problems[0].message == 'expected a whole number, got the text "many"'


def test_type_errors_name_the_bad_value_and_what_is_allowed(tmp_path: Path) -> None:
    # In the manifest's words, never pydantic's ("Input should be a valid string").
    path = write(tmp_path / "j.yaml", "prompt: a\n"
                 "defaults: {model: 5}\n"                     # line 2
                 "matrix: [1, 2]\n"                           # line 3
                 "items: [{id: a}]\n"
                 "run:\n  concurrency: 0\n  regenerate_expired: maybe\n"  # lines 6, 7
                 "quality:\n  on_fail: nope\n")              # line 9
    assert [(p.location, p.field, p.message) for p in problems_of(path)] == [
        ("line 2", "defaults.model", "expected text, got the number 5 (put it in quotes if it is meant as text)"),
        ("line 3", "matrix", "expected a mapping of parameter or field name to a list of values "
                             "(style: [studio, lifestyle]), got a list: [1, 2]"),
        ("line 6", "run.concurrency", "0 is too small; use at least 1"),
        ("line 7", "run.regenerate_expired", 'expected true or false, got the text "maybe"'),
        ("line 9", "quality.on_fail", '"nope" is not allowed; use \'regenerate\' or \'keep\''),
    ]


def test_a_value_no_type_fits_is_one_problem_at_its_place(tmp_path: Path) -> None:
    # A matrix value may be text, a number or true/false: pydantic fails it once per type, under made-up
    # places (matrix.style.1.str, ...int); that is one mistake.
    long_list = "[" + ", ".join(["x" * 10] * 10) + "]"
    path = write(tmp_path / "j.yaml", f"prompt: a\nmatrix:\n  style: [a, {long_list}]\n  size: 1:1\n")
    problems = problems_of(path)
    assert [(p.location, p.field) for p in problems] == [("line 3", "matrix.style.1"), ("line 4", "matrix.size")]
    assert problems[0].message.startswith('expected one value: text, a number or true/false, got a list: ["xxxx')
    assert problems[0].message.endswith("...") and len(problems[0].message) < 130
    assert problems[1].message == 'expected a list of values ([a, b]), got the text "1:1"'


def test_manifest_that_is_not_a_mapping(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "j.yaml", "- a\n- b\n"))
    assert "must be a mapping" in problem.message


def test_csv_row_with_too_many_cells(tmp_path: Path) -> None:
    problem = only_problem(write(tmp_path / "j.csv", "id,prompt\na,cat,extra\n"))
    assert problem.location == "row 2" and "3 cells" in problem.message


def test_csv_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "j.csv"
    path.write_bytes("id,prompt\na,hi\nb,caf\xe9\n".encode("latin-1"))
    problem = only_problem(path)
    assert (problem.file, problem.location, problem.field) == (str(path), "row 3", "prompt")
    assert problem.message.startswith('"caf\\xe9" is not UTF-8 text (byte 0xE9')
    assert "save the CSV as UTF-8" in problem.message


def test_csv_not_utf8_every_row_named_far_into_the_file(tmp_path: Path) -> None:
    # Past the first read buffer, between good rows, in an item CSV: each bad row is named, the row numbers
    # after a multi-line cell stay right, and the rows' other problems are still found.
    rows = [b"sku,name,model"]
    for i in range(2, 2002):
        name = b"thing %d" % i
        if i == 1500:
            name = b"caf\xe9 " + name
        if i == 1501:
            name = b'"two\nlines \xe9"'
        rows.append(b"S%d,%s,%s" % (i, name, b"nope" if i in (100, 1900) else b""))
    (tmp_path / "p.csv").write_bytes(b"\n".join(rows) + b"\nS7,again,\n")
    path = write(tmp_path / "j.yaml", "items_csv: p.csv\nprompt: 'a {name}'\n")
    manifest = open_manifest(path)
    assert sum(1 for _ in manifest.requests()) == 2001 - 4  # S7 twice: reported, both yielded
    assert [(p.file, p.location, p.field) for p in manifest.problems] == [
        (str(tmp_path / "p.csv"), f"row {n}", field) for n, field in
        [(100, "model"), (1500, "name"), (1501, "name"), (1900, "model"), (2002, "sku")]]
    assert '"two\nlines \\xe9" is not UTF-8 text' in manifest.problems[2].message


def test_csv_header_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "j.csv"
    path.write_bytes("id,prompt,caf\xe9\na,hi,x\n".encode("latin-1"))
    problem = only_problem(path)
    assert (problem.location, problem.field) == ("row 1", None)
    assert problem.message.startswith('the header, column 3: "caf\\xe9" is not UTF-8 text')


def test_bad_input_changes_nothing_the_consumer_can_roll_back(tmp_path: Path) -> None:
    """The store's contract: it sees every good row, then raise_if_problems raises."""
    path = write(tmp_path / "j.csv", "id,prompt,n\na,cat,1\nb,dog,9\n")
    manifest = open_manifest(path)
    seen = [r.item_id for r in manifest.requests()]
    assert seen == ["a"]
    with pytest.raises(ManifestError) as raised:
        manifest.raise_if_problems()
    assert f"{path} row 3: n: 9 is out of range" in str(raised.value)


def test_requests_can_be_iterated_again(catalogue: Path) -> None:
    manifest = open_manifest(catalogue)
    assert [r.key for r in manifest.requests()] == [r.key for r in manifest.requests()]
    assert manifest.problems == []


def test_no_traceback_for_errors_in_paths_with_spaces(tmp_path: Path) -> None:
    folder = tmp_path / "my jobs"
    path = write(folder / "j.csv", "prompt,size\ncat,99:1\n")
    problem = only_problem(path)
    assert problem.file == str(path)
    assert os.sep in problem.file


def test_duplicates_found_when_hashes_spill_to_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large jobs spill id hashes to temporary files; duplicates are still found and the files removed."""
    from batchgen.manifest import duplicates

    monkeypatch.setattr(duplicates.HashLog, "BUFFER", 4)
    spills: list[str] = []
    real_mkdtemp = duplicates.tempfile.mkdtemp
    monkeypatch.setattr(duplicates.tempfile, "mkdtemp",
                        lambda *a, **k: spills.append(real_mkdtemp(*a, **k)) or spills[-1])
    rows = "".join(f"S{i},cat {i}\n" for i in range(300)) + "S7,again\n"
    path = write(tmp_path / "p.csv", "sku,prompt\n" + rows)
    before = set(Path(duplicates.tempfile.gettempdir()).glob("batchgen-dups-*"))
    problems = problems_of(path)
    assert [(p.location, p.field) for p in problems] == [("row 302", "sku")]
    assert '"S7" is already used by row 9' in problems[0].message
    assert set(Path(duplicates.tempfile.gettempdir()).glob("batchgen-dups-*")) == before
    assert spills, "the hashes were meant to spill to disk"


def test_unknown_keys_do_not_hide_the_items_problems(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", 'name: j\nprompt: "{thing} in {colour}"\nitems:\n  - {id: a, thing: cat}\n'
                 '  - {id: a, thing: dog, colour: red, size: "1024x1024"}\n'
                 "defaults:\n  model: gemini-3.1-flash-image-preview\nbogus: 1\nrun:\n  concurency: 3\n")
    found = {(p.location, p.field) for p in problems_of(path)}
    assert found == {("line 8", "bogus"), ("line 10", "run.concurency"), ("line 4", "prompt"),
                     ("line 5", "size"), ("line 5", "id")}


def test_a_bad_default_is_reported_once_at_its_line(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", 'prompt: "{thing}"\nitems:\n  - {id: a, thing: cat}\n  - {id: b, thing: dog}\n'
                 "defaults:\n  n: 9\n")
    problem = only_problem(path)
    assert (problem.location, problem.field) == ("line 6", "defaults.n")
    assert "4" in problem.message


def test_a_bad_default_does_not_hide_the_settings_problems(tmp_path: Path) -> None:
    # The items are not expanded (each would repeat the bad default), but the settings are independent of
    # them: an unknown key, a bad rate, a bad output template and a bad duration come in the same pass.
    path = write(tmp_path / "j.yaml", 'prompt: "{thing}"\nitems:\n  - {id: a, thing: cat}\n'
                 "defaults:\n  n: 9\n"                       # line 5
                 "colour: red\n"                              # line 6
                 "run:\n  rate: fast\n  max_wait: soon\n"   # lines 8, 9
                 "output:\n  filename: '../{id}'\n")         # line 11
    found = [(p.location, p.field) for p in problems_of(path)]
    assert sorted(found) == [("line 11", "output.filename"), ("line 5", "defaults.n"), ("line 6", "colour"),
                             ("line 8", "run.rate"), ("line 9", "run.max_wait")], found
    # The job's settings alone (status, export, report) list the same settings problems, each once.
    with pytest.raises(ManifestError) as raised:
        load_job(path)
    assert sorted((p.location, p.field) for p in raised.value.problems) == sorted(found)


def test_after_a_bad_default_the_rows_are_not_expanded(tmp_path: Path) -> None:
    # Each row would repeat the bad default; item b's own unknown model is not reported either.
    path = write(tmp_path / "j.yaml", 'prompt: "{thing}"\nitems:\n  - {id: a, thing: cat}\n'
                 '  - {id: b, thing: dog, model: no-such-model}\ndefaults:\n  n: 9\n')
    assert [(p.location, p.field) for p in problems_of(path)] == [("line 6", "defaults.n")]


def test_an_error_inside_a_list_drops_the_whole_value_and_is_reported_once(tmp_path: Path) -> None:
    # pydantic places these errors inside a list or a union branch: the value holding them is dropped so the
    # other checks still run, and the loop does not report them again.
    path = write(tmp_path / "j.yaml", 'prompt: "x"\nitems:\n  - {id: a}\ndefaults:\n  image_urls: [5]\n'
                 "matrix:\n  style: [[a]]\nrun:\n  rate: fast\n  fallback_models: [5]\n")
    found = [(p.location, p.field) for p in problems_of(path)]
    assert [f for _, f in found].count("run.fallback_models.0") == 1, found
    assert [f for _, f in found].count("defaults.image_urls.0") == 1, found
    assert ("line 9", "run.rate") in found and any(f.startswith("matrix.style") for _, f in found), found
    with pytest.raises(ManifestError) as raised:
        load_job(path)
    fields = [p.field for p in raised.value.problems]
    assert fields.count("run.fallback_models.0") == 1 and "run.rate" in fields, fields


def test_a_bad_quality_setting_does_not_hide_the_items_problems(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", 'prompt: "x"\nitems:\n  - {id: a, n: 99}\nquality:\n  on_fail: nope\n')
    found = [(p.location, p.field) for p in problems_of(path)]
    assert found == [("line 5", "quality.on_fail"), ("line 3", "n")], found


def test_a_bad_items_value_reports_no_echo_of_having_no_items(tmp_path: Path) -> None:
    # With a template field, an items list that was dropped would read as "no item has {thing}".
    path = write(tmp_path / "j.yaml", 'prompt: "{thing}"\nitems: 5\nrun:\n  rate: fast\n')
    found = [(p.location, p.field) for p in problems_of(path)]
    assert found == [("line 2", "items"), ("line 4", "run.rate")], found


# --- every problem of an item, not only its first -----------------------------------------------------


def test_an_item_gets_all_its_problems_reported_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "j.yaml", (
        "defaults: {model: z-image-turbo}\n"
        "items:\n"
        "  - id: a\n"
        "    model: no-such-model\n"          # line 4; and no prompt (reported at the item, line 3)
        "  - id: b\n"
        "    prompt: ok\n"
        "    n: 99\n"                          # line 7
        "    size: '7:3'\n"                    # line 8
        "  - id: c\n"
        "    prompt: ok\n"
        "    seed: abc\n"                      # line 11
        "    size: '7:3'\n"                    # line 12
        "    mask_url: https://x/m.png\n"      # line 13
        "  - id: d\n"
        "    prompt: ok\n"
        "    model: [a, b]\n"                  # line 16: unreadable, so size is not judged against a default
        "    size: '7:3'\n"
    ))
    requests, problems = expand(path)
    assert requests == []
    got = [(p.location, p.field) for p in problems]
    assert got == [("line 3", "prompt"), ("line 4", "model"), ("line 7", "n"), ("line 8", "size"),
                   ("line 11", "seed"), ("line 12", "size"), ("line 13", "mask_url"), ("line 16", "model")], \
        [str(p) for p in problems]
    assert '"no-such-model" is not in the catalogue' in problems[1].message
    assert '"7:3" is not accepted by z-image-turbo' in problems[3].message
    assert "mask_url is not supported by z-image-turbo" in problems[6].message


def test_a_row_gets_all_its_problems_reported_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "j.csv", "id,prompt,model,size,n\nx,,nope,7:3,1\ny,hello,z-image-turbo,9:9,abc\n"
                                     "z,fine,z-image-turbo,1:1,1\n")
    requests, problems = expand(path)
    assert [r.item_id for r in requests] == ["z"]
    assert [(p.location, p.field) for p in problems] == [
        ("row 2", "prompt"), ("row 2", "model"), ("row 3", "n"), ("row 3", "size")], [str(p) for p in problems]


def test_a_library_user_gets_every_catalogue_problem_of_a_request() -> None:
    with pytest.raises(ValueError) as raised:
        GenerationRequest(prompt="x", model="z-image-turbo", size="7:3", mask_url="https://x/m.png")
    assert 'size "7:3" is not accepted' in str(raised.value) and "mask_url is not supported" in str(raised.value)


def test_a_template_field_that_is_a_parameter_column_says_why_it_is_not_a_field(tmp_path: Path) -> None:
    """A CSV's prompt column sets the prompt itself: the message says so, instead of listing only the other
    columns as if the prompt column were missing."""
    write(tmp_path / "big.csv", "id,prompt,colour\na,a chair,red\n")
    path = write(tmp_path / "job.yaml", 'name: big\nitems_csv: big.csv\nprompt: "{prompt} in {colour}"\n')
    with pytest.raises(ManifestError) as caught:
        open_manifest(path)
    [problem] = caught.value.problems
    assert (problem.location, problem.field) == ("line 3", "prompt")
    assert "big.csv's prompt column sets the request's prompt itself" in problem.message


def test_a_yaml_manifest_that_is_not_utf8_names_the_line_and_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_bytes(b'name: x\nitems:\n  - {id: a, prompt: "caf\xe9 photo"}\n')
    with pytest.raises(ManifestError) as caught:
        open_manifest(path)
    [problem] = caught.value.problems
    assert problem.location == "line 3" and "byte 0xE9" in problem.message and "save the file as UTF-8" in (
        problem.message)


def test_true_or_false_is_no_number_in_the_defaults_either(tmp_path: Path) -> None:
    """YAML's true would pass as n = 1 through pydantic's lax ints; an item's n: true was already refused."""
    path = write(tmp_path / "job.yaml", "name: x\nprompt: hi\ndefaults:\n  n: true\n  seed: false\n")
    with pytest.raises(ManifestError) as caught:
        open_manifest(path)
    assert [(p.location, p.field) for p in caught.value.problems] == [("line 4", "defaults.n"),
                                                                      ("line 5", "defaults.seed")]
    assert all("a whole number is needed, not true or false" in p.message for p in caught.value.problems)
