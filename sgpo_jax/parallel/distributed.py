r"""Multi-host runs: start JAX's distributed runtime from the environment, lay the global mesh
over all hosts (:mod:`sgpo_jax.parallel.mesh`), and move results between global arrays and every host's NumPy.

JAX is multi-controller: every host runs the same program on its own devices, and a jitted
function over a mesh that spans several hosts runs on all of them together (the collectives go
over ICI/NVLink inside a host or slice and over DCN / the network between hosts). The runtime
must know the cluster before anything touches a device, so call :func:`initialize` first thing
(``python -m sgpo_jax.train`` does it from its flags).

Where the cluster comes from (the first source that names a field wins, field by field):

1. explicit arguments (the CLI's ``--coordinator_address``, ``--num_processes``,
   ``--process_id``);
2. our environment variables ``SGPO_COORDINATOR`` (``host:port`` of process 0),
   ``SGPO_NUM_PROCESSES``, ``SGPO_PROCESS_ID`` and optionally ``SGPO_LOCAL_DEVICE_IDS``
   (comma-separated);
3. SLURM (inside ``srun``): ``SLURM_NTASKS`` processes, this one ``SLURM_PROCID``, the
   coordinator the first host of ``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST``) on port
   ``SGPO_COORDINATOR_PORT`` (default ``61440 + SLURM_JOB_ID % 4096``, JAX's own choice), and with
   several tasks per node each task keeps GPU ``SLURM_LOCALID`` (unless SLURM already narrowed
   ``CUDA_VISIBLE_DEVICES`` to one GPU);
4. a Cloud TPU VM (a Google PCI device, the way JAX finds TPU chips, or ``TPU_*`` variables):
   JAX reads the pod's topology from the TPU metadata itself (``jax.distributed.initialize()``
   without arguments); ``SGPO_DISTRIBUTED=auto`` asks for that auto-detection anywhere (also
   Open MPI, Kubernetes);
5. otherwise a single process: nothing to start.

``SGPO_DISTRIBUTED=off`` disables all of it. :func:`initialize` is idempotent.

The mesh layout over hosts is :mod:`sgpo_jax.parallel.mesh`'s.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "ClusterSpec", "detect", "initialize", "is_initialized", "first_slurm_host", "is_coordinator",

    "to_host", "local_rows", "allgather_host", "allgather_objects", "fail_together", "broadcast_from_coordinator",
    "broadcast_object",
    "any_process", "sync",
]

ENV_COORDINATOR = "SGPO_COORDINATOR"
ENV_NUM_PROCESSES = "SGPO_NUM_PROCESSES"
ENV_PROCESS_ID = "SGPO_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "SGPO_LOCAL_DEVICE_IDS"
ENV_COORDINATOR_PORT = "SGPO_COORDINATOR_PORT"
ENV_MODE = "SGPO_DISTRIBUTED"  # "" (detect), "off", "auto" (jax's own detection)


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """What :func:`initialize` starts (or started). ``source`` says where each value came from:
    ``"single"`` (one process, nothing started), ``"explicit"``, ``"env"`` (``SGPO_*``),
    ``"slurm"``, ``"jax-auto"`` (TPU metadata / jax's cluster detection; the values are filled in
    from jax after it started), or a ``+``-joined mix when fields came from several sources."""

    coordinator_address: Optional[str]
    num_processes: int
    process_id: int
    local_device_ids: Optional[Tuple[int, ...]]
    source: str

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1 or self.source == "jax-auto"


_STARTED: Optional[ClusterSpec] = None


# ----------------------------------------------------------------------------------- detection


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"node[001-004,007],gpu2" -> "node001"``,
    ``"a1,a2" -> "a1"``, ``"node[7]" -> "node7"``, ``"rack[1-2]-n[3-4]" -> "rack1-n3"``."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM node list")
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first top-level comma ends the first host expression
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    expression = nodelist[:end]
    # every bracket group contributes its first member ("001-004,007" -> "001")
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], expression)


def _int(value: Optional[str], name: str) -> Optional[int]:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _ids(value: Optional[str], name: str) -> Optional[Tuple[int, ...]]:
    if value is None or value == "":
        return None
    try:
        return tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name}={value!r} must be comma-separated integers (e.g. '0,1')") from None


_GOOGLE_PCI_VENDOR = "0x1ae0"  # what jax itself looks for to find TPU chips


def _on_tpu_vm(env: Mapping[str, str]) -> bool:
    """A Cloud TPU VM: TPU variables in the environment, or a Google PCI device (a TPU chip)."""
    if any(env.get(k) for k in ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "TPU_NAME", "CLOUD_TPU_TASK_ID")):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def _slurm(env: Mapping[str, str]) -> Dict[str, Any]:
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    out: Dict[str, Any] = dict(num_processes=_int(env["SLURM_NTASKS"], "SLURM_NTASKS"),
                               process_id=_int(env["SLURM_PROCID"], "SLURM_PROCID"))
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if nodelist:
        port = _int(env.get(ENV_COORDINATOR_PORT), ENV_COORDINATOR_PORT)
        if port is None:
            port = 61440 + (_int(env.get("SLURM_JOB_ID", "0"), "SLURM_JOB_ID") or 0) % 4096
        out["coordinator_address"] = f"{first_slurm_host(nodelist)}:{port}"
    nodes = _int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES"), "SLURM_STEP_NUM_NODES")
    visible = [v for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if nodes and out["num_processes"] > nodes and len(visible) != 1 and "SLURM_LOCALID" in env:
        out["local_device_ids"] = (int(env["SLURM_LOCALID"]),)  # one process per GPU
    return out


def detect(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
           process_id: Optional[int] = None, local_device_ids: Optional[Sequence[int] | int] = None,
           environ: Optional[Mapping[str, str]] = None) -> ClusterSpec:
    """The cluster :func:`initialize` would start, without starting anything (see the module
    docstring for the sources and their order).

    Raises:
      ValueError: naming the setting, when a multi-process cluster is incomplete (e.g.
        ``--num_processes=2`` without a coordinator) or inconsistent (``process_id`` outside
        ``[0, num_processes)``).
    """
    env = os.environ if environ is None else environ
    if isinstance(local_device_ids, int):
        local_device_ids = (local_device_ids,)
    sources = [
        ("explicit", dict(coordinator_address=coordinator_address, num_processes=num_processes,
                          process_id=process_id,
                          local_device_ids=tuple(local_device_ids) if local_device_ids is not None else None)),
        ("env", dict(coordinator_address=env.get(ENV_COORDINATOR) or None,
                     num_processes=_int(env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES),
                     process_id=_int(env.get(ENV_PROCESS_ID), ENV_PROCESS_ID),
                     local_device_ids=_ids(env.get(ENV_LOCAL_DEVICE_IDS), ENV_LOCAL_DEVICE_IDS))),
        ("slurm", _slurm(env)),
    ]
    fields = ("coordinator_address", "num_processes", "process_id", "local_device_ids")
    chosen: Dict[str, Any] = {}
    used = []
    for name, values in sources:
        for field in fields:
            if chosen.get(field) is None and values.get(field) is not None:
                chosen[field] = values[field]
                if name not in used:
                    used.append(name)
    mode = env.get(ENV_MODE, "").strip().lower()
    if mode not in ("", "off", "auto"):
        raise ValueError(f"{ENV_MODE}={mode!r}: expected '' (detect), 'off' or 'auto'")
    n = chosen.get("num_processes")
    if mode == "off" or (n == 1 and chosen.get("process_id", 0) == 0):
        return ClusterSpec(None, 1, 0, chosen.get("local_device_ids"), "single")
    if n is None:
        if mode == "auto" or _on_tpu_vm(env):
            return ClusterSpec(chosen.get("coordinator_address"), 0, chosen.get("process_id") or 0,
                               chosen.get("local_device_ids"), "jax-auto")
        if chosen.get("coordinator_address") or chosen.get("process_id"):
            raise ValueError(
                f"a coordinator address ({chosen.get('coordinator_address')}) or process id "
                f"({chosen.get('process_id')}) was given without the number of processes: pass --num_processes "
                f"(or set {ENV_NUM_PROCESSES})"
            )
        return ClusterSpec(None, 1, 0, chosen.get("local_device_ids"), "single")
    problems = []
    if n < 1:
        problems.append(f"num_processes must be >= 1, got {n}")
    pid = chosen.get("process_id")
    if pid is None:
        problems.append(f"num_processes={n} but no process id: pass --process_id (or set {ENV_PROCESS_ID}; "
                        "SLURM sets SLURM_PROCID inside srun)")
    elif not 0 <= pid < max(n, 1):
        problems.append(f"process_id must be in [0, {n}), got {pid}")
    address = chosen.get("coordinator_address")
    if not address:
        problems.append(f"num_processes={n} but no coordinator: pass --coordinator_address=HOST:PORT of process 0 "
                        f"(or set {ENV_COORDINATOR})")
    elif not re.fullmatch(r"\[?[^\s\[\]]+\]?:\d{1,5}", address):
        problems.append(f"coordinator_address {address!r} must be HOST:PORT (e.g. 10.0.0.2:1234)")
    if problems:
        raise ValueError("cannot start jax.distributed: " + "; ".join(problems))
    return ClusterSpec(address, n, pid, chosen.get("local_device_ids"), "+".join(used))


def is_initialized() -> bool:
    """Whether this process runs under an initialized ``jax.distributed`` runtime."""
    import jax

    return _STARTED is not None and _STARTED.multi_process or jax.distributed.is_initialized()


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, local_device_ids: Optional[Sequence[int] | int] = None,
               *, initialization_timeout: int = 300) -> ClusterSpec:
    """Starts ``jax.distributed`` for the cluster :func:`detect` finds; a no-op for one process.

    Must run before anything touches a device (``jax.devices()``, creating an array, jitting).
    Idempotent: a second call returns the first call's spec; a second call that explicitly asks
    for a *different* cluster raises. Returns the :class:`ClusterSpec` (for ``"jax-auto"`` with
    the process count and id jax detected).
    """
    global _STARTED
    import jax

    if _STARTED is not None or jax.distributed.is_initialized():
        if _STARTED is None:  # someone else called jax.distributed.initialize()
            _STARTED = ClusterSpec(coordinator_address, jax.process_count(), jax.process_index(), None, "external")
        asked = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
        clash = {k: v for k, v in asked.items() if v is not None and v != getattr(_STARTED, k)
                 and not (k == "num_processes" and _STARTED.source in ("jax-auto", "external"))}
        if clash and _STARTED.source != "external":
            raise RuntimeError(f"jax.distributed is already initialized as {_STARTED}; cannot re-initialize "
                               f"with {clash}")
        return _STARTED
    spec = detect(coordinator_address, num_processes, process_id, local_device_ids)
    if not spec.multi_process:
        _STARTED = spec
        return spec
    kwargs: Dict[str, Any] = dict(initialization_timeout=initialization_timeout)
    if spec.source == "jax-auto":
        for field in ("coordinator_address", "local_device_ids"):
            if getattr(spec, field) is not None:
                kwargs[field] = getattr(spec, field)
    else:
        kwargs.update(coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
                      process_id=spec.process_id)
        if spec.local_device_ids is not None:
            kwargs["local_device_ids"] = list(spec.local_device_ids)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as err:
        hint = (" Inside a SLURM allocation but not under srun (e.g. directly in the batch script), set "
                f"{ENV_MODE}=off for a single process or launch with srun." if "slurm" in spec.source else "")
        raise RuntimeError(
            f"jax.distributed.initialize failed for {spec}: {err}. Check that every process got the same "
            "coordinator address and process count, that process 0 is reachable on that port, and that it runs "
            f"before anything touches a device.{hint}"
        ) from err
    if spec.source == "jax-auto":
        spec = dataclasses.replace(spec, num_processes=jax.process_count(), process_id=jax.process_index())
    _STARTED = spec
    return spec


def is_coordinator() -> bool:
    """Process 0: the one that writes files (metrics, exports, caches)."""
    import jax

    return jax.process_index() == 0


# ----------------------------------------------------------------------------------- mesh


# ----------------------------------------------------------------------------------- host data


def _as_words(x: np.ndarray) -> np.ndarray:
    """A NumPy array as uint32 words (lossless for 64-bit dtypes, which JAX without x64 would
    otherwise narrow in transit)."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    raw = x.reshape(-1).view(np.uint8)
    raw = np.concatenate([raw, np.zeros((-raw.size) % 4, np.uint8)])
    return raw.view(np.uint32)


def _from_words(words: np.ndarray, like: np.ndarray) -> np.ndarray:
    dtype = np.uint8 if like.dtype == np.bool_ else like.dtype
    out = np.ascontiguousarray(words).view(np.uint8)[: like.size * np.dtype(dtype).itemsize]
    return out.view(dtype).reshape(like.shape).astype(like.dtype)


def to_host(tree: Any) -> Any:
    """Every leaf as a NumPy array of its *global* value, on every process.

    Fully addressable or fully replicated leaves are read locally; the others (sharded across
    hosts) are gathered leaf by leaf with ``multihost_utils.process_allgather`` (one leaf
    replicated on the devices at a time, so the extra device memory is the largest leaf, not
    the model). That is a **collective**: with several processes every process must call
    :func:`to_host` on the same tree at the same point (never inside
    ``if jax.process_index() == 0``). Non-array leaves pass through.
    """
    import jax

    def leaf(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x) if isinstance(x, (np.ndarray, np.generic)) else x
        if x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(leaf, tree)


def local_rows(x) -> Tuple[np.ndarray, np.ndarray]:
    """``(row_indices, values)`` of the rows of a global array ``x [B, ...]`` that this
    process's devices hold (no communication), sorted by row; replicated copies are read once."""
    seen: Dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        rows = range(x.shape[0])[shard.index[0]]
        data = np.asarray(shard.data)
        for j, r in enumerate(rows):
            seen.setdefault(r, data[j])
    order = sorted(seen)
    values = np.stack([seen[r] for r in order]) if order else np.zeros((0, *x.shape[1:]), x.dtype)
    return np.asarray(order, np.int64), values


def allgather_host(x: np.ndarray) -> np.ndarray:
    """``[process_count, *x.shape]``: every process's NumPy ``x`` (same shape and dtype on all),
    stacked in process order, on every process; lossless for 64-bit dtypes. A collective."""
    import jax

    x = np.asarray(x)
    if jax.process_count() == 1:
        return x[None]
    from jax.experimental import multihost_utils

    words = np.asarray(multihost_utils.process_allgather(_as_words(x)))
    return np.stack([_from_words(w, x) for w in words])


def allgather_objects(obj: Any) -> List[Any]:
    """Every process's picklable ``obj`` (any size, may differ between processes), as a list in
    process order, on every process; a collective. With one process: ``[obj]``.

    Two all-gathers: the pickled sizes, then the pickles padded to the largest. For host-side
    metadata (counts, per-pair lengths, digests, error messages), not for model-sized data."""
    import pickle

    import jax

    if jax.process_count() == 1:
        return [obj]
    blob = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = allgather_host(np.asarray([blob.size], np.int64))[:, 0]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    return [pickle.loads(row[:size].tobytes()) for row, size in zip(allgather_host(padded), sizes)]


def broadcast_object(obj: Any) -> Any:
    """Process 0's picklable ``obj`` on every process (the others pass anything, e.g. None); a
    collective. With one process: ``obj``. For host-side state that process 0 decides (what a
    shared workdir already holds) and every process must act on alike."""
    import pickle

    import jax

    if jax.process_count() == 1:
        return obj
    blob = np.frombuffer(pickle.dumps(obj), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
    size = int(broadcast_from_coordinator(np.asarray([blob.size], np.int64))[0])
    if jax.process_index() != 0:
        blob = np.zeros(size, np.uint8)
    return pickle.loads(broadcast_from_coordinator(blob).tobytes())


def fail_together(fn: Callable[[], Any]) -> Any:
    """``fn()`` on every process, failing on all of them if it fails on any; a collective.

    For host-local work (reading and tokenizing a data shard) that is followed by collectives:
    a process that raised alone would leave the others waiting in the next collective. Here the
    process whose ``fn`` raised re-raises its own exception, and the others raise
    ``RuntimeError`` with that process's message."""
    try:
        result, error = fn(), None
    except Exception as err:  # re-raised below, on every process
        result, error = None, err
    errors = allgather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(p, message) for p, message in enumerate(errors) if message]
    if failed:
        p, message = failed[0]
        raise RuntimeError(f"process {p} failed: {message}")
    return result


def broadcast_from_coordinator(tree: Any) -> Any:
    """Process 0's value of ``tree`` (NumPy leaves, same structure, shapes and dtypes on every
    process) on every process, lossless for 64-bit dtypes; a collective. With one process:
    ``tree`` itself."""
    import jax

    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    leaves, treedef = jax.tree.flatten(tree)
    arrays = [np.asarray(x) for x in leaves]
    words = multihost_utils.broadcast_one_to_all([_as_words(a) for a in arrays])
    return jax.tree.unflatten(treedef, [_from_words(np.asarray(w), a) for w, a in zip(words, arrays)])


def any_process(flag: bool) -> bool:
    """True on every process if ``flag`` is True on any (e.g. a SIGTERM seen by one host); a
    collective."""
    return bool(np.any(allgather_host(np.asarray([bool(flag)]))))


def sync(name: str) -> None:
    """Barrier: returns once every process reached ``sync(name)``."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
