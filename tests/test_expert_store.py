"""The expert store's read side (workers.expert_store): experts from a directory, and the MLflow registry listing."""

import pytest

from workers.expert_store import (
    CHAMPION,
    DirectorySource,
    ExpertsNotFoundError,
    Registry,
    load_experts,
    registered_experts,
)


def test_an_empty_directory_has_no_experts_and_says_so(tmp_path):
    with pytest.raises(ExpertsNotFoundError, match="no experts"):
        load_experts(tmp_path)


def test_the_directory_version_moves_when_an_expert_file_appears(tmp_path):
    source = DirectorySource(tmp_path)
    before = source.version()
    (tmp_path / "peft" / "germany").mkdir(parents=True)
    assert source.version() == before  # an empty folder is not an expert
    (tmp_path / "germany.safetensors").write_bytes(b"0")
    assert source.version() != before


def test_the_registry_listing_reads_every_page(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", retries=1)
    client = registry.client()
    cultures = ["Germany", "Japan", "Kenya"]
    for culture in cultures:
        name = registry.model_name(culture)
        client.create_registered_model(name, tags={"culture": culture})
        for alignment in ("0.5", "0.6"):
            tags = {"culture": culture, "val_alignment": alignment}
            client.create_model_version(name, (tmp_path / "x").as_uri(), tags=tags)
        client.set_registered_model_alias(name, CHAMPION, "2")
    client.create_registered_model("other-germany")  # another prefix: not ours

    # One model and one version a page: every page must be read to see all six versions.
    rows = registered_experts(registry, page_size=1)
    assert [(r["culture"], r["version"]) for r in rows] == [(c, v) for c in cultures for v in (1, 2)]
    assert [r["aliases"] for r in rows] == [[], [CHAMPION]] * 3
    assert rows == registered_experts(registry)


def test_the_registry_prefix_is_matched_literally(tmp_path):
    # `_` and `%` are LIKE's wildcards: a prefix holding them must not take in other prefixes' models.
    registry = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}", "team_a%", retries=1)
    client = registry.client()
    for name in ("team_a%-germany", "teamXaY-japan", "team_a%x-kenya", "teamXa-zz-peru"):
        client.create_registered_model(name)
        client.create_model_version(name, (tmp_path / "x").as_uri(), tags={"culture": name})
    assert [r["model"] for r in registered_experts(registry)] == ["team_a%-germany"]
