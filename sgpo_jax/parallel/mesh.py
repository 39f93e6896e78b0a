r"""Device meshes: the ``(data, fsdp, tensor)`` mesh over every host's devices, and where a
batch's rows live on it.

The mesh is the element-wise product of a per-host ("ICI") mesh and a cross-host ("DCN") mesh.
``tensor`` stays inside a host (its all-reduces run every layer), then the host's remaining
devices take ``fsdp`` (its all-gathers run every layer too), then ``data``; what is left of
``fsdp`` and ``data`` spans hosts, ``data`` first (one gradient all-reduce per step). Example,
2 hosts x 8 GPUs, ``data=2, fsdp=8, tensor=1``: per host ``(1, 8, 1)``, across hosts
``(2, 1, 1)`` (FSDP inside a node, data parallel between nodes, i.e. HSDP). Each host's devices
hold one contiguous block of the batch axis, rows ``[p * b, (p + 1) * b)`` for process ``p`` and
``b = B / process_count``: exactly the rows :class:`sgpo_jax.data.PairBatcher` gives that host,
so ``jax.make_array_from_process_local_data`` assembles the same global batch a single process
would see.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from sgpo_jax.console import warn

__all__ = ["AXES", "BATCH_AXES", "auto_mesh", "batch_split", "make_mesh", "mesh_sizes", "split_mesh_shape",
           "device_grid", "host_batch_rows", "check_batch_layout"]

AXES = ("data", "fsdp", "tensor")


BATCH_AXES = ("data", "fsdp")


def batch_split(mesh: Mesh) -> Tuple[Tuple[str, ...], int]:
    """``(axes, ways)``: the :data:`BATCH_AXES` that ``mesh`` has, and the number of ways a batch's
    rows split over them (their sizes' product; 1 without any)."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return axes, math.prod(mesh.shape[a] for a in axes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all, on every host), axes in
    ``Auto`` mode.

    One size may be ``-1``: it takes whatever the others leave. The product must equal the
    device count; ``tensor`` varies fastest (neighbouring devices, i.e. within a host). With
    several processes the devices are laid out host-aware (:mod:`sgpo_jax.parallel.distributed`):
    ``tensor`` must divide a host's device count and stays inside a host, then ``fsdp``, then
    ``data``; what remains of ``data``/``fsdp`` spans hosts, and every host's devices hold one
    contiguous block of the batch axis (the rows its :class:`~sgpo_jax.data.PairBatcher` reads).
    One process on TPU uses the topology-aware order of ``mesh_utils.create_device_mesh``.
    Explicit ``devices`` are always taken in the order given.
    """
    topology = devices is None
    devices = list(jax.devices() if devices is None else devices)
    grid = device_grid(mesh_sizes(data, fsdp, tensor, len(devices)), devices, topology=topology)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * 3)


def mesh_sizes(data: int, fsdp: int, tensor: int, device_count: int) -> Tuple[int, int, int]:
    """The ``(data, fsdp, tensor)`` sizes of :func:`make_mesh` over ``device_count`` devices,
    the ``-1`` (at most one) resolved to what the others leave.

    Raises:
      ValueError: naming the ``mesh.*`` settings and the device count when the sizes are not
        positive (or -1) or their product is not the device count.
    """
    sizes = [int(data), int(fsdp), int(tensor)]
    given = f"mesh.data={data}, mesh.fsdp={fsdp}, mesh.tensor={tensor}"
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"{given}: mesh sizes must be positive, at most one -1 (what the others leave)")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if device_count % known:
            raise ValueError(f"{given}: the {device_count} devices are not divisible by the product of the other "
                             f"sizes ({known})")
        sizes[sizes.index(-1)] = device_count // known
    if int(np.prod(sizes)) != device_count:
        raise ValueError(f"{given}: data*fsdp*tensor = {sizes[0]}*{sizes[1]}*{sizes[2]} = {int(np.prod(sizes))} but "
                         f"there are {device_count} devices")
    return sizes[0], sizes[1], sizes[2]


def split_mesh_shape(sizes: Sequence[int], per_host: int, hosts: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """``(per_host_shape, across_hosts_shape)`` of a ``(data, fsdp, tensor)`` mesh, element-wise
    product = ``sizes``: ``tensor`` inside the host, then as much ``fsdp`` as the host's remaining
    devices allow (their gcd), the rest of the host to ``data``; ``data`` and ``fsdp`` leftovers
    span hosts.

    >>> split_mesh_shape((2, 8, 1), per_host=8, hosts=2)
    ((1, 8, 1), (2, 1, 1))
    >>> split_mesh_shape((1, 16, 1), per_host=8, hosts=2)
    ((1, 8, 1), (1, 2, 1))

    Raises:
      ValueError: naming ``mesh.tensor`` when it does not divide the devices per host (tensor
        parallelism across hosts would put a per-layer all-reduce on the slow network), or the
        axes when the rest does not split into whole hosts.
    """
    data, fsdp, tensor = (int(s) for s in sizes)
    if data * fsdp * tensor != per_host * hosts:
        raise ValueError(f"mesh data*fsdp*tensor = {data}*{fsdp}*{tensor} = {data * fsdp * tensor} but there are "
                         f"{hosts} hosts x {per_host} devices = {per_host * hosts}")
    if per_host % tensor:
        raise ValueError(
            f"mesh.tensor={tensor} does not divide the {per_host} devices of a host: tensor parallelism must stay "
            f"inside a host (choose mesh.tensor in {[d for d in range(1, per_host + 1) if per_host % d == 0]}) "
            "and spread the hosts over mesh.data / mesh.fsdp"
        )
    rest = per_host // tensor
    host_fsdp = math.gcd(fsdp, rest)
    host_data = rest // host_fsdp
    if data % host_data:
        raise ValueError(
            f"mesh data={data}, fsdp={fsdp}, tensor={tensor} cannot be laid out on {hosts} hosts x {per_host} "
            f"devices: each host would hold fsdp={host_fsdp} x data={host_data} x tensor={tensor}, and data={data} "
            f"is not a multiple of {host_data}; make mesh.fsdp a multiple of {rest} or mesh.data a multiple of "
            f"{host_data}"
        )
    return (host_data, host_fsdp, tensor), (data // host_data, fsdp // host_fsdp, 1)


def device_grid(sizes: Sequence[int], devices: Sequence[Any], *, topology: bool = True) -> np.ndarray:
    """``np.ndarray[object]`` of shape ``sizes``: the devices of :func:`make_mesh`.

    Without ``topology`` (devices given explicitly): ``devices`` in the order given, ``tensor``
    fastest. With it, one process: that order too, or on TPU the topology-aware order of
    ``mesh_utils.create_device_mesh``; several processes: a hybrid mesh with the process as the
    granule (``mesh_utils.create_hybrid_device_mesh``), per-host and across-host shapes from
    :func:`split_mesh_shape`."""
    from jax.experimental import mesh_utils

    devices = list(devices)
    if not topology:
        return np.asarray(devices, dtype=object).reshape(sizes)
    processes = sorted({d.process_index for d in devices})
    platform = devices[0].platform
    if len(processes) == 1:
        if platform == "tpu" and len(devices) > 1:
            try:
                return mesh_utils.create_device_mesh(list(sizes), devices, allow_split_physical_axes=True)
            except Exception as err:  # unusual slices: fall back to the plain order
                warn(f"topology-aware TPU mesh failed ({err}); using device order")
        return np.asarray(devices, dtype=object).reshape(sizes)
    per_host = {p: sum(d.process_index == p for d in devices) for p in processes}
    if len(set(per_host.values())) != 1:
        raise ValueError(f"hosts have different device counts {per_host}; a global mesh needs equal hosts")
    host_shape, dcn_shape = split_mesh_shape(sizes, next(iter(per_host.values())), len(processes))
    try:
        return mesh_utils.create_hybrid_device_mesh(list(host_shape), list(dcn_shape), devices,
                                                    process_is_granule=True, allow_split_physical_axes=True)
    except Exception as err:
        warn(f"mesh_utils.create_hybrid_device_mesh failed ({err}); laying devices out process by process")
    # the same layout by hand: hosts in process order, devices of a host in id order
    by_host = np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id)), dtype=object)
    by_host = by_host.reshape(*dcn_shape, *host_shape)  # [dD, dF, dT, hD, hF, hT]
    return by_host.transpose(0, 3, 1, 4, 2, 5).reshape(sizes)


def host_batch_rows(sharding, rows: int) -> Dict[int, np.ndarray]:
    """``{process: sorted global row indices its devices hold}`` for a ``[rows, ...]`` array
    placed with ``sharding`` (batch-sharded along axis 0)."""
    held: Dict[int, set] = {}
    for device, index in sharding.devices_indices_map((rows,)).items():
        held.setdefault(device.process_index, set()).update(range(rows)[index[0]])
    return {p: np.asarray(sorted(r)) for p, r in sorted(held.items())}


def check_batch_layout(sharding, rows: int) -> None:
    """Checks that process ``p``'s devices hold exactly rows ``[p * b, (p + 1) * b)`` of a
    ``[rows, ...]`` batch (``b = rows / process_count``), the rows
    :class:`~sgpo_jax.data.PairBatcher` gives host ``p``. Otherwise two hosts would be asked for
    the same rows (the batch axis is replicated across hosts, e.g. ``mesh.tensor`` spanning
    hosts) and ``make_array_from_process_local_data`` would silently mix their different data.

    Raises:
      ValueError: naming the processes and rows, and what to change.
    """
    if len({d.process_index for d in sharding.device_set}) > 1:
        _check_batch_layout(sharding, rows)


@functools.lru_cache(maxsize=64)
def _check_batch_layout(sharding, rows: int) -> None:
    held = host_batch_rows(sharding, rows)
    count = len(held)
    if rows % count:
        raise ValueError(f"the batch of {rows} rows does not split over {count} processes: make train.batch_size a "
                         f"multiple of {count}")
    b = rows // count
    for p, r in held.items():
        if not np.array_equal(r, np.arange(p * b, (p + 1) * b)):
            raise ValueError(
                f"process {p}'s devices hold batch rows {r.tolist()[:8]}{'...' if len(r) > 8 else ''} instead of its "
                f"own block [{p * b}, {(p + 1) * b}): the batch axes (data, fsdp) must split the hosts apart; build "
                "the mesh with sgpo_jax.parallel.mesh.make_mesh (tensor inside a host, data/fsdp across hosts)"
            )


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with every axis in ``Auto`` mode (compiler-propagated
    shardings; ``jax.make_mesh`` defaults to ``Explicit`` axes in recent JAX)."""
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
