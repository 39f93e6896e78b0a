r"""Per-device memory of one training step, estimated before compiling, and a check that refuses
plans that cannot fit.

:func:`estimate` adds up what one device holds at the peak of
:func:`sgpo_jax.core.step.sgpo_step` jitted over the mesh (``make_sgpo_step``), component by
component; :func:`check` compares it with the device's memory. Notation (all per device):

* ``P_x``: the parameter leaf ``x``'s element count divided by how many devices share it under
  :data:`sgpo_jax.parallel.sharding.DEFAULT_RULES` (``fsdp`` and ``tensor`` splits; ``data`` replicates);
* ``p``, ``s``: bytes per element of the parameter and compute dtypes;
* ``b = 2 * ceil(batch_size / micro_batches / (data * fsdp))``: sequences (chosen and rejected
  rows) per device in one micro-batch, ``T`` the padded length, ``tok = b * T``;
* ``H`` hidden, ``I`` intermediate, ``N``/``K`` query/key-value heads, ``D`` head_dim, ``V``
  vocab, ``L`` layers, ``t`` the tensor-parallel size, ``C`` the log-prob chunk.

Components:

============== =========================================================================
parameters     ``sum_x P_x * p`` (exact)
gradients      ``sum_x P_x * p``, twice with ``micro_batches > 1`` (accumulator + current)
optimizer      ``m * sum_x P_x * p``; ``m = 2`` for adam/adamw (mu, nu), 1 lion, 0 sgd
update         ``sum_x P_x * p``: the optimizer's update tree before it is applied (0 on a CUDA
               target, where XLA fuses it into the in-place parameter update)
weight copies  compute-dtype copies of the weights that the forward pass keeps for the
               backward pass: FSDP all-gathers (``fsdp > 1``) or casts (``s != p``; full
               fine-tuning only: a frozen LoRA base keeps no cast copy);
               ``L`` layers without remat, 2 with remat (re-gathered per layer), plus the
               output head (or the tied embedding) ``V * H / t * s``; the embedding lookup
               reads the sharded table
activations    no remat: ``L * tok * a``; remat: ``L * tok * H * s`` (the layer inputs)
               ``+ tok * a`` (one layer recomputed in the backward pass), with per token and
               layer ``a = s * (cH*H + cQ*N*D/t + cKV*K*D/t + cI*I/t) + (N/t) * S * cS``;
               ``S`` the key slots a query scores on average: ``(T + blk) / 2`` with the causal
               query blocks of ``attention_block = blk`` (``0 < blk < T``), else ``T``; with a
               fused kernel (cuDNN, splash) the score term is ``(N/t) * 4`` (a logsumexp per head)
log-probs      ``tok * (H * s + 4)`` (final hidden states, logsumexp) ``+ 2 * 4 * b * C * V / t``
               (one chunk's float32 logits and softmax) ``+ 4 * V * H / (t * fsdp)`` (the
               head's float32 gradient accumulator, sharded as the head), once more for tied
               embeddings
batch          ``2 * batch_size / (data * fsdp) * T * 12`` (ids, attention, loss masks, int32)
reference      with ``reference="model"``: a frozen copy ``sum_x P_x * p``; ``"cached"``: 0
============== =========================================================================

With LoRA (``lora=``, :mod:`sgpo_jax.models.lora`) the parameters are the frozen base ``sum_x P_x *
p`` plus the float32 adapters ``sum_a P_a * 4`` (``A [in, r]``, ``B [r, out]`` per targeted
projection, split like their kernel's input resp. output axis); gradients, optimizer moments and
the update tree cover the adapters only (``sum_a P_a * 4`` each), and every layer keeps each
projection's ``x A`` (``r`` elements per token) for the backward pass. The base is held once: the
step neither donates nor copies it (it is the caller's arrays). With QLoRA the frozen base is the
trainer's quantized tree, counted leaf by leaf at its bit width under the rules (the codes split like
their kernel, 8 or 4 bits each; the scales ``[.., 1, out]`` like its output axis); the caller
still holds the unquantized targeted kernels, ``sum_k P_k * p`` resident outside the step
(:data:`CALLERS_BASE`; :attr:`MemoryPlan.program_bytes` is the total without it). The reference is
the base with the adapters off, so it is never a second copy. The output head is not adapted, so
``log-probs`` has no head gradient accumulator (autodiff forms no cotangent for a frozen input:
the 8B recipe's XLA:GPU peak is the same for Llama-3's 128k and Mistral's 32k vocabularies,
``bench/results/aot-*-lora16-*.json``).

The activation coefficients are a least-squares fit to per-layer footprints on XLA:CPU, which
fuses little (``tests/test_memory.py`` compares whole-step estimates with
``compiled.memory_analysis()`` of the real jitted step): ``cH = 4.15, cQ = 3.8, cKV = 1.1, cI =
4.25`` elements and ``cS = 1.9 * 4 + s`` bytes per attention score (the float32 masked scores
and softmax, the probabilities in the compute dtype). The ``lower_bound`` uses the minimal set
any autodiff must keep for the backward pass without recomputation: the norms' inputs and
outputs (``4H``), the rotated queries and the attention output (``2ND``), rotated keys and
values (``2KD``), gate, up and their product (``3I``) and the probabilities (``cS = s``), one
chunk's logits, no update tree and only the weight copies a single layer needs. GPUs and TPUs
fuse more than the CPU, so expect the compiled peak between ``lower_bound`` and ``total``: on
one H100 (jax 0.11.2, ``bench/mfu.py``, TinyLlama-1.1B shape, bf16 compute, fp32 parameters) the
compiled peak was 0.74x (remat, 8 x 1024 tokens), 0.73x (remat, 16 x 1024) and 0.90x (no remat,
4 x 1024) of ``total``, and above ``lower_bound`` each time (einsum attention, before the fused
kernels' and the sharded head gradient's terms). Against XLA:TPU and XLA:GPU's compiled peaks of
the 7-8B recipes (:mod:`sgpo_jax.aot`, ``bench/results/aot-*.json``; fused attention) ``total``
is within 15% (README table). :func:`check` refuses a plan only
when even the lower bound exceeds the device ("clearly impossible"), and warns when the estimate
does.

Note (measured on XLA:CPU, jax 0.10): ``remat=True`` without ``scan_layers=True`` saves only
~7% there (the compiler keeps the recomputed forward's buffers); with scanned layers it
saves what the table says. The recommended large-model configs use both.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from sgpo_jax.errors import UserError

__all__ = ["MemoryPlan", "MemoryPlanError", "estimate", "check", "plan_for_run", "device_memory_bytes",
           "param_count", "format_bytes", "main", "verdict", "CALLERS_BASE", "MODEL_PRESETS", "OPTIMIZER_MOMENTS",
           "REFERENCE_SOURCES", "USABLE_FRACTION"]

OPTIMIZER_MOMENTS = {"adamw": 2, "adam": 2, "lion": 1, "sgd": 0}
REFERENCE_SOURCES = ("cached", "model")  # where the reference log-probs come from
CALLERS_BASE = "caller's base"  # QLoRA: the unquantized kernels the caller keeps (resident, outside the step)
USABLE_FRACTION = 0.92  # of a device's memory, what a step may use (the runtime and XLA keep the rest)

# per token and layer, in elements of the compute dtype (see the module docstring)
_CENTRAL = dict(h=4.15, q=3.8, kv=1.1, i=4.25, score_f32=1.9, score_compute=1.0)
_MINIMAL = dict(h=4.0, q=2.0, kv=2.0, i=3.0, score_f32=0.0, score_compute=1.0)


class MemoryPlanError(UserError, ValueError):
    """The plan cannot fit: the message names the component, the settings and what would fit."""


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one training step.

    Attributes:
      components: ``{name: bytes}`` of the estimate, in the module docstring's order.
      lower: ``{name: bytes}`` of the lower bound (the same names).
      notes: ``{name: formula with the numbers}``.
      settings: the inputs (mesh, batch, dtypes, remat, ...), for messages.
    """

    components: Dict[str, float]
    lower: Dict[str, float]
    notes: Dict[str, str]
    settings: Dict[str, Any]

    @property
    def total(self) -> float:
        """The estimated peak bytes per device."""
        return float(sum(self.components.values()))

    @property
    def lower_bound(self) -> float:
        """Bytes per device that any compilation of this step needs (see the module docstring)."""
        return float(sum(self.lower.values()))

    @property
    def program_bytes(self) -> float:
        """The estimate of the compiled step program alone: :attr:`total` less what stays resident
        outside it (:data:`CALLERS_BASE`); what ``memory_analysis()``'s peak measures."""
        return self.total - self.components.get(CALLERS_BASE, 0.0)

    @property
    def state_bytes(self) -> float:
        """Parameters + optimizer state: what the step's state argument occupies."""
        return self.components["parameters"] + self.components["optimizer"]

    def __str__(self) -> str:
        s = self.settings
        head = (f"memory per device: mesh {s['mesh']}, {s['batch_size']} pairs x {s['seq_len']} tokens in "
                f"{s['micro_batches']} micro-batch(es) ({s['rows_per_device']:g} sequences per device each), "
                f"params {s['param_dtype']}, compute {s['dtype']}, remat={s['remat']}, optimizer {s['optimizer']}, "
                f"reference {s['reference']}")
        width = max(len(k) for k in self.components)
        lines = [head, f"| {'component':<{width}} | {'estimate':>11} | {'lower bound':>11} | formula",
                 f"|{'-' * (width + 2)}|{'-' * 13}:|{'-' * 13}:|---"]
        for name, value in self.components.items():
            lines.append(f"| {name:<{width}} | {format_bytes(value):>11} | {format_bytes(self.lower[name]):>11} | "
                         f"{self.notes.get(name, '')}")
        lines.append(f"| {'total':<{width}} | {format_bytes(self.total):>11} | {format_bytes(self.lower_bound):>11} |")
        if s.get("device_bytes"):
            lines.append(f"device memory: {format_bytes(s['device_bytes'])} "
                         f"({100 * self.total / s['device_bytes']:.0f}% estimated, "
                         f"{100 * self.lower_bound / s['device_bytes']:.0f}% lower bound)")
        return "\n".join(lines)


def _mesh_sizes(mesh_shape: Any) -> Dict[str, int]:
    shape = dict(getattr(mesh_shape, "shape", mesh_shape))
    unknown = set(shape) - {"data", "fsdp", "tensor"}
    if unknown:
        raise ValueError(f"mesh_shape axes must be data/fsdp/tensor, got {sorted(unknown)}")
    sizes = {axis: int(shape.get(axis, 1)) for axis in ("data", "fsdp", "tensor")}
    bad = {k: v for k, v in sizes.items() if v < 1}
    if bad:
        raise ValueError(f"mesh_shape sizes must be >= 1 (resolve -1 against the device count first), got {bad}")
    return sizes


class _MeshShape:
    """What :func:`sgpo_jax.parallel.sharding.spec_for` reads from a mesh: ``.shape[axis]``."""

    def __init__(self, sizes: Mapping[str, int]):
        self.shape = dict(sizes)


def _param_shapes(model_cfg) -> Any:
    import jax
    import jax.numpy as jnp

    from sgpo_jax.models import Decoder

    ids = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(lambda: Decoder(model_cfg).init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids)))


def param_count(model_cfg) -> int:
    """Number of parameters of ``Decoder(model_cfg)``."""
    import jax

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(_param_shapes(model_cfg))))


def _per_device(tree: Any, sizes: Mapping[str, int], *, in_bytes: bool = False) -> float:
    """Per-device elements (``in_bytes``: bytes, at each leaf's dtype's bit width, 4 bits for
    nf4 codes) of a params tree (arrays or shapes) under the default rules."""
    import jax

    from sgpo_jax.parallel import sharding

    mesh = _MeshShape(sizes)
    total = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = sharding._path_str(path)
        spec = sharding.spec_for(name, tuple(leaf.shape), mesh)
        split = 1
        for axes in spec:
            for axis in (axes if isinstance(axes, tuple) else (axes,)) if axes is not None else ():
                split *= sizes[axis]
        width = jax.dtypes.itemsize_bits(leaf.dtype) / 8 if in_bytes else 1
        total += float(np.prod(leaf.shape)) / split * width
    return total


def _flat_names(tree: Any) -> Dict[str, Any]:
    """``{"params/layers/.../kernel": leaf}`` of a params tree."""
    import jax

    return {"/".join(str(getattr(key, "key", key)) for key in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _sharded_elements(model_cfg, sizes: Mapping[str, int]) -> Tuple[float, float, float]:
    """``(per-device elements of all params, of one layer's params (unsharded / t), the output
    head's elements (unsharded / t))`` under the default rules."""
    total = _per_device(_param_shapes(model_cfg), sizes)
    c = model_cfg
    h, i = c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h + (q + 2 * kv if c.attention_bias else 0)
    return total, layer / sizes["tensor"], c.vocab_size * h / sizes["tensor"]


def estimate(model_cfg, mesh_shape: Any, *, batch_size: int, micro_batches: int = 1, seq_len: int,
             param_dtype: Any = None, dtype: Any = None, remat: Optional[bool] = None,
             optimizer: str = "adamw", reference: str = "cached", logps_chunk: Optional[int] = None,
             device_bytes: Optional[float] = None, lora: Any = None,
             attention: Optional[str] = None) -> MemoryPlan:
    """Per-device memory of one :func:`sgpo_jax.core.step.sgpo_step` (see the module docstring).

    Args:
      model_cfg: the :class:`~sgpo_jax.models.DecoderConfig`.
      mesh_shape: ``{"data": d, "fsdp": f, "tensor": t}`` (missing axes are 1) or a ``Mesh``.
      batch_size: preference pairs per optimizer step (global, all hosts).
      micro_batches: gradient-accumulation micro-batches per step.
      seq_len: padded tokens per sequence (``data.max_length`` or the largest bucket).
      param_dtype, dtype: parameter and compute dtypes (default: the model config's).
      remat: rematerialize each layer (default: ``model_cfg.remat``).
      optimizer: one of :data:`OPTIMIZER_MOMENTS`.
      reference: ``"cached"`` (log-probs precomputed, the trainer's way) or ``"model"`` (a
        frozen reference copy resident on the devices).
      logps_chunk: sequence positions per chunk of the log-prob head (default: the library's).
      device_bytes: if given, shown in the table.
      lora: a :class:`sgpo_jax.models.lora.LoraConfig` to train adapters on a frozen base (see
        the module docstring), or None for full fine-tuning.
      attention: the attention kernel the step runs (``"xla"``, ``"cudnn"``, ``"splash"``); default
        :func:`sgpo_jax.models.attention.attention_kernel` of ``model_cfg`` on the target platform.
        The fused kernels hold no ``[T, S]`` score matrix.

    Raises:
      ValueError: naming the setting, when the batch does not split over the mesh or a value
        is out of range.
    """
    import jax.numpy as jnp

    from sgpo_jax.models import DEFAULT_CHUNK_SIZE

    sizes = _mesh_sizes(mesh_shape)
    if optimizer not in OPTIMIZER_MOMENTS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_MOMENTS)}, got {optimizer!r}")
    if reference not in REFERENCE_SOURCES:
        raise ValueError(f"reference must be one of {REFERENCE_SOURCES}, got {reference!r}")
    if micro_batches < 1 or batch_size < 1 or seq_len < 2:
        raise ValueError(f"need batch_size >= 1, micro_batches >= 1, seq_len >= 2; got {batch_size}, "
                         f"{micro_batches}, {seq_len}")
    shards = sizes["data"] * sizes["fsdp"]
    if batch_size % micro_batches:
        raise ValueError(f"train.batch_size ({batch_size}) must be a multiple of train.micro_batches ({micro_batches})")
    if (batch_size // micro_batches) % shards:
        warnings.warn(
            f"a micro-batch of {batch_size // micro_batches} pairs (train.batch_size={batch_size} / "
            f"train.micro_batches={micro_batches}) does not split evenly over mesh.data * mesh.fsdp = {shards} "
            f"devices: some hold padding or repeat work; use train.micro_batches <= {max(batch_size // shards, 1)} "
            f"with batch_size / micro_batches a multiple of {shards}", stacklevel=2)
    p = jnp.dtype(param_dtype if param_dtype is not None else model_cfg.param_dtype).itemsize
    s = jnp.dtype(dtype if dtype is not None else model_cfg.dtype).itemsize
    remat = model_cfg.remat if remat is None else bool(remat)
    chunk = min(int(logps_chunk or DEFAULT_CHUNK_SIZE), seq_len - 1)
    c = model_cfg
    t = sizes["tensor"]
    b = 2 * math.ceil(batch_size / micro_batches / shards)
    tok = b * seq_len
    H, I, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    ND, KD, N = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.num_attention_heads

    elements, layer_elements, head_elements = _sharded_elements(c, sizes)
    weights = elements * p
    trained, trained_elements, lora_per_token, notes_quantized, callers_base = weights, elements, 0.0, "", 0.0
    if lora is not None:
        import jax

        from sgpo_jax.models.lora import init_adapters, target_modules

        base_shapes = _param_shapes(c)
        shapes = jax.eval_shape(lambda: init_adapters(base_shapes, lora, jax.random.PRNGKey(0)))
        trained_elements = _per_device(shapes, sizes)
        trained = trained_elements * 4
        lora_per_token = s * lora.rank * len(target_modules(lora))
        if lora.quantize:  # QLoRA: the trainer's quantized base, leaf by leaf, sharded by the rules
            from sgpo_jax.models import Decoder
            from sgpo_jax.models.lora import quantize_base

            base_p = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(param_dtype or c.param_dtype)),
                                  base_shapes)
            targeted = "(" + "|".join(target_modules(lora)) + ")/kernel"
            kernels = {k: v for k, v in _flat_names(base_p).items() if re.search(targeted + "$", k)}
            frozen = jax.eval_shape(lambda b: quantize_base(b, Decoder(c), lora), base_p)
            weights = _per_device(frozen, sizes, in_bytes=True)
            callers_base = _per_device(kernels, sizes) * p
            notes_quantized = f"; {targeted} in {lora.quantize}"

    if attention is None:
        from sgpo_jax.models.attention import attention_kernel

        attention = attention_kernel(c, seq_len)
    block = int(getattr(c, "attention_block", 0) or 0)
    keys = (seq_len + block) / 2 if 0 < block < seq_len else seq_len  # key slots a query scores, on average

    def per_token(k: Mapping[str, float]) -> float:
        if attention != "xla":  # fused kernels keep no score matrix, only a float32 logsumexp per query head
            return s * (k["h"] * H + k["q"] * ND / t + k["kv"] * KD / t + k["i"] * I / t) + lora_per_token + N / t * 4
        return (s * (k["h"] * H + k["q"] * ND / t + k["kv"] * KD / t + k["i"] * I / t) + lora_per_token
                + N / t * keys * (4 * k["score_f32"] + s * k["score_compute"]))

    # a frozen (LoRA) base's casts are not kept for the backward pass: no weight gradient needs them (XLA:GPU
    # compiles the 8B LoRA step with the same temporaries on a float32 and a bfloat16 base)
    copies = sizes["fsdp"] > 1 or (s != p and lora is None)
    kept_layers = 2 if remat else L
    comp: Dict[str, float] = {}
    low: Dict[str, float] = {}
    notes: Dict[str, str] = {}
    comp["parameters"] = low["parameters"] = weights + (trained if lora is not None else 0.0)
    notes["parameters"] = f"{elements:,.0f} elements x {p} B" + (
        f" (frozen{notes_quantized}) + {trained_elements:,.0f} LoRA elements x 4 B" if lora is not None else "")
    what = "LoRA adapters" if lora is not None else "parameters"
    grads = 2 if micro_batches > 1 else 1
    comp["gradients"] = low["gradients"] = grads * trained
    notes["gradients"] = f"{grads} x {what}" + (" (accumulator + micro-batch)" if grads == 2 else "")
    moments = OPTIMIZER_MOMENTS[optimizer]
    comp["optimizer"] = low["optimizer"] = moments * trained
    notes["optimizer"] = f"{optimizer}: {moments} x {what}"
    # XLA:GPU fuses the optimizer's elementwise update into the in-place write of the donated
    # parameters; XLA:TPU and XLA:CPU materialize the update tree (compiled peaks of the same step:
    # sgpo_jax.aot, bench/results/aot-*.json)
    from sgpo_jax import compat

    fused_update = compat.target_platform() == "cuda"
    comp["update"] = 0.0 if fused_update else trained
    low["update"] = 0.0
    notes["update"] = ("fused into the parameter update (XLA:GPU)" if fused_update
                       else f"1 x {what} (the update tree)")
    comp["weight copies"] = (kept_layers * layer_elements + head_elements) * s if copies else 0.0
    low["weight copies"] = (layer_elements + head_elements) * s if copies else 0.0
    notes["weight copies"] = (f"{kept_layers} layer(s) of {layer_elements:,.0f} + head {head_elements:,.0f} "
                              f"elements x {s} B" if copies else "none (no FSDP, compute dtype = parameter dtype)")
    if remat:
        comp["activations"] = L * tok * H * s + tok * per_token(_CENTRAL)
        low["activations"] = L * tok * H * s + tok * per_token(_MINIMAL)
        notes["activations"] = f"remat: {L} x {tok:g} tok x H x {s} B + one layer ({per_token(_CENTRAL):,.0f} B/tok)"
    else:
        comp["activations"] = L * tok * per_token(_CENTRAL)
        low["activations"] = L * tok * per_token(_MINIMAL)
        notes["activations"] = f"{L} layers x {tok:g} tok x {per_token(_CENTRAL):,.0f} B/tok"
    # the head's float32 gradient accumulator is sharded like the head (fsdp and tensor)
    head_grad = 0.0 if lora is not None else 4 * V * H / (t * sizes["fsdp"]) * (2 if c.tie_word_embeddings else 1)
    comp["log-probs"] = tok * (H * s + 4) + 2 * 4 * b * chunk * V / t + head_grad
    low["log-probs"] = tok * (H * s + 4) + 4 * b * chunk * V / t
    notes["log-probs"] = f"hidden + lse, chunk {chunk}: 2 x 4 x {b:g} x {chunk} x V/t" + (
        ", head grad" if head_grad else "")
    comp["batch"] = low["batch"] = 2 * batch_size / shards * seq_len * 12 + 4 * 4 * batch_size / shards
    notes["batch"] = "token ids, attention and loss masks (int32)"
    comp["reference"] = low["reference"] = weights if reference == "model" else 0.0
    notes["reference"] = "frozen copy of the parameters" if reference == "model" else "cached log-probs (none resident)"
    if callers_base:
        comp[CALLERS_BASE] = low[CALLERS_BASE] = callers_base
        notes[CALLERS_BASE] = "QLoRA: the unquantized targeted kernels the caller holds (outside the step)"
    settings = dict(mesh=sizes, batch_size=batch_size, micro_batches=micro_batches, seq_len=seq_len,
                    rows_per_device=b, param_dtype=str(jnp.dtype(param_dtype if param_dtype is not None
                                                                 else c.param_dtype)),
                    dtype=str(jnp.dtype(dtype if dtype is not None else c.dtype)), remat=remat,
                    optimizer=optimizer, reference=reference, logps_chunk=chunk, device_bytes=device_bytes,
                    attention=attention, model_cfg=c, lora=lora)
    return MemoryPlan(comp, low, notes, settings)


def _replan(plan: MemoryPlan, **changes) -> MemoryPlan:
    s = dict(plan.settings)
    mesh = dict(s["mesh"], **changes.pop("mesh", {}))
    kwargs = dict(batch_size=s["batch_size"], micro_batches=s["micro_batches"], seq_len=s["seq_len"],
                  param_dtype=s["param_dtype"], dtype=s["dtype"], remat=s["remat"], optimizer=s["optimizer"],
                  reference=s["reference"], logps_chunk=s["logps_chunk"], lora=s["lora"],
                  attention=None if "seq_len" in changes else s["attention"])  # another length: choose again
    kwargs.update(changes)
    return estimate(s["model_cfg"], mesh, **kwargs)


def _alternatives(plan: MemoryPlan, limit: float) -> List[str]:
    """Single changes of the settings whose estimate fits ``limit`` bytes, cheapest first."""
    s = plan.settings
    mesh = s["mesh"]
    tries: List[Tuple[str, Dict[str, Any]]] = []
    if not s["remat"]:
        tries.append(("model.remat=True (with model.scan_layers=True)", dict(remat=True)))
    shards = mesh["data"] * mesh["fsdp"]
    for k in (2, 4, 8, 16, 32):
        m = s["micro_batches"] * k
        if s["batch_size"] % m == 0 and (s["batch_size"] // m) % shards == 0:
            tries.append((f"train.micro_batches={m}", dict(micro_batches=m)))
    if mesh["data"] > 1:
        tries.append((f"mesh.fsdp={mesh['fsdp'] * mesh['data']}, mesh.data=1 (shard the state instead of "
                      "replicating it)", dict(mesh=dict(data=1, fsdp=mesh["fsdp"] * mesh["data"]))))
    if s["dtype"] != "bfloat16":
        tries.append(("model.dtype=bfloat16", dict(dtype="bfloat16")))
    if s["reference"] == "model":
        tries.append(("cached reference log-probs", dict(reference="cached")))
    for length in (s["seq_len"] // 2, s["seq_len"] // 4):
        if length >= 16:
            tries.append((f"data.max_length={length}", dict(seq_len=length)))
    out = []
    for label, change in tries:
        try:
            alt = _replan(plan, **change)
        except ValueError:
            continue
        if alt.total <= limit:
            out.append((alt.total, f"{label} -> {format_bytes(alt.total)}"))
    return [text for _, text in sorted(out)]


def verdict(plan: MemoryPlan, device_bytes: Optional[float]) -> str:
    """In words, whether ``plan`` fits ``device_bytes`` per device (:data:`USABLE_FRACTION` of it
    usable), or that the device memory is unknown (CPU)."""
    if device_bytes is None:
        return "device memory unknown (CPU)"
    fits = "fits" if plan.total <= USABLE_FRACTION * device_bytes else "does NOT fit"
    return f"{fits} {format_bytes(device_bytes)} per device"


def check(plan: MemoryPlan, device_bytes: Optional[float], *, usable_fraction: float = USABLE_FRACTION) -> MemoryPlan:
    """Refuses plans that clearly cannot fit; warns about those that may not.

    ``device_bytes * usable_fraction`` is what a step may use (the runtime and XLA keep some).
    If even ``plan.lower_bound`` exceeds it, raises :class:`MemoryPlanError` naming the largest
    components, the settings behind them and single changes that would fit; if only the
    estimate exceeds it, warns (``ResourceWarning``) with the same advice. ``device_bytes=None``
    (e.g. CPU) checks nothing. Returns ``plan``.
    """
    if device_bytes is None:
        return plan
    limit = float(device_bytes) * usable_fraction
    if plan.total <= limit:
        return plan
    s = plan.settings
    biggest = sorted(plan.components.items(), key=lambda kv: -kv[1])[:3]
    advice = _alternatives(plan, limit)
    message = (
        f"{'needs at least' if plan.lower_bound > limit else 'is estimated at'} "
        f"{format_bytes(plan.lower_bound if plan.lower_bound > limit else plan.total)} per device but "
        f"{format_bytes(limit)} are usable ({usable_fraction:.0%} of {format_bytes(device_bytes)}); "
        f"largest: {', '.join(f'{k} {format_bytes(v)}' for k, v in biggest)} "
        f"(mesh {s['mesh']}, train.batch_size={s['batch_size']}, train.micro_batches={s['micro_batches']}, "
        f"data.max_length={s['seq_len']}, model.remat={s['remat']}, model.dtype={s['dtype']}, "
        f"model.param_dtype={s['param_dtype']}). "
        + (f"Each of these alone would fit: {'; '.join(advice)}." if advice else
           "No single change fits: shard over more devices (mesh.fsdp / mesh.tensor) and combine remat, "
           "micro-batches and a shorter data.max_length.")
        + f"\n{plan}"
    )
    if plan.lower_bound > limit:
        raise MemoryPlanError("this training step cannot fit in device memory: it " + message)
    warnings.warn("this training step may not fit in device memory: it " + message, ResourceWarning, stacklevel=2)
    return plan


def device_memory_bytes(device: Any = None) -> Optional[int]:
    """The accelerator's memory (``memory_stats()["bytes_limit"]``) or None (CPU, unknown)."""
    import jax

    device = device if device is not None else jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement it
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def plan_for_run(config: Any, model_cfg, mesh_shape: Any, *, device_bytes: Optional[float] = None) -> MemoryPlan:
    """:func:`estimate` for a training config (``sgpo_jax/config.py`` fields): batch, micro-batches,
    ``data.max_length`` (or the largest bucket), dtypes, remat, log-prob chunk; the trainer's
    optimizer (AdamW), cached reference log-probs and ``model.lora``."""
    from sgpo_jax.models.lora import lora_config

    buckets = tuple(config.data.buckets)
    seq_len = max(buckets) if buckets else int(config.data.max_length)
    return estimate(model_cfg, mesh_shape, batch_size=int(config.train.batch_size),
                    micro_batches=int(config.train.micro_batches), seq_len=seq_len,
                    param_dtype=config.model.param_dtype, dtype=config.model.dtype, remat=bool(config.model.remat),
                    optimizer="adamw", reference="cached", logps_chunk=int(config.model.logps_chunk),
                    device_bytes=device_bytes, lora=lora_config(config.model))


MODEL_PRESETS = {  # DecoderConfig fields of common shapes (for the CLI and quick what-ifs)
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, head_dim=128),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, head_dim=64),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
}


def main(argv: Optional[Iterable[str]] = None) -> int:
    """``python -m sgpo_jax.training.memory --model=llama3-8b --mesh=data=2,fsdp=8 --batch_size=32
    --micro_batches=2 --seq_len=2048 --device_gb=80``: prints the plan and the check's verdict
    (exit status 1 if it cannot fit). ``--model`` is a preset or a Hugging Face ``config.json``."""
    import argparse
    import json
    from pathlib import Path

    from sgpo_jax.models import DecoderConfig
    from sgpo_jax.models.lora import LoraConfig

    p = argparse.ArgumentParser(prog="python -m sgpo_jax.training.memory", description=main.__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama3-8b", help=f"one of {sorted(MODEL_PRESETS)} or a config.json path")
    p.add_argument("--mesh", default="fsdp=1", help="e.g. data=2,fsdp=8,tensor=1")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--micro_batches", type=int, default=1)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--param_dtype", default="float32")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZER_MOMENTS))
    p.add_argument("--reference", default="cached", choices=REFERENCE_SOURCES)
    p.add_argument("--logps_chunk", type=int, default=256)
    p.add_argument("--lora_rank", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    p.add_argument("--lora_alpha", type=float, default=16.0)
    p.add_argument("--lora_quantize", default="", choices=("", "int8", "nf4"), help="QLoRA's frozen base")
    p.add_argument("--device_gb", type=float, default=None, help="device memory in GB (1e9 bytes), e.g. 80 or 95")
    args = p.parse_args(None if argv is None else list(argv))
    if args.model in MODEL_PRESETS:
        cfg = DecoderConfig(**MODEL_PRESETS[args.model])
    else:
        import transformers

        raw = json.loads(Path(args.model).read_text())
        cfg = DecoderConfig.from_hf(transformers.AutoConfig.for_model(**raw))
    mesh = {}
    for part in filter(None, args.mesh.split(",")):
        axis, _, size = part.partition("=")
        mesh[axis.strip()] = int(size)
    device_bytes = args.device_gb * 1e9 if args.device_gb else None
    plan = estimate(cfg, mesh, batch_size=args.batch_size, micro_batches=args.micro_batches, seq_len=args.seq_len,
                    param_dtype=args.param_dtype, dtype=args.dtype, remat=args.remat, optimizer=args.optimizer,
                    reference=args.reference, logps_chunk=args.logps_chunk, device_bytes=device_bytes,
                    lora=LoraConfig(args.lora_rank, args.lora_alpha, quantize=args.lora_quantize)
                    if args.lora_rank else None)
    print(f"{args.model}: {param_count(cfg):,} parameters")
    print(plan)
    if device_bytes is None:
        return 0
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check(plan, device_bytes)
    except MemoryPlanError as err:
        print(f"\nREFUSED: {str(err).splitlines()[0]}")
        return 1
    risky = [w for w in caught if issubclass(w.category, ResourceWarning)]
    print(f"\nRISKY: {str(risky[0].message).splitlines()[0]}" if risky else "\nFITS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
