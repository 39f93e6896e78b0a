"""User errors found before any pass, each in one sentence naming the setting: unknown config keys
with the closest name, a mesh the devices cannot form, a batch the devices cannot split, a group
size larger than the batch, a random model without tokenizer; and a torn ``metrics.jsonl``
(the last line dropped with a line saying so, any other bad line named). 8 fake CPU devices
(tests/conftest.py)."""

import itertools
import json

import jax
import pytest

from sgpo_jax import config as config_lib
from sgpo_jax.errors import CheckpointError, ConfigError
from sgpo_jax.training import metrics

from tiny_run import tiny


@pytest.fixture
def config():
    return tiny("", "prefs.jsonl")  # configs/tiny.py; no file is read here


def test_unknown_keys_name_the_closest_field(config):
    cases = {
        "sgpo.epsilonn": "did you mean sgpo.epsilon?",
        "sgpoo.epsilon": "did you mean sgpo.epsilon?",
        "model.random.hidden_sise": "did you mean model.random.hidden_size?",
        "mesh.zzz": "mesh has: data, fsdp, tensor",
    }
    for key, suggestion in cases.items():
        with pytest.raises(ConfigError) as err:
            config_lib.check_keys(config, ["train.seed", key])
        assert str(err.value) == f"unknown config key {key} (--config.{key}): {suggestion}"
    config_lib.check_keys(config, ["train.seed", "model.random.head_dim", "data.buckets"])  # all known


def test_a_mesh_the_devices_cannot_form_is_named_before_any_pass(config):
    assert jax.device_count() == 8
    config.mesh.data = 3
    with pytest.raises(ConfigError) as err:
        config_lib.check_devices(config, jax.device_count())
    assert str(err.value) == ("the devices do not fit the config:\n  - mesh.data=3, mesh.fsdp=1, mesh.tensor=1: "
                              "data*fsdp*tensor = 3*1*1 = 3 but there are 8 devices")
    config.mesh.data, config.mesh.tensor = -1, 3
    with pytest.raises(ConfigError) as err:
        config_lib.check_devices(config, 8)
    assert str(err.value) == ("the devices do not fit the config:\n  - mesh.data=-1, mesh.fsdp=1, mesh.tensor=3: "
                              "the 8 devices are not divisible by the product of the other sizes (3)")
    config.mesh.tensor = 4  # 2 hosts of 4 devices: tensor parallelism fits a host; 4 hosts of 2: it does not
    config_lib.check_devices(config, 8, process_count=2)
    with pytest.raises(ConfigError, match=r"mesh.tensor=4 does not divide the 2 devices of a host"):
        config_lib.check_devices(config, 8, process_count=4)


def test_the_check_accepts_exactly_the_meshes_make_mesh_builds(config):
    from sgpo_jax.parallel.mesh import make_mesh

    config.train.batch_size = config.train.reference_batch_size = 72  # a multiple of every data*fsdp of 8 devices
    for sizes in itertools.product((-1, 1, 2, 3, 4, 8), repeat=3):
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes
        try:
            make_mesh(*sizes)
            built = True
        except ValueError:
            built = False
        try:
            config_lib.check_devices(config, 8)
            fits = True
        except ConfigError:
            fits = False
        assert fits == built, sizes


def test_a_batch_the_devices_cannot_split_is_named_before_any_pass(config):
    config.train.batch_size, config.train.reference_batch_size = 12, 4
    with pytest.raises(ConfigError) as err:
        config_lib.check_devices(config, 8)
    assert str(err.value).splitlines() == [
        "the devices do not fit the config:",
        "  - train.batch_size (12) must be a multiple of mesh.data * mesh.fsdp = 8 * 1 = 8, the devices that split a "
        "batch (8 devices, mesh.tensor=1)",
        "  - train.reference_batch_size (4) must be a multiple of mesh.data * mesh.fsdp = 8 * 1 = 8, the devices "
        "that split a batch (8 devices, mesh.tensor=1)"]
    config.mesh.data, config.mesh.tensor = 2, 4  # 2-way data parallel: 12 and 4 split
    config_lib.check_devices(config, 8)


def test_a_group_larger_than_the_batch_is_refused_where_the_follower_sees_one_batch(config):
    config.sgpo.group_size = 9
    with pytest.raises(ConfigError) as err:
        config_lib.validate(config)
    assert str(err.value) == (
        "invalid config:\n  - sgpo.group_size (9) is larger than train.batch_size (8): the step follower sees one "
        "batch, so every batch would be one group, the same as sgpo.group_size=0; use a group size <= the batch, 0, "
        "or sgpo.follower=epoch")
    config.sgpo.group_size = 8
    config_lib.validate(config)
    config.sgpo.group_size, config.sgpo.follower = 9, "epoch"  # groups of all pairs: fine
    config_lib.validate(config)
    config.sgpo.follower, config.train.mode = "", "dpo"  # no follower
    config_lib.validate(config)


def test_a_random_model_without_tokenizer_is_a_config_error(config):
    from sgpo_jax.models.loading import load_model

    with pytest.raises(ConfigError, match=r"model.source='random' needs model.tokenizer"):
        load_model(config.model)


# ------------------------------------------------------------------------------- metrics.jsonl

def records(*steps):
    return [{"step": s, "loss": 0.5 + s, "rewards/accuracies": s / 4} for s in steps]


@pytest.fixture
def said(monkeypatch):
    lines = []
    monkeypatch.setattr(metrics, "say", lines.append)
    return lines


def test_a_torn_last_metrics_line_is_dropped_with_a_line_naming_the_file(tmp_path, said):
    path = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps(r) + "\n" for r in records(1, 2, 3))
    path.write_text(whole + '{"step": 4, "loss": 0.')  # killed while writing step 4
    stats = metrics.run_statistics(path, last_step=10)
    assert stats == {"mean_loss": (1.5 + 2.5 + 3.5) / 3, "mean_accuracy": (1 + 2 + 3) / 12}
    message = (f"metrics: dropped the torn last line 4 of {path} (a run stopped mid-write): "
               "'{\"step\": 4, \"loss\": 0.'")
    assert said == [message]
    metrics.repair_metrics(path)  # before the rerun appends: the torn bytes go, the complete lines stay as written
    assert path.read_text() == whole and said == [message, message]
    with open(path, "a") as f:
        f.write(json.dumps(records(4)[0]) + "\n")
    assert [r["step"] for r in metrics.read_metrics(path)] == [1, 2, 3, 4] and len(said) == 2
    path.write_text(whole.rstrip("\n"))  # a complete last line without its newline gets one
    metrics.repair_metrics(path)
    assert path.read_text() == whole and len(said) == 2


def test_a_bad_metrics_line_before_the_last_is_named(tmp_path, said):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(r) for r in records(1, 2, 3)]
    path.write_text("\n".join([lines[0], '{"step": 2, "lo' + lines[1], lines[2]]) + "\n")  # torn, then appended to
    with pytest.raises(json.JSONDecodeError) as parsed:  # the standard parser's message is the oracle
        json.loads('{"step": 2, "lo' + lines[1])
    for read in (metrics.read_metrics, metrics.repair_metrics):
        with pytest.raises(CheckpointError) as err:
            read(path)
        assert str(err.value) == (f"{path}, line 2: not valid JSON ({parsed.value.msg}: column {parsed.value.colno}); "
                                  "only a torn last line (a run stopped mid-write) is dropped")
        assert err.value.hint == "fix or delete that line: metrics.jsonl feeds only the summary statistics"
    assert said == []
