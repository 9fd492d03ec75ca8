"""The generated reference pages (docs/reference/) match what the code generates now."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import reference as config_reference
from serve import reference as http_reference
from tests.conftest import REPO

COMMITTED = REPO / "docs" / "reference"


@pytest.mark.parametrize("generator", [config_reference, http_reference], ids=["config", "http"])
def test_the_committed_reference_pages_are_what_the_code_generates(generator, tmp_path: Path):
    for page in generator.write_pages(tmp_path):
        committed = COMMITTED / page.name
        assert committed.exists(), f"docs/reference/{page.name} is missing: run `make docs`"
        assert committed.read_text(encoding="utf-8") == page.read_text(encoding="utf-8"), (
            f"docs/reference/{page.name} is stale: run `make docs` and commit it"
        )


def test_the_config_reference_has_a_row_for_every_key_of_every_section():
    page = config_reference.config_page()
    for name, model in [("", config_reference.ExperimentConfig)] + config_reference.sections(
        config_reference.ExperimentConfig, ""
    ):
        for key in model.model_fields:
            assert f"| `{name + '.' if name else ''}{key}` |" in page


def test_the_pages_name_no_path_of_this_machine():
    pages = config_reference.config_page() + http_reference.http_page()
    assert str(REPO) not in pages and str(Path.home()) not in pages
