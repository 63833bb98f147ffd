"""One-token 8-bit affine projection (the output head, spec §4.14): a Metal kernel with a CUDA
twin, and the ops path (MLX's `quantized_matmul`).

``head_logits(head, y)`` -> ``head(y)`` for a `QuantizedLinear` head (affine, 8 bits) and one
token y: **on by default on a GPU** (`bench/qgemv.py`, H100: 0.32 vs 0.59 ms for the Flash head,
129280 x 4096; 0.85 vs 1.00 ms for Pro's 7168 columns); ``DSV4_QGEMV_KERNEL=ops`` keeps MLX's
quantized matmul. `use_for_linears(model)` (at load) routes the one-token calls of the mxfp8
linears (the FP8 checkpoint's) to the kernel's mxfp8 variant, **opt-in** with
``DSV4_QGEMV_MXFP8_KERNEL=auto``: measured 1.6-4.4x slower than MLX's on the same H100, so it is
off unless asked for. Same dequantized
values (``q s + b``) and fp32 sums as MLX's, in another order. fp32 x, scales and biases only
(the head's case, see `Model.sanitize`); MLX rounds half-precision dequantized weights to the
half type, which this kernel does not do, so those stay on MLX's path.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import dispatch
from . import qgemv_source as src

ENV_VAR = "DSV4_QGEMV_KERNEL"  # the head's
DEFAULT = "auto"  # measured faster than MLX's (see the module docstring)
MXFP8_ENV_VAR = "DSV4_QGEMV_MXFP8_KERNEL"  # the mxfp8 linears'
MXFP8_DEFAULT = "ops"  # measured slower than MLX's (see the module docstring)
TG = 256
RW = 8          # rows a warp
MAX_K = 8192    # x staged in threadgroup memory as fp32: 32 KiB, Metal's limit


def qgemv_kernel(w, scales, biases, x, group_size: int, *, backend: str,
                 mode: str = "affine") -> mx.array:
    """y [..., O] in x's dtype for x [..., K] (one token): w uint32 [O, K/4] 8-bit codes;
    affine: scales and biases [O, K/GS] (fp32 where the model uses it); mxfp8: scales uint8
    [O, K/32] (UE8M0), biases None."""
    O = w.shape[0]
    K = x.shape[-1]
    rows = (TG // 32) * RW
    if biases is None:
        biases = dispatch.unused()
    go = dispatch.launch(
        ("qgemv8", backend, mode, x.dtype, x.shape, w.shape, scales.dtype, group_size),
        lambda: dispatch.Launch(
            backend, src.qgemv_source(backend, mode),
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


_LINEAR_X = (mx.float32, mx.bfloat16, mx.float16)


def _linear_backend(layer, x) -> str:
    """The backend for a one-token call of an mxfp8 `QuantizedLinear`, or "ops"."""
    backend = dispatch.select_backend(MXFP8_ENV_VAR, MXFP8_DEFAULT)
    if backend == "ops":
        return "ops"
    K = x.shape[-1]
    if (x.size != K or x.dtype not in _LINEAR_X or layer.mode != "mxfp8" or layer.bits != 8
            or layer.group_size != 32 or layer.scales.dtype != mx.uint8
            or layer.weight.dtype != mx.uint32 or layer.weight.shape[-1] * 4 != K
            or K % 32 or K > MAX_K):
        return "ops"
    key = (backend, "qgemv_mxfp8", x.dtype, K)

    def probe():
        mx.eval(qgemv_kernel(mx.zeros((3, K // 4), mx.uint32), mx.full((3, K // 32), 127, mx.uint8),
                             None, mx.zeros((K,), x.dtype), 32, backend=backend, mode="mxfp8"))

    return backend if dispatch.kernel_usable(key, probe, f"mxfp8 GEMV ({backend})") else "ops"


class OneTokenQuantizedLinear(nn.QuantizedLinear):
    """An mxfp8 `QuantizedLinear` whose one-token calls run the kernel (where it applies and
    `DSV4_QGEMV_MXFP8_KERNEL` asks for it); otherwise, and for several tokens, MLX's quantized matmul
    as before. Same parameters and names: only the class of the module changes
    (`use_for_linears`)."""

    def __call__(self, x):
        backend = _linear_backend(self, x)
        if backend == "ops":
            return super().__call__(x)
        y = qgemv_kernel(self["weight"], self["scales"], None, x, self.group_size,
                         backend=backend, mode="mxfp8")
        if "bias" in self:
            y = y + self["bias"]
        return y


def use_for_linears(model) -> int:
    """With ``DSV4_QGEMV_MXFP8_KERNEL`` set to other than ``ops`` when the model is loaded: the
    model's 8-bit mxfp8 linears (the FP8 checkpoint's, after `dsv4 convert`) become
    `OneTokenQuantizedLinear`; how many. Unset (the default), nothing changes and a call costs
    nothing more."""
    if dispatch.requested(MXFP8_ENV_VAR, MXFP8_DEFAULT) == "ops":
        return 0
    n = 0
    for _, m in model.named_modules():
        if type(m) is nn.QuantizedLinear and m.mode == "mxfp8" and m.bits == 8:
            m.__class__ = OneTokenQuantizedLinear
            n += 1
    return n


__all__ = ["head_logits", "qgemv_kernel", "OneTokenQuantizedLinear", "use_for_linears",
           "ENV_VAR", "DEFAULT", "MXFP8_ENV_VAR", "MXFP8_DEFAULT"]
