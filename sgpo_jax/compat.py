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
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional, Tuple

import jax

__all__ = ["accelerator", "cuda_compute_capability", "has_dot_product_attention_implementation",
           "splash_attention"]


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
