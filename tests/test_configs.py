"""Every shipped config loads, validates, and carries its recipe's numbers (SGPO_NOTES 5)."""

import importlib.util
from pathlib import Path

import pytest

from sgpo_jax.config import validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load(name):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name", ["llama", "mistral", "smollm2", "tiny"])
def test_config_validates(name):
    config = load(name)
    if not config.data.source:
        config.data.source = "prefs.jsonl"  # tiny leaves the data to the caller
    validate(config)


def test_recipes_match_the_authors():
    llama, mistral = load("llama"), load("mistral")
    assert (llama.train.beta, llama.ssapo.seed_learning_rate, llama.ssapo.seed_epochs) == (0.05, 1e-6, 1)
    assert (mistral.train.beta, mistral.ssapo.seed_learning_rate, mistral.ssapo.seed_epochs) == (0.1, 5e-7, 3)
    assert (mistral.train.learning_rate, mistral.train.epochs, mistral.sgpo.epsilon) == (3e-7, 1, 0.05)
    for c in (llama, mistral):
        assert (c.train.mode, c.ssapo.seed_size, tuple(c.ssapo.pool_sizes)) == ("ssapo", 2000, (8000, 20000, 30000))
        assert (c.ssapo.num_samples, c.ssapo.temperature, c.ssapo.max_new_tokens) == (2, 0.7, 300)
        assert (c.sgpo.follower, c.sgpo.annotation_scale, c.ssapo.reference) == ("annotation", 0.1, "previous")
        assert (c.train.batch_size, c.data.max_length, c.data.max_prompt_length) == (32, 2048, 1024)
        assert (c.train.warmup_ratio, c.model.dtype, c.sgpo.num_tangents) == (0.1, "bfloat16", 6)
    assert Path(load("smollm2").data.source).is_file()
