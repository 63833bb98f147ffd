"""One-token quantized projections: Metal kernels with CUDA twins, and the ops path (MLX's
`quantized_matmul` / `gather_qmm`).

* ``head_logits(head, y)`` -> ``head(y)`` for a `QuantizedLinear` head (affine, 8 bits) and one
  token y: **on by default on a GPU** (`bench/qgemv.py`, H100: 0.32 vs 0.59 ms for the Flash
  head, 129280 x 4096; 0.85 vs 1.00 ms for Pro's 7168 columns); ``DSV4_QGEMV_KERNEL=ops`` keeps
  MLX's quantized matmul. Same dequantized values (``q s + b``) and fp32 sums as MLX's, in
  another order. fp32 x, scales and biases only (the head's case, see `Model.sanitize`); MLX
  rounds half-precision dequantized weights to the half type, which this kernel does not do,
  so those stay on MLX's path.
* `mx_gemv_kernel`: the microscaled layouts of `dsv4 convert` (mxfp8: the FP8 linears, the
  shared expert; mxfp4: the routed experts, gathered by the token's picks), one token; used
  through `mx_project` (the experts, `model.moe`) and `use_for_linears` (at load) where
  ``DSV4_MX_GEMV_KERNEL`` asks for it: **opt-in**, since on an H100 it was not faster than
  MLX's (2026-12-07, `bench/qgemv.py`: mxfp8 0.021 vs 0.011 ms for 8.7 MB, mxfp4 experts
  0.056 vs 0.050 ms; a 4-layer decode step 2.20 vs 2.09 ms pipelined with it; an earlier
  mxfp8 kernel of this module was 1.6-4.4x slower than MLX's). The same exact dequantized
  values as MLX's, a chunk's fp32 sum times its scale as MLX's `fp_qmv` does, in another order.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

from . import dispatch
from . import qgemv_source as src

ENV_VAR = "DSV4_QGEMV_KERNEL"  # the head's
DEFAULT = "auto"  # measured faster than MLX's (see the module docstring)
MX_ENV_VAR = "DSV4_MX_GEMV_KERNEL"  # the microscaled layers' (mxfp8 linears, mxfp4 experts)
MX_DEFAULT = "ops"  # measured not faster than MLX's (see the module docstring)
TG = 256
RW = 8          # rows a warp
MAX_K = 8192    # x staged in threadgroup memory as fp32: 32 KiB, Metal's limit


def qgemv_kernel(w, scales, biases, x, group_size: int, *, backend: str) -> mx.array:
    """y [..., O] in x's dtype for x [..., K] (one token): w uint32 [O, K/4] 8-bit codes,
    scales and biases [O, K/GS] (fp32 where the model uses it)."""
    O = w.shape[0]
    K = x.shape[-1]
    rows = (TG // 32) * RW
    go = dispatch.launch(
        ("qgemv8", backend, x.dtype, x.shape, w.shape, scales.dtype, group_size),
        lambda: dispatch.Launch(
            backend, src.qgemv_source(backend),
            template=[("XT", x.dtype), ("ST", scales.dtype), ("OT", x.dtype), ("K", K),
                      ("GS", group_size), ("TG", TG), ("RW", RW)],
            grid=(-(-O // rows) * TG, 1, 1), threadgroup=(TG, 1, 1),
            output_shapes=[(*x.shape[:-1], O)], output_dtypes=[x.dtype]))
    return go([w, scales, biases, x])[0]


def _backend(head, x) -> str:
    backend = dispatch.select_backend(ENV_VAR, DEFAULT)
    if backend == "ops" or not isinstance(head, nn.QuantizedLinear):
        return "ops"
    if (head.mode != "affine" or head.bits != 8 or "bias" in head or head.get("biases") is None
            or head.weight.dtype != mx.uint32):
        return "ops"
    K = x.shape[-1]
    gs = head.group_size
    if (x.size != K or x.dtype != mx.float32 or head.scales.dtype != mx.float32
            or head.biases.dtype != mx.float32 or K % 16 or gs % 16 or K % gs or K > MAX_K
            or head.weight.shape[-1] * 4 != K):
        return "ops"
    key = (backend, "qgemv8", x.dtype, K, gs)

    def probe():
        mx.eval(qgemv_kernel(mx.zeros((3, K // 4), mx.uint32), mx.ones((3, K // gs), x.dtype),
                             mx.zeros((3, K // gs), x.dtype), mx.zeros((K,), x.dtype), gs,
                             backend=backend))

    return backend if dispatch.kernel_usable(key, probe, f"8-bit GEMV ({backend})") else "ops"


def head_logits(head, y: mx.array) -> mx.array:
    """``head(y)`` (see the module docstring)."""
    backend = _backend(head, y)
    if backend == "ops":
        return head(y)
    return qgemv_kernel(head.weight, head.scales, head.biases, y, head.group_size,
                        backend=backend)


# --------------------------------------------------------------------------------------------
# microscaled formats (mxfp8 linears, mxfp4 routed experts), one token

MX_TG = 256
# x is staged as padded fp32 (`qgemv_source._MX_BODY`): K (1 + 4 / codes a chunk) floats, within
# Metal's 32 KiB of threadgroup memory (CUDA: 48 KiB)
_MX_SHARED = {"metal": 32768, "cuda": 49152}


@functools.lru_cache(maxsize=256)  # asked at every launch
def mx_launch(O: int, P: int, K: int, bits: int, tg: int = MX_TG) -> tuple[int, int]:
    """(WPR warps a row, RW rows a warp group) of a one-token microscaled projection of O rows
    for P picks: split K over more warps while there are fewer than 2048 warp rows (every SM
    busy), then as many rows a warp group (<= 8) as keep >= 264 groups (two an H100 SM: x is
    staged once a group, so fewer, longer groups read it less)."""
    cpr = K * bits // 128
    wpr = 1
    while wpr < tg // 32 and O * P * wpr < 2048 and cpr >= 64 * wpr:
        wpr *= 2
    nwg = tg // 32 // wpr
    rw = 8
    while rw > 1 and -(-O // (nwg * rw)) * P < 264:
        rw //= 2
    return wpr, rw


def mx_shared_bytes(K: int, bits: int, tg: int = MX_TG, rw: int = 8) -> int:
    vpc = 128 // bits
    return 4 * ((K // vpc) * (vpc + 4) + rw * (tg // 32))


def mx_gemv_kernel(w, scales, x, *, bits: int, backend: str, inds=None, x_per_pick=False,
                   tg: int = MX_TG, wpr=None, rw=None) -> mx.array:
    """One token through a microscaled projection: y [P, O] in x's dtype.

    ``w`` uint32 [O, K * bits / 32] (or [E, O, ...] with ``inds`` uint32 [P]: pick p reads
    expert inds[p]), ``scales`` uint8 [(E,) O, K / 32] (UE8M0), ``x`` [R, K] (R = 1, or P with
    ``x_per_pick``: pick p reads row p). ``bits`` 8: e4m3 codes (MLX's mxfp8), 4: e2m1
    (mxfp4). ``wpr``, ``rw``: launch overrides (`mx_launch`), for tuning."""
    gather = inds is not None
    O = w.shape[-2]
    K = x.shape[-1]
    P = inds.shape[0] if gather else 1
    W, R = mx_launch(O, P, K, bits, tg)
    wpr, rw = wpr or W, rw or R
    rows = tg // 32 // wpr * rw
    if inds is None:
        inds = dispatch.unused()
    go = dispatch.launch(
        ("mxgemv", backend, bits, x.dtype, x.shape, w.shape, gather, x_per_pick, tg, wpr, rw),
        lambda: dispatch.Launch(
            backend, src.mx_gemv_source(backend, bits),
            template=[("XT", x.dtype), ("OT", x.dtype), ("K", K), ("BITS", bits), ("TG", tg),
                      ("WPR", wpr), ("RW", rw), ("GATHER", gather), ("XPP", x_per_pick)],
            grid=(-(-O // rows) * tg, P, 1), threadgroup=(tg, 1, 1),
            output_shapes=[(P, O)], output_dtypes=[x.dtype]))
    return go([w, scales, x, inds])[0]


_MX_X = (mx.float32, mx.bfloat16, mx.float16)
_MX_MODES = {"mxfp8": 8, "mxfp4": 4}


def mx_backend(layer, x, rows: int = 1) -> str:
    """The backend for one token of a microscaled layer (a `QuantizedLinear`, mlx-lm's
    `QuantizedSwitchLinear` or a fused pair of either: anything with ``weight``, ``scales``,
    ``mode``, ``bits``, ``group_size``), x holding ``rows`` rows of K; or "ops"."""
    backend = dispatch.select_backend(MX_ENV_VAR, MX_DEFAULT)
    if backend == "ops":
        return "ops"
    mode = getattr(layer, "mode", None)
    bits = _MX_MODES.get(mode)
    if bits is None or getattr(layer, "bits", None) != bits or layer.group_size != 32:
        return "ops"
    w, sc = layer["weight"], layer["scales"]
    K = x.shape[-1]
    if (x.size != rows * K or x.dtype not in _MX_X or sc.dtype != mx.uint8
            or w.dtype != mx.uint32 or w.shape[-1] * 32 != K * bits or K % 32
            or mx_shared_bytes(K, bits) > _MX_SHARED[backend]
            or layer.get("biases") is not None):
        return "ops"
    key = (backend, "mxgemv", bits, x.dtype, K)

    def probe():
        mx.eval(mx_gemv_kernel(mx.zeros((3, w.shape[-1]), mx.uint32),
                               mx.full((3, K // 32), 127, mx.uint8), mx.zeros((1, K), x.dtype),
                               bits=bits, backend=backend))

    return backend if dispatch.kernel_usable(key, probe, f"mx GEMV ({backend})") else "ops"


def mx_project(layer, x, inds=None, per_pick: bool = False):
    """One token through a microscaled layer by the kernel, or None where it does not apply
    (`mx_backend`): ``layer(x)`` [..., O] for a linear; for stacked experts with ``inds``
    [..., k] (one token's picks), what `gather_qmm` gives for x [..., 1, 1, K] (one row) or
    [..., k, 1, K] (``per_pick``): [..., k, 1, O]."""
    rows = inds.size if per_pick and inds is not None else 1
    backend = mx_backend(layer, x, rows)
    if backend == "ops":
        return None
    K = x.shape[-1]
    y = mx_gemv_kernel(layer["weight"], layer["scales"], x.reshape(rows, K),
                       bits=_MX_MODES[layer.mode], backend=backend,
                       inds=None if inds is None else inds.reshape(-1), x_per_pick=per_pick)
    if inds is None:
        return y.reshape(*x.shape[:-1], y.shape[-1])
    return y.reshape(*inds.shape, 1, y.shape[-1])


class OneTokenQuantizedLinear(nn.QuantizedLinear):
    """A microscaled `QuantizedLinear` whose one-token calls run the kernel (where it applies
    and `DSV4_MX_GEMV_KERNEL` asks for it); otherwise, and for several tokens, MLX's quantized
    matmul as before. Same parameters and names: only the class of the module changes
    (`use_for_linears`)."""

    def __call__(self, x):
        y = mx_project(self, x)
        if y is None:
            return super().__call__(x)
        if "bias" in self:
            y = y + self["bias"]
        return y


def use_for_linears(model) -> int:
    """With ``DSV4_MX_GEMV_KERNEL`` set to other than ``ops`` when the model is loaded: the
    model's 8-bit mxfp8 linears (the FP8 checkpoint's, after `dsv4 convert`) become
    `OneTokenQuantizedLinear`; how many. Unset (the default), nothing changes and a call costs
    nothing more."""
    if dispatch.requested(MX_ENV_VAR, MX_DEFAULT) == "ops":
        return 0
    n = 0
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear and m.mode == "mxfp8" and m.bits == 8:
            m.__class__ = OneTokenQuantizedLinear
            n += 1
    return n


__all__ = ["head_logits", "qgemv_kernel", "mx_gemv_kernel", "mx_launch", "mx_backend",
           "mx_project", "OneTokenQuantizedLinear", "use_for_linears", "ENV_VAR", "DEFAULT",
           "MX_ENV_VAR", "MX_DEFAULT"]
