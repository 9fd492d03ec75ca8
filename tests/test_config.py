"""The config: each key's checks, one line naming the key."""

import pytest

from orchestrator.config import ConfigError, load_config
from tests.conftest import TINY_CONFIG, config_with


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
