"""The generated reference pages (docs/reference/) match what the code generates now."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import reference as config_reference
from serve import reference as http_reference
from tests.conftest import REPO

COMMITTED = REPO / "docs" / "reference"


@pytest.mark.parametrize(
    "name, page",
    [(config_reference.PAGE, config_reference.config_page), (http_reference.PAGE, http_reference.http_page)],
    ids=["config", "http"],
)
def test_the_committed_reference_pages_are_what_the_code_generates(name, page):
    committed = COMMITTED / name
    assert committed.exists(), f"docs/reference/{name} is missing: run `make docs`"
    assert committed.read_text(encoding="utf-8") == page(), f"docs/reference/{name} is stale: run `make docs`"


@pytest.mark.parametrize(
    "module, name", [("orchestrator.reference", "config.md"), ("serve.reference", "http.md")]
)
def test_make_docs_writes_what_each_reference_module_prints(module, name):
    """`make docs` writes each page as `python -m <module> > docs/reference/<page>`."""
    printed = subprocess.run(
        [sys.executable, "-m", module],
        capture_output=True,
        check=True,
        cwd=REPO,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    ).stdout
    assert printed == (COMMITTED / name).read_bytes()
    assert f"-m {module} > docs/reference/{name}" in (REPO / "Makefile").read_text()


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
