r"""Parameter sharding by name rules, and batch placement on the mesh.

The mesh (:mod:`sgpo_jax.parallel.mesh`) has three named axes:

* ``data``: pure data parallelism (parameters replicated along it);
* ``fsdp``: data parallelism with parameters (and optimizer state) sharded along it, ZeRO-3 style;
* ``tensor``: tensor (model) parallelism inside attention heads, MLP columns and the vocabulary.

The batch (pair) axis of activations is split over ``("data", "fsdp")``. Parameters are placed
by :data:`DEFAULT_RULES`: a list of ``(regex, PartitionSpec)`` matched (``re.search``) against the
parameter's path joined with ``/`` (e.g. ``params/layers_3/self_attn/q_proj/kernel``); the first
match wins. Kernels shard their input dimension over ``fsdp`` and their output dimension over
``tensor`` (Megatron column/row split: q/k/v, gate and up are column-parallel, o and down are
row-parallel), the embedding shards the vocabulary over ``tensor`` and the hidden size over
``fsdp``, norms are replicated. Scanned layers (a leading ``[num_layers]`` axis) get ``None``
prepended automatically.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import re
from typing import Any, Iterator, Optional, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sgpo_jax.parallel.mesh import BATCH_AXES, auto_mesh, batch_split, check_batch_layout

DEFAULT_RULES: Tuple[Tuple[str, P], ...] = (
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),  # [V, H]
    (r"(q_proj|k_proj|v_proj)/kernel$", P("fsdp", "tensor")),  # [H, heads * D]
    (r"(q_proj|k_proj|v_proj)/bias$", P("tensor")),
    (r"o_proj/kernel$", P("tensor", "fsdp")),  # [heads * D, H]
    (r"(gate_proj|up_proj)/kernel$", P("fsdp", "tensor")),  # [H, I]
    (r"down_proj/kernel$", P("tensor", "fsdp")),  # [I, H]
    (r"lm_head/kernel$", P("fsdp", "tensor")),  # [H, V]
    (r"(norm|layernorm)/weight$", P()),
)

__all__ = ["DEFAULT_RULES", "spec_for", "param_sharding", "shard_params",
           "batch_sharding", "mesh_of", "place_rows", "place_local_rows", "activation_sharding",
           "current_activation_mesh", "constrain_batch"]

_ACTIVATION_MESH: contextvars.ContextVar[Optional[Mesh]] = contextvars.ContextVar("sgpo_activation_mesh",
                                                                                  default=None)


def _path_str(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def spec_for(name: str, shape: Tuple[int, ...], mesh: Mesh, rules=DEFAULT_RULES) -> P:
    """The PartitionSpec of one parameter; checks that every sharded dimension divides.

    Unmatched parameters are replicated. A rule with fewer entries than the array's rank is
    right-aligned (extra leading axes, e.g. scanned layers, stay unsharded). The leaves that
    belong to a kernel ``[.., in, out]`` (see :mod:`sgpo_jax.models.lora`) follow its rule
    ``(s_in, s_out)``: LoRA's ``kernel_lora_a [.., in, r]`` gets ``(s_in, None)`` and
    ``kernel_lora_b [.., r, out]`` ``(None, s_out)`` (the rank axis is never split); QLoRA's
    quantized kernel (qwix's ``kernel/array/qvalue [.., in, out]``, the codes) gets ``(s_in,
    s_out)`` and its per-output-channel scales (``kernel/array/scale [.., 1, out]``) ``(None, s_out)``.
    """
    derived = re.search(r"/kernel(_lora_a|_lora_b|/array/qvalue|/array/scale)$", name)
    if derived:
        kernel = spec_for(name[:derived.start()] + "/kernel", (1, 1), _Unsplit(), rules)
        s_in, s_out = P(*([None] * (2 - len(kernel)) + list(kernel)))
        spec = {"_lora_a": P(s_in, None), "_lora_b": P(None, s_out), "/array/qvalue": P(s_in, s_out),
                "/array/scale": P(None, s_out)}[derived.group(1)]
        rules = ((re.escape(name) + "$", spec),)
    for pattern, spec in rules:
        if re.search(pattern, name):
            break
    else:
        return P()
    if not len(spec):
        return spec
    if len(spec) > len(shape):
        raise ValueError(f"sharding rule {pattern!r} {spec} has more axes than parameter {name} {shape}")
    spec = P(*([None] * (len(shape) - len(spec)) + list(spec)))
    for dim, axes in zip(shape, spec):
        if axes is None:
            continue
        axes = axes if isinstance(axes, tuple) else (axes,)
        size = int(np.prod([mesh.shape[a] for a in axes]))
        if dim % size:
            raise ValueError(
                f"cannot shard parameter {name} of shape {shape} with {spec}: dimension {dim} is not "
                f"divisible by mesh axes {axes} of total size {size} (mesh {dict(mesh.shape)}); "
                "choose a mesh whose axis sizes divide it, or override the rule"
            )
    return spec


class _Unsplit:
    """A stand-in mesh whose axes all have size 1 (reads a rule without checking divisibility)."""

    shape = collections.defaultdict(lambda: 1)


def param_sharding(params: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """A pytree of ``NamedSharding`` matching ``params`` (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(_path_str(path), tuple(x.shape), mesh, rules)), params
    )


def shard_params(params: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """Places ``params`` on ``mesh`` by the rules (each device receives only its shards)."""
    return jax.device_put(params, param_sharding(params, mesh, rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (pair) axis split over ``("data", "fsdp")``, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def mesh_of(tree: Any) -> Optional[Mesh]:
    """The mesh of the first leaf of ``tree`` placed on a multi-device mesh (e.g. parameters
    after :func:`shard_params`), or None (NumPy leaves, one device)."""
    for leaf in jax.tree.leaves(tree):
        placement = getattr(leaf, "sharding", None)
        if isinstance(placement, NamedSharding) and placement.mesh.size > 1:
            return placement.mesh
    return None


def place_rows(mesh: Optional[Mesh], *trees: Any) -> Tuple[Any, ...]:
    """Host arrays ``[B, ...]`` (pytrees of them), the same on every process, as global arrays on
    ``mesh`` with their rows split over the batch axes (:func:`batch_sharding`), so forward
    passes and generation over them are data-parallel across devices and hosts. An array whose
    ``B`` does not divide over the batch axes (or a mesh without them) is replicated instead;
    with ``mesh=None`` the trees come back as they are. Each process copies only the rows its
    own devices hold."""
    if mesh is None:
        return trees
    mesh = auto_mesh(mesh)
    axes, ways = batch_split(mesh)

    def place(x):
        x = np.asarray(x)
        split = bool(axes) and x.ndim > 0 and x.shape[0] % ways == 0
        target = NamedSharding(mesh, P(axes) if split else P())
        return jax.make_array_from_callback(x.shape, target, lambda index: x[index])

    return tuple(jax.tree.map(place, tree) for tree in trees)


def place_local_rows(tree: Any, mesh: Mesh) -> Any:
    """This host's rows ``[b, ...]`` (a pytree of NumPy arrays) -> global arrays ``[P * b, ...]``
    split over the mesh's batch axes (all hosts together): host ``p``'s rows become global rows
    ``[p * b, (p + 1) * b)``. A mesh whose batch axes do not split the hosts apart raises
    (:func:`~sgpo_jax.parallel.mesh.check_batch_layout`) instead of mixing the hosts' rows."""
    target = batch_sharding(mesh)
    rows = jax.tree.leaves(tree)[0].shape[0]
    check_batch_layout(target, rows * jax.process_count())
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(target, np.asarray(x)), tree)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh) -> Iterator[Mesh]:
    """While active (around tracing), :func:`constrain_batch` pins activations to ``mesh``."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield mesh
    finally:
        _ACTIVATION_MESH.reset(token)


def current_activation_mesh() -> Optional[Mesh]:
    """The mesh of the :func:`activation_sharding` in force, or None."""
    return _ACTIVATION_MESH.get()


def constrain_batch(x: jax.Array) -> jax.Array:
    """Sharding constraint for an activation ``[B, ...]``: batch split over ``("data", "fsdp")``,
    other axes replicated, so the compiler keeps the residual stream data-parallel between layers
    instead of guessing from the (FSDP-sharded) weights. A no-op outside
    :func:`activation_sharding` (single device, or callers that do not shard)."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None:
        return x
    axes, _ = batch_split(mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(axes, *([None] * (x.ndim - 1)))))
