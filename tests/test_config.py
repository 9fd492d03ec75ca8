"""The experiment config: each key's checks in one line naming the key, files that extend a shared recipe, and
the shared prior's typed `train` overrides."""

import pytest
import yaml

from orchestrator.config import ConfigError, load_config
from orchestrator.expert_bank import prior_train_config
from tests.conftest import REPO, TINY_CONFIG, config_with

# demo.yaml and full.yaml whole, as they would be without configs/recipe.yaml: what the recipe gives each.
WHOLE = {
    "demo": """
name: demo
output_dir: runs/demo
base_model: {name: smollm2-135m, dtype: float32, device: auto}
data: {path: ../shared/data/goqa/opinions.jsonl, top: 12, min_questions: 60, held_out: [Canada, Australia]}
shared: {enabled: true, max_questions: 500, cpus_per_trial: 2, train: {batch_size: 8, grad_accum: 1, epochs: 2},
         expert_prior_weight: auto}
prompt: {kind: deep, num_virtual_tokens: 32, init: shared}
train: {epochs: 2, batch_size: 2, grad_accum: 2, lr: 0.005, patience: 3, select: group}
tune: {experts_per_trial: 6, scheduler: fifo, cpus_per_trial: 1}
""",
    "full": """
name: full
output_dir: runs/full
base_model: {name: smollm2-135m, dtype: float32, device: auto}
data: {path: ../shared/data/goqa/opinions.jsonl, min_questions: 30}
shared: {enabled: true, cpus_per_trial: 2, train: {batch_size: 8, grad_accum: 1, epochs: 2}, expert_prior_weight: auto}
prompt: {kind: deep, num_virtual_tokens: 32, init: shared}
train: {epochs: 3, batch_size: 1, grad_accum: 4, lr: 0.005, patience: 3, select: group}
tune: {experts_per_trial: 13, scheduler: fifo, cpus_per_trial: 1}
""",
}


@pytest.mark.parametrize("name", sorted(WHOLE))
def test_demo_and_full_run_the_recipe_and_their_own_settings(name, tmp_path):
    before = tmp_path / f"{name}.yaml"
    before.write_text(WHOLE[name])
    config = load_config(REPO / "configs" / f"{name}.yaml")
    assert config.model_dump() == load_config(before).model_dump()
    # What training writes to <output_dir>/config.yaml reads back as the same config.
    saved = tmp_path / "saved.yaml"
    saved.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    assert load_config(saved) == config


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_config_extends_a_chain_of_files_each_relative_to_the_one_naming_it(tmp_path):
    write(tmp_path / "recipes" / "root.yaml", "data: {path: a.jsonl, held_out: [Canada]}\ntrain: {lr: 0.1}\n")
    write(tmp_path / "recipes" / "mid.yaml", "extends: root.yaml\ntrain: {epochs: 5}\nname: mid\n")
    top = write(tmp_path / "top.yaml", "extends: recipes/mid.yaml\nname: top\ndata: {held_out: [Kenya]}\n")
    config = load_config(top, ["train.epochs=6"])
    assert config.name == "top"
    assert config.data.path == "a.jsonl"  # sections merge key by key
    assert config.data.held_out == ["Kenya"]  # a list replaces the base's
    assert (config.train.lr, config.train.epochs) == (0.1, 6)  # --set applies over the whole chain


def test_a_missing_base_or_a_cycle_is_one_line_naming_the_file(tmp_path):
    lost = write(tmp_path / "lost.yaml", "extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"not found: .*nowhere\.yaml \(extended by .*lost\.yaml\)$"):
        load_config(lost)
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    a = write(tmp_path / "a.yaml", "extends: b.yaml\ndata: {path: x}\n")
    with pytest.raises(
        ConfigError, match=r"a\.yaml: extends itself, through .*a\.yaml -> .*b\.yaml -> .*a\.yaml$"
    ):
        load_config(a)
    bad = write(tmp_path / "bad.yaml", "extends: [a.yaml]\n")
    with pytest.raises(ConfigError, match="bad.yaml: extends: expected a file name"):
        load_config(bad)


def tiny_with(*sets: str):
    return load_config(TINY_CONFIG, ["base_model.name=unused", *sets])


def test_the_priors_train_settings_replace_only_the_keys_given():
    config = tiny_with(
        "train.lr=0.2", "train.prefix_layers=2", "shared.train={epochs: 7, prefix_layers: null}"
    )
    prior = prior_train_config(config)
    assert (prior.epochs, prior.prefix_layers, prior.lr) == (7, None, 0.2)  # lr: train's
    assert config.shared.train.model_dump() == {"epochs": 7, "prefix_layers": None}


@pytest.mark.parametrize(
    "value, error",
    [
        ("shared.train.lr=0", "shared.train.lr: Input should be greater than 0"),
        ("shared.train.lr=null", "shared.train.lr: Input should be a valid number"),
        ("shared.train.epoch=2", "shared.train.epoch: Extra inputs are not permitted"),
        ("shared.train.select=best", "shared.train.select: Input should be 'expert' or 'group'"),
    ],
)
def test_a_bad_prior_train_setting_is_refused_naming_its_key(value, error):
    with pytest.raises(ConfigError, match=error):
        tiny_with(value)


def test_prior_settings_that_contradict_train_once_merged_are_refused():
    with pytest.raises(ConfigError, match="shared.train, over train: train.prefix_layers keeps"):
        tiny_with("train.weight_decay=0.1", "shared.train.prefix_layers=2")


def test_the_config_chooses_the_prompt_kind():
    assert load_config(TINY_CONFIG).prompt.kind == "input"
    deep = load_config(TINY_CONFIG, ["prompt.kind=deep", "prompt.num_virtual_tokens=16"]).prompt
    assert (deep.kind, deep.num_virtual_tokens) == ("deep", 16)
    with pytest.raises(ConfigError, match=r"prompt\.kind"):
        load_config(TINY_CONFIG, ["prompt.kind=prefix"])
    with pytest.raises(ConfigError, match="ZeRO trains input prompts only"):
        load_config(TINY_CONFIG, ["prompt.kind=deep", "strategy=deepspeed"])


@pytest.mark.parametrize("key", ["data.cultures=[Germany, shared]", "data.held_out=[Shared]"])
def test_shared_is_no_culture_name(key):
    with pytest.raises(ConfigError, match="reserved"):
        config_with(key)


def test_init_shared_needs_the_prior():
    with pytest.raises(ConfigError, match="shared.enabled"):
        config_with("prompt.init=shared")
