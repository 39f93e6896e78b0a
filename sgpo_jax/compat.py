"""The one place for differences between the jax releases this package supports (0.5 to 0.12).

Everything here is a small function over public jax API (``jax.devices``, ``jax.default_backend``,
``jax.nn.dot_product_attention``, the Pallas TPU splash-attention package), so the rest of the
library never branches on ``jax.__version__``. Checked on jax 0.10.2 (Python 3.11) and 0.12.0.1
(Python 3.12; jax 0.11+ needs Python >= 3.12): no API the library uses changed between them.

* :func:`accelerator`: ``"cuda"``, ``"rocm"``, ``"tpu"`` or ``"cpu"`` for the default backend
  (``jax.default_backend()`` says ``"gpu"`` for both CUDA and ROCm).
* :func:`cuda_compute_capability`: ``(major, minor)`` of the first CUDA device, or ``None``.
* :func:`has_dot_product_attention_implementation`: whether ``jax.nn.dot_product_attention`` takes
  ``implementation=`` and ``local_window_size=`` (both since jax 0.4.36; kept so an older jax
  gives a clear error rather than a ``TypeError``).
* :func:`splash_attention`: the ``(kernel, mask)`` modules of Pallas' TPU splash attention, or
  ``None`` where this jax does not ship them.
* :func:`shard_map`: ``jax.shard_map`` (``jax.experimental.shard_map`` before jax 0.6), with the
  replication check off (Pallas kernels carry no replication rule).
* :func:`compile_target`, :func:`target_platform`, :func:`target_cuda_capability`: the platform
  the program being traced will run on. It is the host's backend unless an ahead-of-time compile
  for another target (:mod:`sgpo_jax.aot`) sets it, so every backend-dependent choice (the
  attention kernel) follows the target, not the host.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from typing import Any, Callable, Iterator, Optional, Tuple

import jax

__all__ = ["accelerator", "cuda_compute_capability", "has_dot_product_attention_implementation",
           "splash_attention", "shard_map", "compile_target", "target_platform", "target_cuda_capability"]

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# (platform, cuda capability or None) of an ahead-of-time compile in progress, else None
_TARGET: contextvars.ContextVar[Optional[Tuple[str, Optional[Tuple[int, int]]]]] = contextvars.ContextVar(
    "sgpo_compile_target", default=None)


def accelerator() -> str:
    """``"cuda"``, ``"rocm"``, ``"tpu"`` or ``"cpu"`` (anything else is returned as jax names it)."""
    backend = jax.default_backend()
    if backend in ("cuda", "rocm"):
        return backend
    if backend == "gpu":
        version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
        return "rocm" if "rocm" in version or "hip" in version else "cuda"
    return backend


def cuda_compute_capability() -> Optional[Tuple[int, int]]:
    """``(major, minor)`` of the first CUDA device (``device.compute_capability``), else ``None``."""
    if accelerator() != "cuda":
        return None
    value = getattr(jax.devices()[0], "compute_capability", None)
    try:
        major, minor = str(value).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


@functools.lru_cache(maxsize=None)
def has_dot_product_attention_implementation() -> bool:
    """``jax.nn.dot_product_attention`` accepts ``implementation`` and ``local_window_size``."""
    fn = getattr(jax.nn, "dot_product_attention", None)
    if fn is None:
        return False
    params = inspect.signature(fn).parameters
    return "implementation" in params and "local_window_size" in params


@functools.lru_cache(maxsize=None)
def splash_attention() -> Optional[Tuple[Any, Any]]:
    """``(splash_attention_kernel, splash_attention_mask)`` modules, or ``None`` if unavailable."""
    try:
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask
    except ImportError:
        return None
    return kernel, mask


def shard_map(fn: Callable, mesh: Any, in_specs: Any, out_specs: Any) -> Callable:
    """``fn`` mapped over the blocks of ``mesh`` (every mesh axis manual), replication unchecked."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy  # jax < 0.6

    return legacy(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


@contextlib.contextmanager
def compile_target(platform: str, cuda_capability: Optional[Tuple[int, int]] = None) -> Iterator[None]:
    """While active, :func:`target_platform` is ``platform`` (one of ``PLATFORMS``) and
    :func:`target_cuda_capability` is ``cuda_capability``: wrap the tracing of a program compiled
    for devices other than the host's."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    token = _TARGET.set((platform, tuple(cuda_capability) if cuda_capability else None))
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_platform() -> str:
    """The platform traced programs will run on: the :func:`compile_target` in force, else
    :func:`accelerator`."""
    target = _TARGET.get()
    return accelerator() if target is None else target[0]


def target_cuda_capability() -> Optional[Tuple[int, int]]:
    """``(major, minor)`` of the target GPU (the :func:`compile_target` in force, else the first
    local CUDA device), or ``None``."""
    target = _TARGET.get()
    return cuda_compute_capability() if target is None else target[1]
