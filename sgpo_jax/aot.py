r"""Ahead-of-time compilation of a run for accelerators this host does not have.

``compile_run(config, target)`` builds the target's devices without touching one (TPU slices by
name through libtpu's topology description; GPUs through XLA's deviceless compilation), the mesh
the run would use on them (``mesh.*``, laid out as :func:`sgpo_jax.parallel.mesh.device_grid`
lays out real devices), and lowers and compiles, on abstract inputs (``jax.ShapeDtypeStruct``
with shardings; nothing is allocated), every program the run executes:

* ``train_step``: :func:`sgpo_jax.core.step.make_sgpo_step` as the trainer builds it (the
  configured follower, micro-batches, remat/scan, AdamW state, donated), on the largest bucket;
* ``reference_logps``: the forward-only scoring pass (:func:`sgpo_jax.training.scoring.scoring_program`)
  at ``train.reference_batch_size``;
* with ``train.mode=ssapo``: ``sample``, the sampler's one program (prefill, sample repeat and
  decode loop, :func:`sgpo_jax.ssapo.sampling.lower_generation`) at ``ssapo.generation_batch_size``
  x ``ssapo.num_samples`` rows; the training step is compiled in the rounds' mode
  (``ssapo.round_mode``);
* with ``eval.tasks`` set (any mode): ``eval_generate``, the evaluation's greedy generation at
  ``eval.batch_size``.

Which of these a run executes is :func:`sgpo_jax.runner.plan`'s ``programs``.

Per program the report holds: compile success or XLA's error in one line; per-chip bytes from
``compiled.memory_analysis()`` (arguments, outputs, aliased (donated), temporaries, generated
code) and the peak ``arguments + outputs - aliased + temporaries``, against the chip's memory
and, for the step, the planner's estimate (:func:`sgpo_jax.training.memory.plan_for_run`); the
fused-attention custom calls in the compiled HLO (``tpu_custom_call`` for splash, cuDNN's
``__cudnn$fmha``); the collectives in the compiled HLO text (a loop body, e.g. the scanned
layers, is counted once); and the model FLOPs per step from
:func:`sgpo_jax.training.flops.model_flops`. ``cost_analysis()`` is not used for FLOPs: it counts
a scanned loop body once and Pallas kernels not at all.

Targets (:data:`TPU_CHIPS`, :data:`GPUS`): ``v4-8``, ``v5e-16``, ``v5p-8``, ``v6e-8`` ... (the
suffix counts TensorCores for v4/v5p, chips for v5e/v6e, as Cloud TPU names slices), ``2xv5e-16``
for several slices, or a topology ``v5p:2x2x2``; ``8xH100``, ``8xH200``, ``8xA100`` for GPUs.

Command line::

    python -m sgpo_jax.aot --config=configs/llama.py --target=v5p-8 [--json=aot.json] \
        [--model_preset=llama3-8b] [--config.train.batch_size=16 ...]

prints one line per program and exits 2 with one ``error:`` line when a program does not fit.
TPU targets need ``libtpu`` (``pip install -e .[aot]``), GPU targets ``jax-cuda12-plugin``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sgpo_jax import compat, runner
from sgpo_jax.console import say
from sgpo_jax.errors import ConfigError, UserError

__all__ = ["GPUS", "PROGRAMS", "TPU_CHIPS", "Target", "parse_target", "target_devices", "target_mesh",
           "model_config_for", "compile_run", "refuse_if_oversized", "summary_lines", "ProgramDoesNotFit", "main"]

GIB = 2 ** 30
# generation -> (topology name prefix, TensorCores per chip in the slice name, HBM bytes per chip)
TPU_CHIPS = {
    "v4": ("v4", 2, 32 * GIB),
    "v5e": ("v5e", 1, 16 * GIB),
    "v5p": ("v5p", 2, 95 * GIB),
    "v6e": ("v6e", 1, 32 * GIB),
}
# slice chips -> topology shape (Cloud TPU's standard slice shapes)
_TPU_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_TPU_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
                  512: "8x8x8"}
# name -> (XLA GPU target config in sgpo_jax/assets/gpu_specs, memory bytes as nvidia-smi reports it,
# compute capability)
GPUS = {
    "H100": ("h100_sxm.txtpb", 81559 * 2 ** 20, (9, 0)),
    "H200": ("h200_sxm.txtpb", 143771 * 2 ** 20, (9, 0)),
    "A100": ("a100_sxm_80.txtpb", 81920 * 2 ** 20, (8, 0)),
}
ASSETS = Path(__file__).resolve().parent / "assets" / "gpu_specs"
PROGRAMS = tuple(runner.PROGRAMS)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
FUSED_ATTENTION_CALLS = {"tpu_custom_call": "Pallas/Mosaic kernel (splash attention)",
                         "__cudnn$fmha": "cuDNN fused attention"}


class ProgramDoesNotFit(UserError):
    """A program of the run does not fit the target's memory (one line: program, figures, settings)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target. ``platform`` is ``"tpu"`` or ``"cuda"``; ``topology`` the libtpu topology
    name or the GPU topology ``"1x1xN"``; ``chips`` devices in all slices; ``hbm_bytes`` per chip."""

    name: str
    platform: str
    topology: str
    chips: int
    hbm_bytes: int
    num_slices: int = 1
    gpu: str = ""
    cuda_capability: Optional[Tuple[int, int]] = None


def parse_target(name: str) -> Target:
    """A :class:`Target` from ``v5p-8``, ``2xv5e-16``, ``v5p:2x2x2``, ``8xH100`` (see the module docstring).

    Raises:
      ConfigError: naming the accepted forms.
    """
    text = name.strip()
    gpu = re.fullmatch(r"(\d+)\s*x\s*([A-Za-z]\d+)", text)
    if gpu and gpu.group(2).upper() in GPUS:
        count, kind = int(gpu.group(1)), gpu.group(2).upper()
        _, hbm, capability = GPUS[kind]
        return Target(text, "cuda", f"1x1x{count}", count, hbm, gpu=kind, cuda_capability=capability)
    slices = re.fullmatch(r"(\d+)x(v\w+-\d+)", text)
    num_slices = int(slices.group(1)) if slices else 1
    if slices:
        text = slices.group(2)
    by_shape = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)", text)
    by_cores = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", text)
    if by_shape:
        generation, shape = by_shape.groups()
        chips = math.prod(int(d) for d in shape.split("x"))
    elif by_cores:
        generation, cores = by_cores.group(1), int(by_cores.group(2))
        per_chip = TPU_CHIPS[generation][1]
        chips = cores // per_chip
        shapes = _TPU_SHAPES_3D if generation in ("v4", "v5p") else _TPU_SHAPES_2D
        if cores % per_chip or chips not in shapes:
            raise ConfigError(f"--target={name}: no standard {generation} slice of {cores} "
                              f"{'TensorCores' if per_chip > 1 else 'chips'}; sizes: "
                              f"{', '.join(f'{generation}-{c * per_chip}' for c in shapes)}")
        shape = shapes[chips]
    else:
        gpus = ", ".join(f"8x{g}" for g in GPUS)
        raise ConfigError(f"--target={name!r} is not a target: use a TPU slice (v4-8, v5e-16, v5p-8, v6e-8), "
                          f"several slices (2xv5e-16), a topology (v5p:2x2x2) or GPUs ({gpus})")
    prefix, _, hbm = TPU_CHIPS[generation]
    return Target(name.strip(), "tpu", f"{prefix}:{shape}", chips * num_slices, hbm, num_slices=num_slices)


def target_devices(target: Target) -> List[Any]:
    """The target's devices as a topology description (no device is opened)."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        try:
            import libtpu  # noqa: F401  (only to say what is missing)
        except ImportError as err:
            raise ConfigError(f"--target={target.name} needs libtpu to compile for TPUs ({err})",
                              "pip install -e '.[aot]' (libtpu matching the installed jax)") from err
        kwargs = {"num_slices": target.num_slices} if target.num_slices > 1 else {}
        topology = topologies.get_topology_desc(topology_name=target.topology, platform="tpu", **kwargs)
    else:
        spec = ASSETS / GPUS[target.gpu][0]
        try:
            topology = topologies.get_topology_desc(platform="cuda", target_config=spec.read_text(),
                                                    topology=target.topology)
        except Exception as err:  # no CUDA plugin, or it rejects the spec
            raise ConfigError(f"--target={target.name}: no deviceless CUDA compiler: {str(err).splitlines()[0]}",
                              "pip install jax-cuda12-plugin matching the installed jax") from err
    devices = list(topology.devices)
    if len(devices) != target.chips:
        raise ConfigError(f"--target={target.name}: the topology has {len(devices)} devices, expected {target.chips}")
    return devices


def target_mesh(config: Any, devices: Sequence[Any]) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh of ``mesh.*`` over ``devices`` (one size may be -1), laid
    out as the run lays out real devices (topology-aware; hosts and slices apart)."""
    from sgpo_jax.parallel.mesh import AXES, auto_mesh, device_grid

    sizes = [int(config.mesh.data), int(config.mesh.fsdp), int(config.mesh.tensor)]
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh: sizes must be positive with at most one -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(f"mesh data*fsdp*tensor = {'*'.join(map(str, sizes))} does not equal the target's "
                          f"{len(devices)} devices", "set --config.mesh.* to sizes whose product is the device count")
    return auto_mesh(Mesh(device_grid(sizes, devices, topology=True), AXES))


def model_config_for(config: Any, preset: str = "", vocab_size: Optional[int] = None):
    """The run's :class:`~sgpo_jax.models.DecoderConfig` without loading weights: a
    :data:`~sgpo_jax.training.memory.MODEL_PRESETS` shape (``preset``), ``model.random`` (needs
    ``vocab_size`` or ``model.tokenizer``), or the ``config.json`` of a checkpoint directory or
    hub name (cached; offline otherwise). The ``model.*`` dtypes, remat, scan and attention apply."""
    from sgpo_jax.models import DecoderConfig
    from sgpo_jax.training.memory import MODEL_PRESETS

    m = config.model
    overrides = dict(dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype), remat=bool(m.remat),
                     scan_layers=bool(m.scan_layers), attention=m.get("attention", "auto"))
    if preset:
        if preset not in MODEL_PRESETS:
            raise ConfigError(f"--model_preset={preset!r} is not one of {sorted(MODEL_PRESETS)}")
        return DecoderConfig(**MODEL_PRESETS[preset], **overrides)
    if m.source == "random":
        if vocab_size is None:
            if not m.tokenizer:
                raise ConfigError("model.source='random' needs model.tokenizer (for the vocabulary size)")
            from sgpo_jax.models import load_tokenizer

            vocab_size = len(load_tokenizer(m.tokenizer))
        return DecoderConfig(vocab_size=vocab_size, **dict(m.random), **overrides)
    if m.source.startswith("gguf:"):
        from sgpo_jax.models import gguf_path, load_gguf

        cfg = load_gguf(gguf_path(m.source))[0]
        return dataclasses.replace(cfg, **overrides)
    import transformers

    try:
        hf = transformers.AutoConfig.from_pretrained(m.source)
    except Exception as err:
        raise ConfigError(f"model.source={m.source!r}: cannot read its config.json ({str(err).splitlines()[0]})",
                          f"pass --model_preset (one of {sorted(MODEL_PRESETS)}) for its shape") from err
    return DecoderConfig.from_hf(hf, **overrides)


def _one_line(err: BaseException) -> str:
    """XLA's error in one line: its first line that names a status (e.g. RESOURCE_EXHAUSTED), else the first."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    for line in lines:
        if re.search(r"[A-Z_]{6,}:", line):
            return line
    return lines[0]


def _hlo_counts(text: str) -> Tuple[Dict[str, int], Dict[str, int]]:
    """``(fused attention custom calls, collectives)`` in compiled HLO text (each op once, also in loop bodies)."""
    calls = {name: len(re.findall(r'custom_call_target="' + re.escape(name), text)) for name in FUSED_ATTENTION_CALLS}
    collectives = {}
    for op in COLLECTIVES:
        # synchronous "all-gather(" or the async pair's "all-gather-start(" (its "-done" is not another one)
        collectives[op] = len(re.findall(r"\s" + op + r"(?:-start)?\(", text))
    return {k: v for k, v in calls.items() if v}, {k: v for k, v in collectives.items() if v}


def _compile(name: str, lower, hbm: int) -> Dict[str, Any]:
    """Lowers and compiles one program; the report entry (module docstring)."""
    begin = time.perf_counter()
    entry: Dict[str, Any] = {"program": name}
    try:
        compiled = lower().compile()
    except Exception as err:  # XlaRuntimeError and friends: no stable import path across jax versions
        entry.update(ok=False, error=_one_line(err), compile_seconds=round(time.perf_counter() - begin, 1))
        return entry
    entry.update(ok=True, compile_seconds=round(time.perf_counter() - begin, 1))
    stats = compiled.memory_analysis()
    if stats is not None:
        memory = {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in
                  ("argument", "output", "alias", "temp", "generated_code")}
        memory["peak"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
        memory["hbm"] = hbm
        entry["memory"] = memory
    calls, collectives = _hlo_counts(compiled.as_text())
    entry.update(fused_attention_calls=calls, collectives=collectives)
    return entry


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _follower_columns(sgpo: Any, scale: float) -> int:
    """``J``, the atoms per pair of the precomputed follower (solved once on 8 made-up margins)."""
    from sgpo_jax.core.follow import follow

    n = max(8, int(sgpo.group_size or 0))
    return int(follow(jnp.linspace(-1.0, 1.0, n), sgpo, scale=scale).shift.shape[1])


def _step_batch(config: Any, sgpo: Any, follower: str, pairs: int, seq: int) -> Any:
    """The step's :class:`~sgpo_jax.core.step.PreferenceBatch` as the trainer builds it (shapes
    and dtypes of :func:`sgpo_jax.data.preference_batch` on a host batch), as ShapeDtypeStructs."""
    from sgpo_jax.data.batching import preference_batch

    tokens = np.zeros((pairs, seq), np.int32)
    host = {k: tokens for k in ("chosen_ids", "chosen_attention", "chosen_loss_mask", "rejected_ids",
                                "rejected_attention", "rejected_loss_mask")}
    host["index"] = np.arange(pairs, dtype=np.int32)
    host["weight"] = np.ones(pairs, np.float32)
    atoms = support = None
    if sgpo.mode == "sgpo" and follower != "step":
        scale = config.sgpo.annotation_scale if follower == "annotation" else sgpo.beta
        j = _follower_columns(sgpo, scale)
        atoms = (np.zeros((pairs, j), np.float32), np.full((pairs, j), 1.0 / j, np.float32))
        support = (0.0, 1.0) if sgpo.space == "margin" else None
    batch = preference_batch(host, (np.zeros(pairs), np.zeros(pairs)), atoms, support)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), batch)


def _programs(config: Any, model_cfg: Any, mesh: Mesh, hbm: int, only: Tuple[str, ...]) -> List[Dict[str, Any]]:
    from sgpo_jax.config import follower_of, sgpo_config
    from sgpo_jax.core.step import TrainState, make_sgpo_step
    from sgpo_jax.data.batching import default_buckets
    from sgpo_jax.models import Decoder, decoder_logps_fn
    from sgpo_jax.models import lora as lora_lib
    from sgpo_jax.parallel import sharding
    from sgpo_jax.parallel.mesh import BATCH_AXES, batch_split
    from sgpo_jax.ssapo.sampling import batch_keys, lower_generation
    from sgpo_jax.training.scoring import scoring_program
    from sgpo_jax.training.trainer import make_optimizer

    t = config.train
    ssapo = t.mode == "ssapo"
    sgpo = sgpo_config(config, mode=config.ssapo.round_mode if ssapo else None)
    follower = follower_of(config)
    seq = max(tuple(config.data.buckets)) if tuple(config.data.buckets) else int(config.data.max_length)
    model = Decoder(model_cfg)
    logps_fn = decoder_logps_fn(model, chunk_size=config.model.logps_chunk)
    ids = jnp.zeros((1, 2), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids)))
    param_shardings = sharding.param_sharding(params, mesh)
    params_in = _abstract(params, param_shardings)
    tx, _ = make_optimizer(t, 1000)
    lora = lora_lib.lora_config(config.model)
    reference_fn, reference_in = logps_fn, params_in
    if lora is None:
        state = jax.eval_shape(lambda p: TrainState.create(apply_fn=model.apply, params=p, tx=tx, config=sgpo,
                                                           rng=jax.random.PRNGKey(t.seed), logps_fn=logps_fn), params)
    else:  # the trainer's LoRA state: adapters (+ AdamW) trained on the frozen (maybe quantized) base
        step_logps_fn = lora_lib.lora_logps_fn(model, lora, chunk_size=config.model.logps_chunk)

        def lora_state(p):
            frozen, adapters = lora_lib.frozen_and_adapters(p, model, lora, jax.random.PRNGKey(t.seed))
            return TrainState.create(apply_fn=model.apply, params=adapters, tx=tx, config=sgpo,
                                     rng=jax.random.PRNGKey(t.seed), logps_fn=step_logps_fn, frozen=frozen)

        state = jax.eval_shape(lora_state, params)
        if lora.quantize:  # the reference is the quantized base with zero adapters (the policy at init)
            parts = (state.frozen, state.params)
            reference_fn, reference_in = step_logps_fn, _abstract(parts, sharding.param_sharding(parts, mesh))
    state_sharding = sharding.param_sharding(state, mesh)
    step_fn = make_sgpo_step(mesh, state, batch_axes=BATCH_AXES, state_sharding=state_sharding)
    batch = _step_batch(config, sgpo, follower, int(t.batch_size), seq)
    reference = _step_batch(config, sgpo_config(config, mode="dpo"), "step", int(t.reference_batch_size), seq)
    rows = sharding.batch_sharding(mesh)
    reference = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows), reference)
    s, e = config.ssapo, config.eval
    prompt = max(default_buckets(int(config.data.max_prompt_length)))
    key = jax.eval_shape(lambda: batch_keys(0, 0)[0])

    def prompts(b: int):
        axes, ways = batch_split(mesh)
        spec = NamedSharding(mesh, P(axes) if b % ways == 0 else P())  # as sharding.place_rows places them
        return (jax.ShapeDtypeStruct((b, prompt), jnp.int32, sharding=spec),
                jax.ShapeDtypeStruct((b, prompt), jnp.bool_, sharding=spec))

    # every program a run can execute; runner.plan(config) says which this run does
    programs = [("train_step", lambda: step_fn.lower(state, batch)),
                ("reference_logps", lambda: scoring_program(reference_fn, mesh).lower(reference_in, reference)),
                ("sample", lambda: lower_generation(
                    model, params_in, *prompts(int(s.generation_batch_size)), key,
                    max_new_tokens=int(s.max_new_tokens), temperature=float(s.temperature), top_p=float(s.top_p),
                    top_k=int(s.top_k), num_samples=int(s.num_samples))),
                ("eval_generate", lambda: lower_generation(
                    model, params_in, *prompts(int(e.batch_size)), key, max_new_tokens=int(e.max_new_tokens),
                    temperature=0.0))]
    lowerers = dict(programs)
    return [_compile(name, lowerers[name], hbm) for name in runner.plan(config).programs if not only or name in only]


def _largest_batch(config: Any, model_cfg: Any, mesh_shape: Dict[str, int], hbm: int) -> int:
    """The largest ``train.batch_size`` (a power of two times the rows one micro-batch step splits
    over, up to 4096) whose planner estimate fits ``hbm``; 0 if none does."""
    from sgpo_jax.training import memory

    unit = mesh_shape["data"] * mesh_shape["fsdp"] * int(config.train.micro_batches)
    best, size = 0, unit
    while size <= 4096:
        probe = config.copy_and_resolve_references()
        probe.train.batch_size = size
        if memory.plan_for_run(probe, model_cfg, mesh_shape).total > hbm:
            break
        best, size = size, size * 2
    return best


def _smallest_fit(config: Any, model_cfg: Any, target: Target) -> str:
    """The smallest slice (or GPU count) of the target's kind whose planner estimate fits the
    chip, with ``mesh.*`` as configured (a -1 axis takes the extra chips, else ``fsdp`` grows); ""
    if none up to 512 chips does."""
    from sgpo_jax.training import memory

    if target.platform == "tpu":
        generation = target.topology.split(":")[0]
        per_chip = TPU_CHIPS[generation][1]
        sizes = sorted(_TPU_SHAPES_3D if generation in ("v4", "v5p") else _TPU_SHAPES_2D)
        names = [(c, f"{generation}-{c * per_chip}") for c in sizes]
    else:
        names = [(c, f"{c}x{target.gpu}") for c in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)]
    axes = {"data": int(config.mesh.data), "fsdp": int(config.mesh.fsdp), "tensor": int(config.mesh.tensor)}
    grow = next((a for a, v in axes.items() if v == -1), "fsdp")
    others = math.prod(v for a, v in axes.items() if a != grow)
    for chips, name in names:
        if chips % others:
            continue
        mesh = dict(axes, **{grow: chips // others})
        try:
            if memory.plan_for_run(config, model_cfg, mesh).total <= target.hbm_bytes:
                return name
        except ValueError:
            continue
    return ""


def compile_run(config: Any, target: Any, *, model_cfg: Any = None, model_preset: str = "",
                vocab_size: Optional[int] = None, programs: Sequence[str] = ()) -> Dict[str, Any]:
    """Compiles every program of the run ``config`` for ``target`` (a :class:`Target` or its
    name) and returns the report (module docstring): ``{"target", "mesh", "model", "settings",
    "planner", "flops", "programs": [...]}``. Nothing is allocated on any device.

    ``model_cfg`` (a DecoderConfig) overrides the model; else :func:`model_config_for`.
    ``programs`` (names of :data:`PROGRAMS`) restricts the compiles; default all the run executes.
    """
    from sgpo_jax.config import validate
    from sgpo_jax.training import memory
    from sgpo_jax.training.flops import model_flops

    target = parse_target(target) if isinstance(target, str) else target
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise ConfigError(f"--programs: {unknown} are not programs of a run; choose from {list(PROGRAMS)}")
    if config.train.mode != "ssapo" and not config.data.source:
        config = config.copy_and_resolve_references()
        config.data.source = "(compile only)"
    validate(config)
    devices = target_devices(target)
    mesh = target_mesh(config, devices)
    if model_cfg is None:
        model_cfg = model_config_for(config, model_preset, vocab_size)
    seq = max(tuple(config.data.buckets)) if tuple(config.data.buckets) else int(config.data.max_length)
    flops = model_flops(model_cfg, int(config.train.batch_size), seq)
    with compat.compile_target(target.platform, target.cuda_capability):  # kernels and planner: the target's
        from sgpo_jax.models.attention import attention_kernel

        kernel = attention_kernel(model_cfg, seq)
        plan = memory.plan_for_run(config, model_cfg, dict(mesh.shape), device_bytes=target.hbm_bytes)
        with warnings.catch_warnings():  # what-if plans: uneven batch splits are expected, not news
            warnings.simplefilter("ignore")
            largest = _largest_batch(config, model_cfg, dict(mesh.shape), target.hbm_bytes)
            smallest = _smallest_fit(config, model_cfg, target)
        programs = _programs(config, model_cfg, mesh, target.hbm_bytes, tuple(programs))
    step = next((p for p in programs if p["program"] == "train_step"), {})
    if step.get("memory"):
        step["planner_bytes"] = plan.program_bytes  # the step program's share (QLoRA's caller's base is outside it)
        step["planner_ratio"] = plan.program_bytes / step["memory"]["peak"]
    return {
        "target": dataclasses.asdict(target), "device_kind": str(devices[0].device_kind),
        "mesh": dict(mesh.shape), "jax": jax.__version__,
        "model": {"layers": model_cfg.num_hidden_layers, "hidden": model_cfg.hidden_size,
                  "vocab": model_cfg.vocab_size, "params": memory.param_count(model_cfg),
                  "dtype": str(model_cfg.dtype), "param_dtype": str(model_cfg.param_dtype),
                  "remat": model_cfg.remat, "scan_layers": model_cfg.scan_layers, "attention": model_cfg.attention,
                  "attention_kernel": kernel},
        "settings": {"mode": config.train.mode, "batch_size": int(config.train.batch_size),
                     "micro_batches": int(config.train.micro_batches), "seq_len": seq,
                     "reference_batch_size": int(config.train.reference_batch_size)},
        "planner": {"total": plan.total, "lower_bound": plan.lower_bound, "components": plan.components,
                    "largest_batch": largest, "smallest_target": smallest},
        "flops": {"model_flops_per_step": flops["total"], "model_flops_per_step_causal": flops["total_causal"],
                  "tokens_per_step": flops["tokens"], "source": "formula (sgpo_jax.training.flops); "
                  "cost_analysis() is not used: it counts a scanned loop body once and skips Pallas kernels"},
        "programs": programs,
        "config_values": {k: config[k.split(".")[0]][k.split(".")[1]] for names in _REDUCE.values() for k in names},
    }


_REDUCE = {  # program -> the settings that reduce its memory
    "train_step": ("train.micro_batches", "model.remat", "model.scan_layers", "mesh.fsdp", "mesh.tensor",
                   "data.max_length", "train.batch_size"),
    "reference_logps": ("train.reference_batch_size", "mesh.fsdp", "mesh.tensor", "data.max_length"),
    "sample": ("ssapo.generation_batch_size", "ssapo.num_samples", "ssapo.max_new_tokens", "data.max_prompt_length",
               "mesh.tensor"),
    "eval_generate": ("eval.batch_size", "eval.max_new_tokens", "data.max_prompt_length", "mesh.tensor"),
}


def _reduce_hint(name: str, settings: Dict[str, Any]) -> str:
    now = ", ".join(f"{k} (now {settings[k]})" if k in settings else k for k in _REDUCE[name])
    return f"reduce its memory with {now}"


def refuse_if_oversized(report: Dict[str, Any]) -> None:
    """Raises :class:`ProgramDoesNotFit` for the first program that XLA refused for memory or
    whose peak exceeds the chip's memory, in one line naming the program and the settings that
    reduce its memory; any other compile error is raised as a :class:`ConfigError` line."""
    target = report["target"]["name"]
    for p in report["programs"]:
        name = p["program"]
        if not p["ok"] and ("RESOURCE_EXHAUSTED" in p["error"] or "memory" in p["error"].lower()):
            raise ProgramDoesNotFit(f"{name} does not fit {target}: {p['error']}",
                                    _reduce_hint(name, report["config_values"]))
        if not p["ok"]:
            raise ConfigError(f"{name} does not compile for {target}: {p['error']}")
        m = p.get("memory")
        if m and m["peak"] > m["hbm"]:
            raise ProgramDoesNotFit(f"{name} does not fit {target}: XLA peak {m['peak'] / GIB:.2f} GiB per chip > "
                                    f"{m['hbm'] / GIB:.2f} GiB", _reduce_hint(name, report["config_values"]))


def summary_lines(report: Dict[str, Any]) -> List[str]:
    """One line per program (and one for the run) of a :func:`compile_run` report."""
    t, m = report["target"], report["model"]
    lines = [f"{t['name']} ({report['device_kind']}, {t['chips']} chips x {t['hbm_bytes'] / GIB:.1f} GiB): mesh "
             f"{report['mesh']}, {m['params'] / 1e9:.2f}B params, attention {m['attention']} -> "
             f"{m['attention_kernel']}, model FLOPs per step {report['flops']['model_flops_per_step']:.3g}"]
    for p in report["programs"]:
        if not p["ok"]:
            lines.append(f"  {p['program']}: FAILED in {p['compile_seconds']} s: {p['error']}")
            continue
        mem = p.get("memory", {})
        text = (f"  {p['program']}: ok in {p['compile_seconds']} s; peak {mem.get('peak', 0) / GIB:.2f} GiB "
                f"(args {mem.get('argument', 0) / GIB:.2f}, temps {mem.get('temp', 0) / GIB:.2f}) of "
                f"{mem.get('hbm', 0) / GIB:.1f}")
        if "planner_bytes" in p:
            text += f"; planner {p['planner_bytes'] / GIB:.2f} GiB ({p['planner_ratio']:.2f}x)"
        text += f"; fused attention {p['fused_attention_calls'] or 'none'}; collectives {p['collectives'] or 'none'}"
        lines.append(text)
    return lines


def main(argv) -> None:
    """``python -m sgpo_jax.aot``: compile, print, write the JSON, exit 2 on a program that does not fit."""
    import sys

    from absl import flags

    from sgpo_jax.train import user_error_lines

    del argv
    flag = flags.FLAGS
    try:
        report = compile_run(flag.config, flag.target, model_preset=flag.model_preset, programs=flag.programs)
        for line in summary_lines(report):
            say(line)
        out = Path(flag.json or Path(tempfile.gettempdir()) / f"aot-{report['target']['name']}.json")
        out.write_text(json.dumps(report, indent=2, default=str))
        say(f"report: {out}")
        refuse_if_oversized(report)
    except UserError as err:
        if os.environ.get("SGPO_JAX_VERBOSE", "") not in ("", "0"):
            raise
        print("\n".join(user_error_lines(err)), file=sys.stderr)
        sys.exit(2)


def cli() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Training config file (e.g. configs/llama.py); override "
                                    "fields with --config.group.field=value.")
    flags.DEFINE_string("target", None, "v4-8, v5e-16, v5p-8, v6e-8, 2xv5e-16, v5p:2x2x2, 8xH100, 8xH200, 8xA100")
    flags.DEFINE_string("model_preset", "", "a shape from sgpo_jax.training.memory.MODEL_PRESETS instead of "
                        "model.source's config.json (e.g. llama3-8b, mistral-7b, llama3-70b)")
    flags.DEFINE_string("json", "", "where to write the report (default: the temp dir)")
    flags.DEFINE_list("programs", [], f"compile only these of {list(PROGRAMS)} (default: all the run executes)")
    flags.mark_flags_as_required(["config", "target"])
    jax.config.update("jax_platforms", "cpu")  # the host only traces; the target's compiler does the rest
    app.run(main)


if __name__ == "__main__":
    cli()
