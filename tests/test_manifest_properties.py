"""Property tests: expansion is deterministic and yields items x matrix combinations requests."""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from batchgen import catalog
from batchgen.manifest.load import open_manifest
from batchgen.models import GenerationRequest, request_key

words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz -,\"'é", min_size=1, max_size=12).filter(
    lambda s: s.strip() != "")
matrix_values = st.lists(st.text(alphabet="abcxyz0123", min_size=1, max_size=5), min_size=1, max_size=3,
                         unique=True)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.tuples(words, words), min_size=1, max_size=15),
    styles=matrix_values,
    sizes=st.lists(st.sampled_from(catalog.RATIO_SIZES), min_size=1, max_size=3, unique=True),
    use_yaml=st.booleans(),
)
def test_expansion_is_deterministic_and_counts_items_times_combinations(
    rows: list[tuple[str, str]], styles: list[str], sizes: list[str], use_yaml: bool,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["sku", "name", "colour"])
        for i, (name, colour) in enumerate(rows):
            writer.writerow([f"S{i}", name, colour])
        (folder / "p.csv").write_text(buf.getvalue(), encoding="utf-8")
        style_list = ", ".join(f'"{s}"' for s in styles)
        size_list = ", ".join(f'"{s}"' for s in sizes)
        if use_yaml:
            # JSON is YAML flow syntax, so any text survives the round trip.
            items = "items:\n" + "".join(
                "  - " + json.dumps({"sku": f"S{i}", "name": name, "colour": colour}, ensure_ascii=False) + "\n"
                for i, (name, colour) in enumerate(rows))
        else:
            items = "items_csv: p.csv\n"
        (folder / "j.yaml").write_text(
            f"defaults: {{model: {catalog.NANO_BANANA_2}}}\nprompt: 'A {{style}} {{colour}} {{name}}'\n{items}"
            f"matrix:\n  style: [{style_list}]\n  size: [{size_list}]\n", encoding="utf-8")
        first = open_manifest(folder / "j.yaml")
        expanded = list(first.requests())
        again = list(open_manifest(folder / "j.yaml").requests())
        assert first.problems == []
        assert len(expanded) == len(rows) * math.prod([len(styles), len(sizes)])
        assert [r.model_dump() for r in expanded] == [r.model_dump() for r in again]
        assert len({r.key for r in expanded}) == len(expanded)
        for planned in expanded:
            assert GenerationRequest.model_validate(planned.request.model_dump()) == planned.request
            assert request_key(planned.item_id, planned.variant, planned.request) == planned.key
