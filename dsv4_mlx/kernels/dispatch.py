"""Which implementation of a kernelised op runs: device selection, override, fallback.

``DSV4_INDEXER_KERNEL=auto|metal|cuda|ops`` (default ``auto``):

* ``auto``: the GPU kernels when MLX's default device is the GPU (Metal on Apple silicon,
  CUDA with MLX's CUDA backend), the pure-ops path otherwise (CPU);
* ``metal`` / ``cuda``: that kernel whatever the default device (it runs on the GPU
  stream); an error if this MLX has no such backend;
* ``ops``: the pure-MLX-ops path.

A kernel that fails to build at run time (its first use is a probe on tiny inputs,
evaluated at once, since MLX compiles lazily) is reported once with a warning and the
ops path is used for it from then on.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import mlx.core as mx

ENV_VAR = "DSV4_INDEXER_KERNEL"
CHOICES = ("auto", "metal", "cuda", "ops")


def requested(env_var: str = ENV_VAR, default: str = "auto") -> str:
    """The value of the override variable, validated (`default` when unset or empty)."""
    raw = os.environ.get(env_var)
    if not raw:
        return default
    value = raw.strip().lower() or default
    if value not in CHOICES:
        raise ValueError(f"{env_var}={value!r}: expected one of {', '.join(CHOICES)}")
    return value


@functools.lru_cache(maxsize=None)  # fixed for the process; asked at every launch
def metal_available() -> bool:
    try:
        return bool(mx.metal.is_available())
    except Exception:  # pragma: no cover - very old MLX
        return False


@functools.lru_cache(maxsize=None)
def cuda_available() -> bool:
    try:
        return bool(mx.cuda.is_available())
    except Exception:  # pragma: no cover - MLX without the cuda module
        return False


def available_backends() -> tuple[str, ...]:
    out = []
    if metal_available():
        out.append("metal")
    if cuda_available():
        out.append("cuda")
    return tuple(out)


_selected: dict = {}


def select_backend(env_var: str = ENV_VAR, default: str = "auto") -> str:
    """``"metal"``, ``"cuda"`` or ``"ops"`` for the next call (asked at every launch: the
    answer is remembered for the variable's value, the default device and the availability
    probes in use). `default`: what an unset variable means (``"ops"`` for a kernel that is
    used only when asked for)."""
    raw = os.environ.get(env_var)
    key = (env_var, raw, default, mx.default_device().type, metal_available, cuda_available,
           available_backends)
    got = _selected.get(key)
    if got is None:
        got = _selected[key] = _select_backend(env_var, default)
    return got


def _select_backend(env_var: str, default: str = "auto") -> str:
    req = requested(env_var, default)
    if req == "ops":
        return "ops"
    if req in ("metal", "cuda"):
        if req not in available_backends():
            raise RuntimeError(
                f"{env_var}={req} but this MLX ({mx.__version__}) has no {req} backend "
                f"(available: {', '.join(available_backends()) or 'none'}); "
                f"use {env_var}=auto or ops"
            )
        return req
    if mx.default_device().type != mx.DeviceType.gpu:
        return "ops"
    if metal_available():
        return "metal"
    if cuda_available():
        return "cuda"
    return "ops"


# --------------------------------------------------------------------------------------------
# kernel objects

_consts: dict = {}


def _const(key, make):
    a = _consts.get(key)
    if a is None:
        a = _consts[key] = make()
    return a


def vector(*values, dtype=mx.float32) -> mx.array:
    """The 1-D constant array of `values` ([v] for one value: a kernel input a body reads as
    ``v[0]``), made once and shared by every call and kernel: no new array per call. Keyed by
    its own values, dtype and shape, so two different arrays never share a key. With
    `device_scalars`, one of at most 8 bytes is copied once by a GPU op into 16 bytes of device
    memory (zeros after `values`; see `DEVICE_SCALARS_ENV`)."""
    host = _const(("vector", dtype, values), lambda: mx.array(list(values), dtype))
    if host.nbytes > 8 or not device_scalars():
        return host  # (larger host arrays migrate to the GPU once, at its first read)
    key = ("vector-device", dtype, values)
    dev = _consts.get(key)
    if dev is None:
        dev = _device_copy(host)
        if dev is None:  # inside a traced function: the host array (this time)
            return host
        _consts[key] = dev
    return dev


def _device_copy(a: mx.array, stream=mx.gpu):
    """`a` followed by zeros to 16 bytes, made and evaluated on `stream` now; None where no
    evaluation may happen (inside `mx.compile`'s tracing)."""
    pad = max(0, 16 // a.itemsize - a.size)
    out = mx.concatenate([a, mx.zeros((pad,), a.dtype, stream=stream)], stream=stream)
    try:
        mx.eval(out)
    except (RuntimeError, ValueError):
        return None
    return out


def scalar(value, dtype=mx.float32) -> mx.array:
    """The 0-d constant `value` (for ops: a kernel takes `vector` inputs), made once."""
    return _const(("scalar", dtype, value), lambda: mx.array(value, dtype))


def unused(dtype=mx.float32) -> mx.array:
    """A one-element input for a kernel variant that does not read it."""
    return vector(0, dtype=dtype)


_position: list = [None, None]

# "1": the step's position made by a GPU op, in device memory (`position`), and the kernels'
# constants of <= 8 bytes (`vector`) copied there once. MLX's CUDA allocator keeps a
# host-made array of <= 8 bytes in managed memory that the GPU reads in place, and every
# thread block of a kernel pays that read (the indexer's count: 58% of its scorer's stall
# samples, 2026-12-07); a larger host array migrates a page every step instead
# (`bench/host_arrays.py`: a 512-block kernel reading a host-made 4-byte array took 16.6 us
# against 3.1 us from a GPU-made one, H100). Measured on a decode step (2026-12-07, tenth
# session, H100, `bench/decode_profile.py --compare DSV4_DEVICE_SCALARS --values 0,1`, Flash
# dimensions, 4 layers, 64 experts, 4K context, two rounds): evaluating a step 1.90 / 1.90
# -> 1.84 / 1.84 ms, but pipelined (as generation runs) 1.70 / 1.70 -> 1.71 / 1.72 ms, with
# 2 more primitives a step: no gain where it counts, so it stays opt-in.
DEVICE_SCALARS_ENV = "DSV4_DEVICE_SCALARS"
_device_scalars: dict = {}  # the variable's raw value -> the answer


def device_scalars() -> bool:
    """Whether `DEVICE_SCALARS_ENV` asks for device-made position arrays (CUDA only; asked
    by every kernel call that takes a constant: the answer is remembered per value)."""
    raw = os.environ.get(DEVICE_SCALARS_ENV, "0")
    got = _device_scalars.get(raw)
    if got is None:
        got = _device_scalars[raw] = raw.strip() == "1" and cuda_available()
    return got


def position(s: int) -> mx.array:
    """The int32 array holding position `s` first (kernels read element 0): made once for
    the kernels of one decode step (every layer's) instead of once a kernel; [1] from the
    host, or with `device_scalars` [4] from a GPU op (16 bytes: device memory; lazy, so
    asked outside traced functions: the decode step's cache part asks it)."""
    key = (s, device_scalars())
    if _position[0] != key:
        _position[:] = [key, mx.full((4,), s, mx.int32, stream=mx.gpu) if key[1]
                        else mx.array([s], mx.int32)]
    return _position[1]


_kernels: dict = {}


def build_kernel(backend: str, ks):
    """The `mx.fast.metal_kernel` / `cuda_kernel` object of a `KernelSource`, built once per
    (backend, kernel name) and shared by every caller."""
    key = (backend, ks.name)
    kern = _kernels.get(key)
    if kern is None:
        make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
        kern = make(name=ks.name, input_names=list(ks.input_names),
                    output_names=list(ks.output_names), source=ks.source, header=ks.header,
                    ensure_row_contiguous=True)
        _kernels[key] = kern
    return kern


class Launch:
    """One kernel launch with everything but its inputs fixed (template, grid, threadgroup,
    output shapes and dtypes), made once per shape by `launch`: a decode step makes ~60
    launches, and rebuilding these lists at every call is most of their Python cost."""

    __slots__ = ("kern", "kw")

    def __init__(self, backend: str, ks, **kw):
        self.kern = build_kernel(backend, ks)
        self.kw = dict(kw, stream=mx.gpu)

    def __call__(self, inputs):
        return self.kern(inputs=inputs, **self.kw)


_launches: dict = {}


def launch(key, make: Callable[[], Launch]) -> Launch:
    """The `Launch` for `key` (hashable: the kernel's variant and shapes), made by `make` at
    its first use (and again if the kernel builder was replaced, as tests do)."""
    k = (key, build_kernel)
    got = _launches.get(k)
    if got is None:
        got = bounded_put(_launches, k, make())
    return got


# --------------------------------------------------------------------------------------------
# warn-once fallback

_warned: set[str] = set()
_broken: dict[str, str] = {}  # variant key -> reason
_ok: set[str] = set()
# bumped whenever what a dispatch point would choose can change without an environment
# variable changing (a kernel found broken, `reset`): part of the key under which traced
# decode parts are kept (`model.dispatch_key`)
generation = [0]


def warn_once(key, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def kernel_usable(key, probe: Callable[[], None], what: str) -> bool:
    """True if the kernel variant `key` (hashable) builds and runs; probes it once (`probe` builds and
    evaluates it on tiny inputs). On failure: one warning, then False for good."""
    if key in _ok:
        return True
    if key in _broken:
        return False
    try:
        probe()
    except Exception as e:  # compile errors surface as RuntimeError / ValueError
        _broken[key] = f"{type(e).__name__}: {e}"
        generation[0] += 1
        warn_once(key, f"{what}: the kernel failed to build or run ({_broken[key]}); "
                       f"falling back to the pure-ops path")
        return False
    _ok.add(key)
    return True


def bounded_put(d: dict, key, value, limit: int = 512):
    """``d[key] = value``, first dropping the oldest entry once `d` holds `limit` (caches
    keyed by the number of compressed entries, which grows all through a long session)."""
    if len(d) >= limit:
        del d[next(iter(d))]
    d[key] = value
    return value


_remembered: list = []


def remembered(d: dict) -> dict:
    """Register a module's cache of probe outcomes, cleared by `reset` with the probes."""
    _remembered.append(d)
    return d


def reset() -> None:
    """Forget probes, warnings and remembered backend choices (tests)."""
    for d in _remembered:
        d.clear()
    _selected.clear()
    _warned.clear()
    _broken.clear()
    _ok.clear()
    generation[0] += 1
