"""Every shipped config loads, validates, and carries its recipe's numbers (SGPO_NOTES 5)."""

import importlib.util
from pathlib import Path

import pytest

from sgpo_jax.config import follower_of, sgpo_config, validate

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
        assert (follower_of(c), c.sgpo.annotation_scale, c.ssapo.reference) == ("annotation", 0.1, "previous")
        # the authors' script (SGPO_NOTES sections 2-5): K=6 tangents, per-entry bounds, groups of
        # 100, leader -log p with the 1e-6 floor
        step = sgpo_config(c, mode="sgpo")
        assert (step.loss, step.num_tangents, step.variant, step.group_size) == ("tangents", 6, "per_entry", 100)
        assert (step.leader_loss, step.p_min) == ("neg_log", 1e-6)
        assert (c.train.batch_size, c.data.max_length, c.data.max_prompt_length) == (32, 2048, 1024)
        assert (c.train.warmup_ratio, c.model.dtype, c.sgpo.num_tangents) == (0.1, "bfloat16", 6)
    assert Path(load("smollm2").data.source).is_file()


def test_presets_and_follower_defaults():
    c = load("smollm2")
    step = sgpo_config(c, mode="sgpo")
    assert (c.sgpo.preset, step.leader_loss, step.variant, step.group_size) == ("consistent", None, "ball", None)
    assert follower_of(c) == "annotation"  # ssapo mode: the annotation atoms by default
    c.train.mode = "sgpo"
    assert follower_of(c) == "step"
    c.sgpo.preset, c.sgpo.leader_loss = "consistent", "neg_log"
    with pytest.raises(ValueError, match=r"sgpo.leader_loss='neg_log' contradicts sgpo.preset='consistent'"):
        validate(c)
    c.sgpo.preset, c.sgpo.leader_loss, c.sgpo.group_size = "", "", -3
    with pytest.raises(ValueError, match=r"sgpo.group_size must be 0"):
        validate(c)
