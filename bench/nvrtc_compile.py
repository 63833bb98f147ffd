"""Compile the CUDA kernels with NVRTC, as MLX's CUDA backend does at run time, without a GPU.

    python bench/nvrtc_compile.py --nvrtc LIBNVRTC --include DIR [--include DIR ...]

What it needs (no CUDA install, no GPU): NVRTC and the CUDA headers from PyPI wheels, and MLX's
CUDA device headers from MLX's source at (about) the installed version, e.g.

    pip download --no-deps -d W nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-cccl-cu12
    (unzip each wheel into X)
    git -C MLX_SRC archive v0.32.1 mlx/backend/cuda/device | tar -x -C H
    python bench/nvrtc_compile.py --nvrtc X/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 \\
        --include H --include X/nvidia/cuda_runtime/include \\
        --include X/nvidia/cuda_cccl/include --include X/nvidia/cuda_nvcc/include

It renders the indexer (scoring: fp32, matrix-unit with resident and re-read queries; top-k with
and without register keys), mHC (pre, head, post) and one-token projection (single, pair)
kernels, the query/KV norm + RoPE kernel (and its KV-store variant), the router, the
experts' SwiGLU, the embedding and the attention's combining kernel (with the inverse RoPE), at Flash sizes exactly as `mx.fast.cuda_kernel` wraps them, compiles each for sm_90a
and prints one line a kernel (with its compile time: what the first use of each costs a
process whose kernel cache is cold; warnings in full); exit status 1 if any fails. A compile error
here is one the GPU would hit at its first call (and fall back to the ops path with a warning).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4_mlx.kernels import attention_source as asrc  # noqa: E402
from dsv4_mlx.kernels import embed_source as esrc  # noqa: E402
from dsv4_mlx.kernels import gemv_source as gsrc  # noqa: E402
from dsv4_mlx.kernels import indexer_source as isrc  # noqa: E402
from dsv4_mlx.kernels import mhc_source as msrc  # noqa: E402
from dsv4_mlx.kernels import qgemv_source as qsrc  # noqa: E402
from dsv4_mlx.kernels import norm_rope_source as nsrc  # noqa: E402
from dsv4_mlx.kernels import router_source as rsrc  # noqa: E402
from dsv4_mlx.kernels import swiglu_source as ssrc  # noqa: E402


def compile_cuda(lib, code: str, name: str, includes, ptx_out=None) -> tuple[int, str]:
    """(NVRTC status, log) of compiling `code` for sm_90a; the PTX appended to `ptx_out` (a
    list) if given."""
    prog = ctypes.c_void_p()
    r = lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), f"{name}.cu".encode(), 0,
                               None, None)
    if r:
        return r, "nvrtcCreateProgram failed"
    opts = [b"-std=c++17", b"--gpu-architecture=sm_90a", b"-default-device"]
    opts += [f"-I{i}".encode() for i in includes]
    r = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if r == 0 and ptx_out is not None:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
        ptx = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetPTX(prog, ptx)
        ptx_out.append(ptx.value.decode())
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return r, log.value.decode(errors="replace")


def launches():
    """(name, KernelSource, inputs [(dtype, ndim, size)], output dtypes, template)."""
    kc, smem4, qres = isrc.mma_layout("cuda", 64, 128)
    fp4 = [("uint32", 3, 512), ("uint8", 3, 4)]
    out = [
        ("indexer score fp32", isrc.score_source("cuda", "fp4"),
         [("bfloat16", 4, 8192), ("float32", 3, 64), *fp4, ("int32", 1, 1)], ["float32"],
         [("QT", "bfloat16"), ("D", 128), ("H", 64), ("HC", 64), ("BN", 128), ("E", 2)]),
    ]
    for idec, ptx in ((0, 0), (1, 0), (0, 1), (1, 1), (2, 1), (2, 0)):
        out.append((f"indexer score mma, resident q, IDEC {idec} MMAPTX {ptx}",
                     isrc.score_mma_source("cuda", "fp4"),
                     [("uint32", 4, 4096), ("float32", 3, 64), *fp4, ("int32", 1, 1)],
                     ["float32"], [("D", 128), ("H", 64), ("NW", 4), ("KC", kc),
                                   ("SMEM4", smem4), ("QRES", qres), ("TPT", 4),
                                   ("IDEC", idec), ("MMAPTX", ptx)]))
    out.append(("indexer score mma, resident q, bf16 keys", isrc.score_mma_source("cuda", "bf16"),
                [("uint32", 4, 4096), ("float32", 3, 64), ("uint32", 3, 2048), ("int32", 1, 1)],
                ["float32"], [("D", 128), ("H", 64), ("NW", 4), ("KC", kc), ("SMEM4", smem4),
                              ("QRES", qres), ("TPT", 4), ("IDEC", 0), ("MMAPTX", 1)]))
    kc2, smem2, _ = isrc.mma_layout("metal", 64, 128)  # a re-read layout (32-dim chunks)
    out.append(("indexer score mma, re-read q", isrc.score_mma_source("cuda", "bf16"),
                [("uint32", 4, 4096), ("float32", 3, 64), ("uint32", 3, 2048), ("int32", 1, 1)],
                ["float32"], [("D", 128), ("H", 64), ("NW", 4), ("KC", kc2), ("SMEM4", smem2),
                              ("QRES", False), ("TPT", 1), ("IDEC", 0), ("MMAPTX", 1)]))
    for tg, s, mapped, r, walk in ((512, 16, False, 8, 0), (1024, 1, True, 8, 0),
                                   (256, 1, False, 0, 0), (512, 16, False, 8, 1),
                                   (1024, 1, True, 8, 1)):
        out.append((f"indexer top-k TG{tg} S{s} R{r} W{walk}", isrc.topk_source("cuda"),
                    [("float32", 3, 4096), ("int32", 1, 1), ("int32", 1, 1)],
                    ["int32", "float32"],
                    [("K", 512), ("TG", tg), ("U", 4), ("S", s), ("MAPPED", mapped), ("R", r),
                     ("WALK", walk)]))
    for r, r2, walk in ((8, 16, 0), (8, 16, 1), (0, 0, 0)):
        out.append((f"indexer top-k fused S16 R{r} R2{r2} W{walk}", isrc.topk_fused_source("cuda"),
                    [("float32", 3, 65536), ("int32", 1, 1), ("uint32", 1, 1)],
                    ["int32", "float32", "uint32", "int32"],
                    [("K", 512), ("TG", 512), ("U", 4), ("S", 16), ("MAPPED", False), ("R", r),
                     ("R2", r2), ("WALK", walk)]))
    for allvis, tg, u, cap, ha, walk in ((False, 1024, 8, 2048, 1, 0), (True, 1024, 8, 2048, 0, 1),
                                         (True, 512, 4, 64, 1, 0)):
        out.append((f"indexer top-k one group TG{tg} CAP{cap} HA{ha} W{walk} A{int(allvis)}",
                    isrc.topk_row_source("cuda", allvis),
                    [("float32", 3, 65536), ("int32", 1, 1)], ["int32", "float32"],
                    [("K", 512), ("TG", tg), ("U", u), ("CAP", cap), ("HA", ha),
                     ("WALK", walk)]))
    out.append(("indexer score mma fp4 + row counters", isrc.score_mma_source("cuda", "fp4", True),
                [("uint32", 4, 4096), ("float32", 3, 64), *fp4, ("int32", 1, 1)],
                ["float32", "uint32"], [("D", 128), ("H", 64), ("NW", 4), ("KC", kc),
                                        ("SMEM4", smem4), ("QRES", qres), ("TPT", 2),
                                        ("IDEC", 2), ("MMAPTX", 1)]))
    for idec, tpw, me, nw in ((2, 4, 1, 4), (0, 4, 1, 4), (2, 2, 2, 4), (2, 8, 1, 8)):
        out.append((f"indexer score frag fp4, IDEC {idec} TPW {tpw} ME {me} NW {nw}",
                    isrc.score_frag_source("cuda", "fp4"),
                    [("uint32", 4, 4096), ("float32", 3, 64), *fp4, ("int32", 1, 1)],
                    ["float32"], [("D", 128), ("H", 64), ("NW", nw), ("TPW", tpw), ("ME", me),
                                  ("IDEC", idec)]))
    for allvis, u, cap, walk, scr in ((True, 4, 2048, 0, 0), (False, 8, 2048, 1, 0),
                                      (True, 2, 64, 0, 0), (True, 8, 2048, 0, 0),
                                      (True, 16, 2048, 0, 0), (True, 8, 2048, 0, 1)):
        out.append((f"indexer score + top-k one launch U{u} CAP{cap} W{walk} A{int(allvis)}"
                    f"{' scratch' if scr else ''}",
                    isrc.score_select_source("cuda", "fp4", allvis, bool(scr)),
                    [("uint32", 4, 4096), ("float32", 3, 64), *fp4, ("int32", 1, 1)]
                    + ([("uint32", 2, 4100)] if scr else []),
                    ["int32", "float32"],
                    [("D", 128), ("H", 64), ("NW", 4), ("KC", kc), ("SMEM4", max(smem4, 1024)),
                     ("QRES", qres), ("TPT", 2), ("IDEC", 2), ("MMAPTX", 1), ("K", 512),
                     ("U", u), ("CAP", cap), ("WALK", walk)]))
    out.append(("indexer score mma fp4, all visible", isrc.score_mma_source("cuda", "fp4",
                                                                          allvis=True),
                [("uint32", 4, 4096), ("float32", 3, 64), *fp4, ("int32", 1, 1)], ["float32"],
                [("D", 128), ("H", 64), ("NW", 4), ("KC", kc), ("SMEM4", smem4), ("QRES", qres),
                 ("TPT", 2), ("IDEC", 2), ("MMAPTX", 1)]))
    out.append(("indexer top-k TG512 S16 R8, all visible", isrc.topk_source("cuda", allvis=True),
                [("float32", 3, 4096), ("int32", 1, 1), ("int32", 1, 1)], ["int32", "float32"],
                [("K", 512), ("TG", 512), ("U", 4), ("S", 16), ("MAPPED", False), ("R", 8),
                 ("WALK", 0)]))
    out.append(("indexer score frag bf16 keys + row counters",
                isrc.score_frag_source("cuda", "bf16", True),
                [("uint32", 4, 4096), ("float32", 3, 64), ("uint32", 3, 2048), ("int32", 1, 1)],
                ["float32", "uint32"], [("D", 128), ("H", 64), ("NW", 4), ("TPW", 4), ("ME", 1),
                                        ("IDEC", 0)]))
    for head, norm, sink, reg in ((False, False, 2, True), (True, False, 2, True),
                                  (False, True, 2, True), (True, True, 2, True),
                                  (False, False, 1, True), (False, False, 0, False)):
        out.append((f"mhc pre{' (head)' if head else ''}{' + norm' if norm else ''}"
                    f"{'' if (sink, reg) == (2, True) else f' SINK {sink} REG {int(reg)}'}",
                    msrc.pre_source("cuda"),
                    [("bfloat16", 3, 65536), ("float32", 2, 24), ("float32", 1, 3),
                     ("float32", 1, 24), ("float32", 1, 3), ("bfloat16", 1, 4096)],
                    ["bfloat16", "float32", "float32"],
                    [("XT", "bfloat16"), ("NS", 4), ("D", 4096), ("ITERS", 20), ("TG", 512),
                     ("HEAD", head), ("NORM", norm), ("SINK", sink), ("REG", reg)]))
    out.append(("query/KV norm + RoPE", nsrc.norm_rope_source("cuda"),
                [("bfloat16", 3, 64 * 512), ("bfloat16", 3, 512), ("bfloat16", 1, 512),
                 ("float32", 1, 32), ("int32", 1, 1), ("float32", 1, 2)],
                ["bfloat16", "bfloat16"],
                [("XT", "bfloat16"), ("H", 64), ("C", 512), ("RD", 64), ("PER", 4), ("TG", 128),
                 ("P2", 128)]))
    out.append(("query norm + RoPE, KV into the FP8 ring", nsrc.norm_rope_source("cuda", True),
                [("bfloat16", 3, 64 * 512), ("bfloat16", 3, 512), ("bfloat16", 1, 512),
                 ("float32", 1, 32), ("int32", 1, 1), ("float32", 1, 2), ("uint8", 3, 128 * 448),
                 ("uint8", 3, 128 * 7), ("bfloat16", 3, 128 * 64)],
                ["bfloat16", "uint8", "uint8", "bfloat16"],
                [("XT", "bfloat16"), ("H", 64), ("C", 512), ("RD", 64), ("PER", 4), ("TG", 128),
                 ("P2", 128), ("NOPE", 448), ("BLK", 64), ("W", 128)]))
    for hashed in (False, True):  # hash layers: the tid2eid table and the token ids
        out.append((f"router{' (hash rows)' if hashed else ''}", rsrc.route_source("cuda"),
                    [("float32", 2, 256), ("float32", 1, 1 if hashed else 256),
                     ("int32", 2 if hashed else 1, 129280 * 6 if hashed else 1),
                     ("float32", 1, 1), ("int32", 1, 1)], ["uint32", "float32"],
                    [("E", 256), ("K", 6), ("TG", 256), ("HASH", hashed), ("ROWS", hashed)]))
    for weighted in (False, True):  # shared expert, routed experts
        out.append((f"SwiGLU on fused w1/w3{' (weighted)' if weighted else ''}",
                    ssrc.swiglu_source("cuda"),
                    [("bfloat16", 4, 6 * 2 * 2048), ("float32", 4, 6), ("float32", 1, 1)],
                    ["bfloat16"], [("YT", "bfloat16"), ("OT", "bfloat16"), ("I", 2048),
                                   ("TG", 256), ("WEIGHTED", weighted)]))
    out.append(("embedding into the streams (8-bit affine)", esrc.embed_source("cuda", True),
                [("int32", 2, 1), ("uint32", 2, 129280 * 1024), ("bfloat16", 2, 129280 * 64),
                 ("bfloat16", 2, 129280 * 64)], ["bfloat16"],
                [("XT", "bfloat16"), ("D", 4096), ("NS", 4), ("TG", 256), ("BITS", 8),
                 ("GS", 64)]))
    # the split kernel of the decode attention, FP8 state, CSA (sparse picks): q, ring (codes,
    # scales, RoPE dims), compressed (the same), idx, meta, fp
    fp8 = [("uint8", 3, 448), ("uint8", 3, 7), ("bfloat16", 3, 64)]
    for pf in (0, 1):  # (PF: the next round's loads during this round's math)
        out.append((f"attention split (FP8 KV, picks) PF{pf}", asrc.decode_source("cuda", "fp8"),
                    [("bfloat16", 4, 64 * 512), *fp8, *fp8, ("int32", 2, 512), ("int32", 1, 2),
                     ("float32", 1, 1)], ["float32"] * 3,
                    [("QT", "bfloat16"), ("KV", "bfloat16"), ("C", 512), ("NOPE", 448),
                     ("BLK", 64), ("W", 128), ("TG", 128), ("HG", 2), ("SPL", 64), ("KU", 1),
                     ("SPARSE", True), ("PF", pf)]))
    out.append(("attention combine + inverse RoPE", asrc.combine_source("cuda"),
                [("float32", 3, 640), ("float32", 3, 640), ("float32", 4, 640 * 512),
                 ("float32", 1, 64), ("float32", 1, 32), ("int32", 1, 1)], ["bfloat16"],
                [("QT", "bfloat16"), ("C", 512), ("TG", 128), ("RD", 64)]))
    out.append(("mhc post (MoE sum)", msrc.post_source("cuda"),
                [("bfloat16", 3, 65536), ("bfloat16", 2, 4096), ("float32", 2, 4),
                 ("float32", 3, 16), ("bfloat16", 4, 6 * 4096)], ["bfloat16"],
                [("XT", "bfloat16"), ("FT", "bfloat16"), ("RT", "bfloat16"), ("KR", 6),
                 ("NS", 4), ("D", 4096), ("TG", 256)]))
    for pair in (False, True):
        for xt in ("bfloat16", "float32"):
            m = 4 if pair else 0  # the compressor's pair adds its ape row
            out.append((f"gemv{' pair + ape' if pair else ''} x {xt}",
                        gsrc.gemv_source("cuda", pair),
                        [("float32", 2, 24 * 16384)] * (2 if pair else 1)
                        + [(xt, 1, 16384), ("float32", 1, 1), ("float32", 2, 4 * 24),
                           ("int32", 1, 1)],
                        ["float32"] * (2 if pair else 1),
                        [("XT", xt), ("WT", "float32"), ("K", 16384), ("TG", 256), ("O0", 24),
                         ("RT", "float32"), ("SC", False),
                         *([("O1", 24), ("M", m)] if pair else [])]))
    out.append(("gemv bf16 W, rounded + scaled", gsrc.gemv_source("cuda", False, False),
                [("bfloat16", 2, 64 * 4096), ("bfloat16", 1, 4096), ("float32", 1, 1),
                 ("float32", 1, 1), ("int32", 1, 1)], ["float32"],
                [("XT", "bfloat16"), ("WT", "bfloat16"), ("K", 4096), ("TG", 256), ("O0", 64),
                 ("RT", "bfloat16"), ("SC", True)]))
    out.append(("8-bit head GEMV (opt-in)", qsrc.qgemv_source("cuda"),
                [("uint32", 2, 129280 * 1024), ("float32", 2, 129280 * 64),
                 ("float32", 2, 129280 * 64), ("float32", 1, 4096)], ["float32"],
                [("XT", "float32"), ("ST", "float32"), ("OT", "float32"), ("K", 4096),
                 ("GS", 64), ("TG", 256), ("RW", 8)]))
    from dsv4_mlx.kernels import qgemv as kq
    for bits, O, K, gather, xpp, what in ((4, 4096, 4096, True, False, "experts w1/w3"),
                                          (4, 4096, 2048, True, True, "experts w2"),
                                          (8, 1024, 4096, False, False, "wq_a"),
                                          (8, 32768, 1024, False, False, "wq_b")):
        P = 6 if gather else 1
        wpr, rw = kq.mx_launch(O, P, K, bits)
        lead = (8 if gather else 1) * O
        out.append((f"mx{bits} GEMV ({what})", qsrc.mx_gemv_source("cuda", bits),
                    [("uint32", 3 if gather else 2, lead * K * bits // 32),
                     ("uint8", 3 if gather else 2, lead * K // 32),
                     ("bfloat16", 2, (P if xpp else 1) * K), ("uint32", 1, P)], ["bfloat16"],
                    [("XT", "bfloat16"), ("OT", "bfloat16"), ("K", K), ("BITS", bits),
                     ("TG", kq.MX_TG), ("WPR", wpr), ("RW", rw), ("GATHER", gather),
                     ("XPP", xpp)]))
    return out


def ptxas_usage(ptxas: str, ptx: str) -> str:
    """ptxas's resource line for one kernel's PTX (registers, spills, shared memory)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "k.ptx"
        f.write_text(ptx)
        p = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(f), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True)
    lines = [ln.split("info    : ")[-1] for ln in (p.stdout + p.stderr).splitlines()
             if "Used" in ln or "spill" in ln]
    return "; ".join(lines) if p.returncode == 0 else f"ptxas failed: {p.stderr[-500:]}"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nvrtc", required=True, help="libnvrtc.so")
    ap.add_argument("--include", action="append", default=[], help="an include folder")
    ap.add_argument("--ptxas", help="ptxas (e.g. from the nvidia-cuda-nvcc-cu12 wheel): also "
                    "assemble each kernel's PTX for sm_90a and print its registers a thread, "
                    "spilled bytes and static shared memory (what bounds its occupancy)")
    a = ap.parse_args()
    lib = ctypes.CDLL(a.nvrtc)
    bad, total = 0, 0.0
    for name, ks, inputs, outs, tmpl in launches():
        t = time.perf_counter()
        ptx = [] if a.ptxas else None
        r, log = compile_cuda(lib, isrc.render_cuda(ks, inputs, outs, tmpl), "k", a.include, ptx)
        dt = time.perf_counter() - t
        total += dt
        warn = [ln for ln in log.splitlines() if "warning" in ln.lower()]
        print(f"{name:34s} {'ok' if r == 0 else 'FAILED'} {dt:6.2f} s"
              f"{f', {len(warn)} warnings' if warn else ''}")
        if r or warn:
            print(log[-4000:])
        if ptx:
            print(f"    {ptxas_usage(a.ptxas, ptx[0])}")
        bad += r != 0
    print(f"compile time, all {len(launches())} kernels: {total:.1f} s (NVRTC on this CPU, one thread)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
