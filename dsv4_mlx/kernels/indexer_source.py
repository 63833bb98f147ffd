"""Kernel source of the lightning indexer (spec §4.7): one body, three dialects.

The two kernels (scoring and top-k selection) are written once, in the common subset of
Metal Shading Language, CUDA C++ and C++, against a handful of ``KI_*`` macros and three
index variables (``ki_tid``, ``ki_gx/gy/gz``). A dialect is a header (the macros) plus a
prologue (the index variables) put in front of the body:

* ``metal`` for ``mx.fast.metal_kernel``,
* ``cuda`` for ``mx.fast.cuda_kernel``,
* ``cpp`` a CPU emulation used by the tests (threadgroups run one after the other, their
  threads as fibers that switch at each barrier), so the body's logic is checked on any
  machine.

Rules the bodies keep, so that the same text is valid everywhere:

* inputs are indexed directly (``q[i]``), never through local pointers: newer MLX passes
  inputs of fewer than 8 elements in Metal's ``constant`` address space, and a local
  ``device`` pointer to them would not compile; local pointers exist only to outputs;
* no warp/SIMD intrinsics in the bodies; the one place where the CUDA dialect uses them
  (a warp-aggregated histogram increment) hides behind ``KI_HIST_ADD``;
* every barrier is reached by all threads of a group or by none (early exits are uniform);
* runtime sizes come from ``<input>_shape`` (MLX adds those parameters when the body names
  them); sizes that shape the code (head dim, heads, block sizes, k) are template constants.

`render_metal`, `render_cuda` and `render_cpp` reproduce the full source that MLX compiles
(`mlx/backend/common/metal_kernel.cpp` ``write_signature`` and
`mlx/backend/cuda/custom_kernel.cpp` ``build_kernel``, mlx 0.32); the tests compile them.
"""

from __future__ import annotations

import functools
import re
import textwrap
from dataclasses import dataclass

# --------------------------------------------------------------------------------------------
# dialects

_METAL_DIALECT = r"""
// ---- dialect: Metal (MLX prepends <metal_stdlib>, `using namespace metal`, bfloat16_t) ----
#define KI_FN inline
#define KI_SHARED threadgroup
#define KI_DEVICE device
#define KI_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define KI_ATOMIC_UINT atomic_uint
#define KI_ATOMIC_ADD(a, v) atomic_fetch_add_explicit(&(a), (v), memory_order_relaxed)
#define KI_ATOMIC_LOAD(a) atomic_load_explicit(&(a), memory_order_relaxed)
#define KI_ATOMIC_STORE(a, v) atomic_store_explicit(&(a), (v), memory_order_relaxed)
#define KI_HIST_ADD(h, bin) atomic_fetch_add_explicit(&(h)[(bin)], 1u, memory_order_relaxed)
// The fused top-k's merge: written for Metal but never dispatched there (not validated on a
// Mac; Metal keeps the two-launch top-k)
#define KI_LOAD_CG(p, i) (p)[(i)]
#define KI_DEVICE_FENCE() threadgroup_barrier(mem_flags::mem_device)
#define KI_TICKET(p, i) \
  atomic_fetch_add_explicit((device atomic_uint*)&(p)[(i)], 1u, memory_order_relaxed)
#define KI_GLOBAL_ADD(p, i, v) \
  atomic_fetch_add_explicit((device atomic_uint*)&(p)[(i)], (v), memory_order_relaxed)
#define KI_FLOAT4(a, b, c, d) float4((a), (b), (c), (d))
#define KI_UINT4(a, b, c, d) uint4((a), (b), (c), (d))
#define KI_LOAD4F(p, i) float4((p)[4 * (i)], (p)[4 * (i) + 1], (p)[4 * (i) + 2], (p)[4 * (i) + 3])
#define KI_LOAD4U(p, i) uint4((p)[4 * (i)], (p)[4 * (i) + 1], (p)[4 * (i) + 2], (p)[4 * (i) + 3])
#define KI_AS_FLOAT(u) as_type<float>((uint)(u))
#define KI_AS_UINT(f) as_type<uint>((float)(f))
#define KI_NEG_INF (-INFINITY)
#define KI_UNROLL _Pragma("clang loop unroll(full)")
#define KI_EXP(x) metal::precise::exp((float)(x))
#define KI_RSQRT(x) metal::precise::rsqrt((float)(x))
#define KI_LOG(x) metal::precise::log((float)(x))
#define KI_SQRT(x) metal::precise::sqrt((float)(x))
// RoPE angles: metal::fast, as MLX's rope kernel computes them (the same rotation as
// mx.fast.rope at the same position, on the prefill path)
#define KI_COS(x) metal::fast::cos((float)(x))
#define KI_SIN(x) metal::fast::sin((float)(x))
// log(1 + x) without the cancellation of 1 + x (Metal has no log1p)
inline float ki_log1p(float x) {
  const float u = 1.0f + x;
  return u == 1.0f ? x : metal::precise::log(u) * (x / (u - 1.0f));
}
#define KI_LOG1P(x) ki_log1p((float)(x))
// the sum of x over the 32 lanes of a simdgroup, in every lane
#define KI_WARP_SUM(x) simd_sum((float)(x))
// the f16 in the low / high half of a 32-bit word, as fp32 (exact)
inline float ki_half_lo(uint h) { return (float)as_type<half>((ushort)(h & 0xffffu)); }
inline float ki_half_hi(uint h) { return (float)as_type<half>((ushort)(h >> 16)); }
// x of lane `src` of this simdgroup (every lane calls it)
#define KI_SHFL(x, src) simd_shuffle((float)(x), (ushort)(src))
// 4 bytes at 32-bit word i of an array (the address a multiple of 4)
#define KI_LOAD_U32(p, i) (((const device uint*)(p))[(i)])
// ... and stores them
#define KI_STORE_U32(p, i, v) (((device uint*)(p))[(i)] = (v))
template <typename U>
inline float ki_to_float(U x) {
  return static_cast<float>(x);
}
template <typename T>
inline T ki_from_float(float x) {
  return static_cast<T>(x);
}
// matrix units: a 16x16 fp32 accumulator tile of one simdgroup, as 2 x 2 8x8 matrices,
// fed from threadgroup tiles of float (simdgroup matrices load their own element type)
#define KI_TG threadgroup
#define KI_ALIGN32
typedef float ki_mma_t;
struct ki_mma_acc {
  simdgroup_float8x8 m[2][2];
};
inline void ki_mma_zero(thread ki_mma_acc& c) {
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) c.m[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
}
// c += A B: A 16x16 row-major at a (row stride lda); B 16x16 with B(k, n) at b[n * ldb + k]
inline void ki_mma(thread ki_mma_acc& c, const threadgroup float* a, int lda,
                   const threadgroup float* b, int ldb) {
  for (int kk = 0; kk < 16; kk += 8) {
    simdgroup_float8x8 fa[2];
    simdgroup_float8x8 fb[2];
    for (int i = 0; i < 2; ++i) simdgroup_load(fa[i], a + 8 * i * lda + kk, (ulong)lda);
    for (int j = 0; j < 2; ++j)
      simdgroup_load(fb[j], b + 8 * j * ldb + kk, (ulong)ldb, ulong2(0, 0), true);
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) simdgroup_multiply_accumulate(c.m[i][j], fa[i], fb[j], c.m[i][j]);
  }
}
// the tile, row-major, at d (row stride ldd)
inline void ki_mma_store(threadgroup float* d, int ldd, thread const ki_mma_acc& c) {
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) simdgroup_store(c.m[i][j], d + 8 * i * ldd + 8 * j, (ulong)ldd);
}
@PUT8_FLOAT@"""

_CUDA_DIALECT = r"""
// ---- dialect: CUDA (MLX includes mlx/backend/cuda/device/utils.cuh: cuda_bf16/fp16) ----
#include <mma.h>
#define KI_FN __device__ __forceinline__
#define KI_SHARED __shared__
#define KI_DEVICE
#define KI_BARRIER() __syncthreads()
#define KI_ATOMIC_UINT unsigned int
#define KI_ATOMIC_ADD(a, v) atomicAdd(&(a), (v))
#define KI_ATOMIC_LOAD(a) (a)
#define KI_ATOMIC_STORE(a, v) ((a) = (v))
// Warp-aggregated histogram increment: the lanes holding the same bin add once. In the
// first radix pass nearly all scores share their top bits, and plain shared atomics would
// serialise 32-fold on one address.
#define KI_HIST_ADD(h, bin)                                                   \
  do {                                                                        \
    const unsigned int ki_b_ = (bin);                                         \
    const unsigned int ki_peers_ = __match_any_sync(__activemask(), ki_b_);   \
    if ((int)(threadIdx.x & 31u) == __ffs(ki_peers_) - 1)                     \
      atomicAdd(&(h)[ki_b_], (unsigned int)__popc(ki_peers_));                \
  } while (0)
// The fused top-k's merge (`_TOPK_MERGE`): loads through L2 (data other groups wrote during
// this launch), a fence that makes this thread's global writes visible to every group, and a
// ticket (the old count) on a zeroed counter passed as an input
#define KI_LOAD_CG(p, i) __ldcg(&(p)[(i)])
#define KI_DEVICE_FENCE() __threadfence()
#define KI_TICKET(p, i) atomicAdd(const_cast<unsigned int*>(&(p)[(i)]), 1u)
#define KI_GLOBAL_ADD(p, i, v) atomicAdd(&(p)[(i)], (v))
#define KI_FLOAT4(a, b, c, d) make_float4((a), (b), (c), (d))
#define KI_UINT4(a, b, c, d) make_uint4((a), (b), (c), (d))
// PRMT: bytes 0-3 of a, 4-7 of b, one selector nibble (< 8) an output byte
#define KI_PRMT(a, b, s) __byte_perm((a), (b), (s))
// the f16 in the low / high half of a 32-bit word, as fp32 (exact)
__device__ __forceinline__ float ki_half_lo(unsigned int h) {
  return __half2float(__ushort_as_half((unsigned short)(h & 0xffffu)));
}
__device__ __forceinline__ float ki_half_hi(unsigned int h) {
  return __half2float(__ushort_as_half((unsigned short)(h >> 16)));
}
#define KI_LOAD4F(p, i) (reinterpret_cast<const float4*>(p)[(i)])
#define KI_LOAD4U(p, i) (reinterpret_cast<const uint4*>(p)[(i)])
#define KI_AS_FLOAT(u) __uint_as_float((unsigned int)(u))
#define KI_AS_UINT(f) __float_as_uint((float)(f))
#define KI_NEG_INF __uint_as_float(0xff800000u)
#define KI_UNROLL _Pragma("unroll")
#define KI_EXP(x) expf((float)(x))
#define KI_RSQRT(x) rsqrtf((float)(x))
#define KI_LOG(x) logf((float)(x))
#define KI_SQRT(x) sqrtf((float)(x))
#define KI_COS(x) cosf((float)(x))
#define KI_SIN(x) sinf((float)(x))
#define KI_LOG1P(x) log1pf((float)(x))
// the sum of x over the 32 lanes of a warp, in every lane (a butterfly: every lane adds the
// same pairs, so every lane gets the same bits)
__device__ __forceinline__ float ki_warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
#define KI_WARP_SUM(x) ki_warp_sum((float)(x))
// x of lane `src` of this warp (every lane calls it)
#define KI_SHFL(x, src) __shfl_sync(0xffffffffu, (float)(x), (src))
// 4 bytes at 32-bit word i of an array (the address a multiple of 4)
#define KI_LOAD_U32(p, i) (reinterpret_cast<const unsigned int*>(p)[(i)])
// ... and stores them
#define KI_STORE_U32(p, i, v) (reinterpret_cast<unsigned int*>(p)[(i)] = (v))
__device__ __forceinline__ float ki_to_float(float x) { return x; }
__device__ __forceinline__ float ki_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float ki_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T ki_from_float(float x);
template <>
__device__ __forceinline__ float ki_from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half ki_from_float<__half>(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 ki_from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
// matrix units: a 16x16 fp32 accumulator tile of one warp (wmma m16n16k16), fed from
// shared tiles of bf16 (bf16 x bf16 products are exact in the fp32 accumulator)
#define KI_TG
#define KI_ALIGN32 __align__(32)
typedef __nv_bfloat16 ki_mma_t;
// Two implementations, chosen by the kernel's MMAPTX template constant (the body's
// ki_mma / ki_mma_store calls are macros naming it): 0, nvcuda::wmma (its fragment loads
// from shared memory compile to generic-address LD, 160 a tile a warp, which the scoreboard
// tracks as L1TEX); 1, ldmatrix (one instruction a 16x16 fragment, a shared-memory
// address) and mma.sync m16n8k16 in PTX, with the fragment layouts the PTX ISA documents.
struct ki_mma_acc {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f;  // MMAPTX 0
  float c[8];  // MMAPTX 1: n 0-7 in c[0..3], n 8-15 in c[4..7] (mma.sync's C layout)
};
__device__ __forceinline__ void ki_mma_zero(ki_mma_acc& c) {
  nvcuda::wmma::fill_fragment(c.f, 0.0f);
  for (int i = 0; i < 8; ++i) c.c[i] = 0.0f;
}
// c += A B: A 16x16 row-major at a (row stride lda); B 16x16 with B(k, n) at b[n * ldb + k]
__device__ __forceinline__ void ki_mma_wmma(ki_mma_acc& c, const ki_mma_t* a, int lda,
                                            const ki_mma_t* b, int ldb) {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16,
                         nvcuda::wmma::row_major> fa;
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16,
                         nvcuda::wmma::col_major> fb;
  nvcuda::wmma::load_matrix_sync(fa, a, lda);
  nvcuda::wmma::load_matrix_sync(fb, b, ldb);
  nvcuda::wmma::mma_sync(c.f, fa, fb, c.f);
}
// four 8x8 b16 matrices from shared memory: lane l gives the address of row l % 8 of
// matrix l / 8 (16-byte aligned rows); register i of lane l: row l / 4, elements 2 (l % 4)
// and 2 (l % 4) + 1 of matrix i
__device__ __forceinline__ void ki_ldsm_x4(unsigned int (&r)[4], const ki_mma_t* p) {
  const unsigned int s = (unsigned int)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
// c[0..3] += A (16x16, fragment a) B (16x8, fragment b0 b1), fp32 accumulators
__device__ __forceinline__ void ki_mma_16816(float* c, const unsigned int (&a)[4],
                                             unsigned int b0, unsigned int b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void ki_mma_ptx(ki_mma_acc& c, const ki_mma_t* a, int lda,
                                           const ki_mma_t* b, int ldb) {
  const int lane = (int)(threadIdx.x & 31u);
  unsigned int ra[4], rb[4];
  // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
  ki_ldsm_x4(ra, a + (lane & 15) * lda + (lane >> 4) * 8);
  // B^T rows (n) at b: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
  ki_ldsm_x4(rb, b + ((lane >> 4) * 8 + (lane & 7)) * ldb + ((lane >> 3) & 1) * 8);
  ki_mma_16816(c.c, ra, rb[0], rb[1]);
  ki_mma_16816(c.c + 4, ra, rb[2], rb[3]);
}
// the tile, row-major, at d (row stride ldd)
__device__ __forceinline__ void ki_mma_store_wmma(float* d, int ldd, const ki_mma_acc& c) {
  nvcuda::wmma::store_matrix_sync(d, c.f, ldd, nvcuda::wmma::mem_row_major);
}
// mma.sync's C layout: c[4n + 0, 1] at row l / 4, columns 8n + 2 (l % 4) + 0, 1; c[4n + 2, 3]
// 8 rows lower (ldd and d even: 8-byte stores)
__device__ __forceinline__ void ki_mma_store_ptx(float* d, int ldd, const ki_mma_acc& c) {
  const int lane = (int)(threadIdx.x & 31u);
  const int g = lane >> 2;
  const int t = 2 * (lane & 3);
  for (int n = 0; n < 2; ++n) {
    *reinterpret_cast<float2*>(d + g * ldd + 8 * n + t) = make_float2(c.c[4 * n], c.c[4 * n + 1]);
    *reinterpret_cast<float2*>(d + (g + 8) * ldd + 8 * n + t) =
        make_float2(c.c[4 * n + 2], c.c[4 * n + 3]);
  }
}
template <int P>
__device__ __forceinline__ void ki_mma_sel(ki_mma_acc& c, const ki_mma_t* a, int lda,
                                           const ki_mma_t* b, int ldb) {
  if (P) {
    ki_mma_ptx(c, a, lda, b, ldb);
  } else {
    ki_mma_wmma(c, a, lda, b, ldb);
  }
}
template <int P>
__device__ __forceinline__ void ki_mma_store_sel(float* d, int ldd, const ki_mma_acc& c) {
  if (P) {
    ki_mma_store_ptx(d, ldd, c);
  } else {
    ki_mma_store_wmma(d, ldd, c);
  }
}
#define ki_mma(...) ki_mma_sel<MMAPTX>(__VA_ARGS__)
#define ki_mma_store(...) ki_mma_store_sel<MMAPTX>(__VA_ARGS__)
// 8 tile elements (16 bytes, one store) from 8 bf16 (a uint4 of pairs) / from 8 floats
__device__ __forceinline__ void ki_put8_bf16(ki_mma_t* d, uint4 v) {
  *reinterpret_cast<uint4*>(d) = v;
}
__device__ __forceinline__ unsigned int ki_bf16x2(float lo, float hi) {
  return (unsigned int)__bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
         ((unsigned int)__bfloat16_as_ushort(__float2bfloat16_rn(hi)) << 16);
}
__device__ __forceinline__ void ki_put8(ki_mma_t* d, float a0, float a1, float a2, float a3,
                                        float a4, float a5, float a6, float a7) {
  *reinterpret_cast<uint4*>(d) =
      make_uint4(ki_bf16x2(a0, a1), ki_bf16x2(a2, a3), ki_bf16x2(a4, a5), ki_bf16x2(a6, a7));
}
"""

# CPU emulation: threadgroups run one after the other; the threads of a group are fibers
# (ucontext) that yield to a scheduler at every barrier, so "all threads reach the barrier
# before any passes it" holds exactly. `static` locals play the part of shared memory (one
# group at a time). A barrier reached by some threads while others have returned aborts.
_CPP_DIALECT = r"""
// ---- dialect: C++ CPU emulation (tests only) ----
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <ucontext.h>
#include <vector>

struct float4 { float x, y, z, w; };
struct uint4 { unsigned int x, y, z, w; };

namespace ki_emu {
inline ucontext_t sched_ctx;
inline std::vector<ucontext_t> ctxs;
inline std::vector<std::vector<char>> stacks;
inline std::vector<int> state;  // 0 running, 1 at barrier, 2 returned, 3 at a warp's barrier
inline int cur = 0;
inline int group[3] = {0, 0, 0};
inline std::function<void()>* job = nullptr;

inline void entry() {
  (*job)();
  state[cur] = 2;  // uc_link returns to the scheduler
}
inline void barrier() {
  state[cur] = 1;
  swapcontext(&ctxs[cur], &sched_ctx);
}
// A barrier of the calling thread's warp only (every lane of that warp calls it): released at
// the next sweep, while threads waiting at a group barrier stay held until no warp waits.
inline void warp_barrier() {
  state[cur] = 3;
  swapcontext(&ctxs[cur], &sched_ctx);
}
// Runs `f` once per thread of each threadgroup of a (gx, gy, gz) grid of groups of `tg`,
// the groups in reverse order (the last group of a row runs first: no body may count on
// the order in which groups run or arrive).
inline void run(int gx, int gy, int gz, int tg, std::function<void()> f) {
  job = &f;
  const size_t stack_size = 1 << 16;
  ctxs.resize(tg);
  stacks.resize(tg);
  state.assign(tg, 0);
  for (auto& s : stacks) s.resize(stack_size);
  for (int z = gz - 1; z >= 0; --z)
    for (int y = gy - 1; y >= 0; --y)
      for (int x = gx - 1; x >= 0; --x) {
        group[0] = x; group[1] = y; group[2] = z;
        for (int i = 0; i < tg; ++i) {
          getcontext(&ctxs[i]);
          ctxs[i].uc_stack.ss_sp = stacks[i].data();
          ctxs[i].uc_stack.ss_size = stack_size;
          ctxs[i].uc_link = &sched_ctx;
          makecontext(&ctxs[i], (void (*)())entry, 0);
          state[i] = 0;
        }
        for (;;) {
          int at_barrier = 0, at_warp = 0, returned = 0;
          bool warp_wait = false;
          for (int i = 0; i < tg; ++i) warp_wait = warp_wait || state[i] == 3;
          for (int i = 0; i < tg; ++i) {
            if (state[i] == 2) { ++returned; continue; }
            if (warp_wait && state[i] == 1) { ++at_barrier; continue; }  // held
            cur = i;
            state[i] = 0;
            swapcontext(&sched_ctx, &ctxs[i]);
            if (state[i] == 1) ++at_barrier;
            else if (state[i] == 3) ++at_warp;
            else ++returned;
          }
          // a warp's barrier (a shuffle, an emulated mma) is reached by every lane or by none
          for (int w0 = 0; at_warp != 0 && w0 < tg; w0 += 32) {
            int in = 0, lanes = 0;
            for (int i = w0; i < tg && i < w0 + 32; ++i, ++lanes) in += state[i] == 3 ? 1 : 0;
            if (in != 0 && in != lanes) {
              std::fprintf(stderr, "ki_emu: divergent warp barrier in group (%d, %d, %d), "
                           "warp %d\n", x, y, z, w0 / 32);
              std::abort();
            }
          }
          if (at_barrier == 0 && at_warp == 0) break;
          if (at_warp == 0 && returned != 0) {
            std::fprintf(stderr, "ki_emu: non-uniform barrier in group (%d, %d, %d)\n", x, y, z);
            std::abort();
          }
        }
      }
}
}  // namespace ki_emu

#define KI_FN inline
#define KI_SHARED static
#define KI_DEVICE
#define KI_BARRIER() ki_emu::barrier()
#define KI_ATOMIC_UINT std::atomic<unsigned int>
#define KI_ATOMIC_ADD(a, v) (a).fetch_add((v))
#define KI_ATOMIC_LOAD(a) (a).load()
#define KI_ATOMIC_STORE(a, v) (a).store((v))
#define KI_HIST_ADD(h, bin) (h)[(bin)].fetch_add(1u)
// the fused top-k's merge (groups run one after another: the last one sees every write)
#define KI_LOAD_CG(p, i) (p)[(i)]
#define KI_DEVICE_FENCE() std::atomic_thread_fence(std::memory_order_seq_cst)
inline unsigned int ki_ticket(const unsigned int* p) { return (*const_cast<unsigned int*>(p))++; }
#define KI_TICKET(p, i) ki_ticket(&(p)[(i)])
#define KI_GLOBAL_ADD(p, i, v) ((p)[(i)] += (v))
#define KI_FLOAT4(a, b, c, d) float4{(a), (b), (c), (d)}
#define KI_UINT4(a, b, c, d) uint4{(a), (b), (c), (d)}
#define KI_LOAD4F(p, i) float4{(p)[4 * (i)], (p)[4 * (i) + 1], (p)[4 * (i) + 2], (p)[4 * (i) + 3]}
#define KI_LOAD4U(p, i) uint4{(p)[4 * (i)], (p)[4 * (i) + 1], (p)[4 * (i) + 2], (p)[4 * (i) + 3]}
inline float ki_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int ki_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
#define KI_AS_FLOAT(u) ki_as_float((unsigned int)(u))
#define KI_AS_UINT(f) ki_as_uint((float)(f))
#define KI_NEG_INF (-INFINITY)
#define KI_UNROLL
#define KI_EXP(x) std::exp((float)(x))
#define KI_RSQRT(x) (1.0f / std::sqrt((float)(x)))
#define KI_LOG(x) std::log((float)(x))
#define KI_SQRT(x) std::sqrt((float)(x))
#define KI_COS(x) std::cos((float)(x))
#define KI_SIN(x) std::sin((float)(x))
#define KI_LOG1P(x) std::log1p((float)(x))
// the sum of x over the 32 lanes (threads 32 w .. 32 w + 31) of a warp, in every lane; every
// thread of the group must call it (it waits at two barriers)
inline float ki_warp_sum(float x) {
  static float slot[1024];
  slot[ki_emu::cur] = x;
  ki_emu::barrier();
  float s = 0.0f;
  for (int i = 0; i < 32; ++i) s += slot[(ki_emu::cur & ~31) + i];
  ki_emu::barrier();
  return s;
}
#define KI_WARP_SUM(x) ki_warp_sum((float)(x))
// x of lane `src` (0..31) of this warp; every lane of the warp must call it (it waits at two
// barriers of the warp)
inline float ki_shfl(float x, int src) {
  static float slot[1024];
  slot[ki_emu::cur] = x;
  ki_emu::warp_barrier();
  const float v = slot[(ki_emu::cur & ~31) + src];
  ki_emu::warp_barrier();
  return v;
}
#define KI_SHFL(x, src) ki_shfl((float)(x), (src))
// 4 bytes at 32-bit word i of an array (the address a multiple of 4)
inline unsigned int ki_load_u32(const void* p, int64_t i) {
  unsigned int u;
  std::memcpy(&u, static_cast<const char*>(p) + 4 * i, 4);
  return u;
}
#define KI_LOAD_U32(p, i) ki_load_u32((const void*)(p), (i))
// ... and stores them
inline void ki_store_u32(void* p, int64_t i, unsigned int v) {
  std::memcpy(static_cast<char*>(p) + 4 * i, &v, 4);
}
#define KI_STORE_U32(p, i, v) ki_store_u32((void*)(p), (i), (v))
inline float ki_to_float(float x) { return x; }
template <typename T>
inline T ki_from_float(float x) { return static_cast<T>(x); }
// the f16 in the low / high half of a 32-bit word, as fp32 (exact; subnormals, infinities, NaN)
inline float ki_half_bits(unsigned int b) {
  const unsigned int s = (b & 0x8000u) << 16, e = (b >> 10) & 31u, m = b & 1023u;
  float v = e == 0u ? std::ldexp((float)m, -24)
                    : (e == 31u ? (m ? NAN : INFINITY) : std::ldexp((float)(m | 1024u), (int)e - 25));
  return ki_as_float(ki_as_uint(v) | s);
}
inline float ki_half_lo(unsigned int h) { return ki_half_bits(h & 0xffffu); }
inline float ki_half_hi(unsigned int h) { return ki_half_bits(h >> 16); }
// bfloat16 (the bits; arrays of uint16): widening exact, narrowing round-to-nearest-even
struct ki_bf16 {
  uint16_t bits;
};
inline float ki_to_float(ki_bf16 h) { return ki_as_float((unsigned int)h.bits << 16); }
template <>
inline ki_bf16 ki_from_float<ki_bf16>(float x) {
  unsigned int u = ki_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return ki_bf16{(uint16_t)0x7fc0u};
  u += 0x7fffu + ((u >> 16) & 1u);
  return ki_bf16{(uint16_t)(u >> 16)};
}
// matrix units, emulated: lane 0 of each 32-thread warp computes and stores the whole tile
// (the other lanes' calls do nothing; the tile is only read after a barrier)
#define KI_TG
#define KI_ALIGN32 __attribute__((aligned(32)))
typedef float ki_mma_t;
struct ki_mma_acc { float v[256]; };
inline void ki_mma_zero(ki_mma_acc& c) { for (int i = 0; i < 256; ++i) c.v[i] = 0.0f; }
inline void ki_mma(ki_mma_acc& c, const float* a, int lda, const float* b, int ldb) {
  if (ki_emu::cur % 32 != 0) return;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float s = c.v[m * 16 + n];
      for (int k = 0; k < 16; ++k) s += a[m * lda + k] * b[n * ldb + k];
      c.v[m * 16 + n] = s;
    }
}
inline void ki_mma_store(float* d, int ldd, const ki_mma_acc& c) {
  if (ki_emu::cur % 32 != 0) return;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) d[m * ldd + n] = c.v[m * 16 + n];
}
// mma.sync m16n8k16 (bf16 inputs, fp32 accumulators) of one warp, emulated with the
// fragment layouts of the PTX ISA: lane l = 4 g + t holds a[0] = A(g, 2t..2t+1), a[1] =
// A(g+8, 2t..2t+1), a[2] = A(g, 2t+8..2t+9), a[3] = A(g+8, 2t+8..2t+9), b0 = B(2t..2t+1, g),
// b1 = B(2t+8..2t+9, g) (bf16 pairs, low half first) and c[0..1] = C(g, 2t..2t+1), c[2..3] =
// C(g+8, 2t..2t+1). Every lane of the warp calls it (two barriers of the warp).
inline void ki_mma_16816(float* c, const unsigned int (&a)[4], unsigned int b0, unsigned int b1) {
  static unsigned int sa[1024][4], sbb[1024][2];
  const int me = ki_emu::cur;
  for (int i = 0; i < 4; ++i) sa[me][i] = a[i];
  sbb[me][0] = b0;
  sbb[me][1] = b1;
  ki_emu::warp_barrier();
  const int base = me & ~31, lane = me & 31, g = lane >> 2, t = lane & 3;
  auto half = [](unsigned int w, int hi) {
    return ki_as_float(hi ? (w & 0xffff0000u) : (w << 16));
  };
  float r[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) {
      const float av = half(sa[base + 4 * (row % 8) + (k % 8) / 2][row / 8 + 2 * (k / 8)], k % 2);
      const float bv = half(sbb[base + 4 * col + (k % 8) / 2][k / 8], k % 2);
      acc += av * bv;
    }
    r[i] = acc;
  }
  ki_emu::warp_barrier();
  for (int i = 0; i < 4; ++i) c[i] = r[i];
}
@PUT8_FLOAT@"""

# Metal and the C++ emulation both feed the matrix units from float tiles: one text serves both
_PUT8_FLOAT = r"""
// 8 tile elements (float tiles) from 8 bf16 (one uint4 of pairs, low half first) / from 8 floats
inline void ki_put8_bf16(KI_TG float* d, uint4 v) {
  d[0] = KI_AS_FLOAT(v.x << 16); d[1] = KI_AS_FLOAT(v.x & 0xffff0000u);
  d[2] = KI_AS_FLOAT(v.y << 16); d[3] = KI_AS_FLOAT(v.y & 0xffff0000u);
  d[4] = KI_AS_FLOAT(v.z << 16); d[5] = KI_AS_FLOAT(v.z & 0xffff0000u);
  d[6] = KI_AS_FLOAT(v.w << 16); d[7] = KI_AS_FLOAT(v.w & 0xffff0000u);
}
inline void ki_put8(KI_TG float* d, float a0, float a1, float a2, float a3, float a4, float a5,
                    float a6, float a7) {
  d[0] = a0; d[1] = a1; d[2] = a2; d[3] = a3; d[4] = a4; d[5] = a5; d[6] = a6; d[7] = a7;
}
"""
_METAL_DIALECT = _METAL_DIALECT.replace("@PUT8_FLOAT@", _PUT8_FLOAT)
_CPP_DIALECT = _CPP_DIALECT.replace("@PUT8_FLOAT@", _PUT8_FLOAT)

_DIALECTS = {"metal": _METAL_DIALECT, "cuda": _CUDA_DIALECT, "cpp": _CPP_DIALECT}


def _prologue(tid: str, gx: str, gy: str, gz: str) -> str:
    """The index variables from a dialect's thread index and threadgroup indices."""
    return (f"  const int ki_tid = (int){tid};\n"
            f"  const int ki_gx = (int){gx};\n"
            f"  const int ki_gy = (int){gy};\n"
            f"  const int ki_gz = (int){gz};\n"
            "  (void)ki_tid; (void)ki_gx; (void)ki_gy; (void)ki_gz;\n")


# The prologue is part of the *body*: mx.fast.metal_kernel adds the Metal attributes
# ([[thread_position_in_threadgroup]], ...) to the signature only if the body names them.
_PROLOGUES = {
    "metal": _prologue("thread_position_in_threadgroup.x",
                       *(f"threadgroup_position_in_grid.{c}" for c in "xyz")),
    "cuda": _prologue("threadIdx.x", *(f"blockIdx.{c}" for c in "xyz")),
    "cpp": _prologue("ki_emu::cur", *(f"ki_emu::group[{i}]" for i in range(3))),
}

# Helpers shared by all dialects (after the dialect macros).
_COMMON_HEADER = r"""
// ---- common helpers (spec §3.3 FP4 / FP8 / UE8M0 decoding) ----
// e2m1 code -> value: bit 3 sign, bits 1-2 exponent, bit 0 mantissa:
// [0, 0.5, 1, 1.5, 2, 3, 4, 6]
KI_FN float ki_e2m1(unsigned int c) {
  const unsigned int e = (c >> 1) & 3u;
  const unsigned int m = c & 1u;
  const float mag = 0.5f * (float)(e == 0u ? m : ((2u + m) << (e - 1u)));
  return (c & 8u) ? -mag : mag;
}
// e4m3 (fn) code -> value: bit 7 sign, bits 3-6 exponent (bias 7), bits 0-2 mantissa;
// exponent 0 is subnormal (m x 2^-9). 0x7f / 0xff (NaN) never occur in stored KV.
KI_FN float ki_e4m3(unsigned int c) {
  const unsigned int e = (c >> 3) & 15u;
  const unsigned int m = c & 7u;
  const float mag = e == 0u ? (float)m * 0.001953125f : KI_AS_FLOAT(((e + 120u) << 23) | (m << 20));
  return (c & 128u) ? -mag : mag;
}
// four e4m3 codes (the bytes of w, low first) -> values, NaN for S.1111.111 (weights: MLX's
// mxfp8 dequantization gives NaN there). The CUDA dialect converts in hardware instead
// (KI_E4M3X4 defined after this header: `_CUDA_TAIL`).
KI_FN float ki_e4m3_w(unsigned int c) {
  return (c & 127u) == 127u ? KI_AS_FLOAT(0x7fc00000u) : ki_e4m3(c);
}
KI_FN float4 ki_e4m3x4_sw(unsigned int w) {
  return KI_FLOAT4(ki_e4m3_w(w & 255u), ki_e4m3_w((w >> 8) & 255u),
                   ki_e4m3_w((w >> 16) & 255u), ki_e4m3_w(w >> 24));
}
// UE8M0 byte s -> 2^(s - 127), built from the fp32 bits (s = 0 is the subnormal 2^-127)
KI_FN float ki_e8m0(unsigned int s) {
  return KI_AS_FLOAT(s == 0u ? 0x00400000u : (s << 23));
}
// bf16 bits of e2m1 code c times 2^(sb - 127) built from integers: magnitude code em =
// 2e + m is 2^(e - 1) (1 + m / 2) for e > 0 (exponent field 126 + e, top mantissa bit m) and
// 0.5 for em = 1; the scale adds sb - 127 to the exponent. Equal to rounding the fp32 product
// to bf16 while 3 <= sb <= 251 (every product a normal number; -0 for a negative zero code).
KI_FN unsigned int ki_e2m1_bf16(unsigned int c, unsigned int sb) {
  const unsigned int em = c & 7u;
  const unsigned int mag = em == 0u ? 0u : ((em - (em == 1u ? 1u : 0u)) << 6) + (sb << 7) - 128u;
  return ((c & 8u) << 12) | mag;
}
// the 8 codes of a 32-bit word (low nibble first) as 4 bf16 pairs (low half first)
KI_FN unsigned int ki_e2m1x2_bf16(unsigned int u, unsigned int sb) {
  return ki_e2m1_bf16(u & 15u, sb) | (ki_e2m1_bf16((u >> 4) & 15u, sb) << 16);
}
// A byte permute (CUDA's PRMT in its copy mode): output byte k is byte ((s >> 4k) & 7) of
// the 8 bytes {a (0-3), b (4-7)}. Dialects without the instruction get it from shifts.
#ifndef KI_PRMT
KI_FN unsigned int ki_prmt_sw(unsigned int a, unsigned int b, unsigned int s) {
  unsigned int r = 0u;
  for (unsigned int k = 0u; k < 4u; ++k) {
    const unsigned int i = (s >> (4u * k)) & 7u;
    r |= ((i < 4u ? a >> (8u * i) : b >> (8u * (i - 4u))) & 255u) << (8u * k);
  }
  return r;
}
#define KI_PRMT(a, b, s) ki_prmt_sw((a), (b), (s))
#endif
// IDEC 2: the bits of `ki_e2m1_bf16` (the same range of scale bytes) by table lookups. The
// bf16 magnitudes g(em) of one scale byte, em = 0..7, are 8 16-bit values: their low bytes
// (lb0: em 0-3, lb1: em 4-7) and high bytes (hb0, hb1) make two 8-byte tables, built once
// per scale group; a pair of codes then takes three byte permutes (low bytes, high bytes,
// interleaved) and one more for the two sign bits. g(em) = ((em - (em == 1)) << 6) + c for
// em > 0, c = (sb << 7) - 128, and 0 for em = 0; no half carries into the other (< 2^16).
KI_FN unsigned int ki_e2m1_table(unsigned int sb, unsigned int part) {
  const unsigned int c = (sb << 7) - 128u;
  const unsigned int c2 = c * 0x10001u;
  // part 0 / 1: low / high bytes of em 0-3; part 2 / 3: of em 4-7
  return part < 2u ? KI_PRMT(c << 16, 0x00c00080u + c2, part == 0u ? 0x6420u : 0x7531u)
                   : KI_PRMT(0x01400100u + c2, 0x01c00180u + c2, part == 2u ? 0x6420u : 0x7531u);
}
// codes 2p (low nibble) and 2p + 1 of word u (byte p) as a bf16 pair, low half first
KI_FN unsigned int ki_e2m1x2_lut(unsigned int u, unsigned int p, unsigned int lb0,
                                 unsigned int hb0, unsigned int lb1, unsigned int hb1) {
  const unsigned int sel = (u >> (8u * p)) & 0x77u;  // the two magnitude codes: table indices
  const unsigned int mag = KI_PRMT(KI_PRMT(lb0, lb1, sel), KI_PRMT(hb0, hb1, sel), 0x5140u);
  // sign bits 8p + 3 and 8p + 7 to bits 15 and 31: byte p of u << 4 and of u as bytes 1 and 3
  const unsigned int sgn = KI_PRMT(u << 4, u, (p << 4) | ((p + 4u) << 12));
  return mag | (sgn & 0x80008000u);
}
// codes 2p and 2p + 1 of word u as a bf16 pair by IDEC 1 (`ki_e2m1x2_bf16`, scale byte sb)
// or IDEC 2 (`ki_e2m1x2_lut`, the group's tables); `idec` is a template constant at the call
KI_FN unsigned int ki_e2m1x2_dec(int idec, unsigned int u, unsigned int p, unsigned int sb,
                                 unsigned int lb0, unsigned int hb0, unsigned int lb1,
                                 unsigned int hb1) {
  return idec == 2 ? ki_e2m1x2_lut(u, p, lb0, hb0, lb1, hb1) : ki_e2m1x2_bf16(u >> (8u * p), sb);
}
// fp32 -> bf16 bits, rounded to nearest even; a NaN stays a (quiet) NaN whatever its bits
KI_FN unsigned int ki_bf16_rne(float x) {
  const unsigned int u = KI_AS_UINT(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
// codes 2p and 2p + 1 of word u times 2^(sb - 127) as a bf16 pair (low half first): the fp32
// products rounded to nearest even, as IDEC 0 stores them, for every scale byte
KI_FN unsigned int ki_e2m1x2_f32(unsigned int u, unsigned int p, unsigned int sb) {
  const float s = ki_e8m0(sb);
  const unsigned int c = u >> (8u * p);
  return ki_bf16_rne(ki_e2m1(c & 15u) * s) | (ki_bf16_rne(ki_e2m1((c >> 4) & 15u) * s) << 16);
}
// Order-preserving map of fp32 to uint32: a > b  <=>  key(a) > key(b) (for non-NaN)
KI_FN unsigned int ki_order_key(float f) {
  const unsigned int u = KI_AS_UINT(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
// the fused top-k's merge: a key below the bound lb cannot be picked: 0 (below any other)
KI_FN unsigned int ki_keep(unsigned int k, unsigned int lb) { return k >= lb ? k : 0u; }
// its inverse: the fp32 value of a key
KI_FN float ki_order_value(unsigned int k) {
  return KI_AS_FLOAT((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
"""

# --------------------------------------------------------------------------------------------
# scoring kernel (spec §4.7)

# Key layouts. "f32": keys float32 [B, N, D]. "bf16": keys bfloat16 [B, N, D] passed as
# their uint32 view [B, N, D/2] (element 2i in the low half of word i). "fp4": MLX mxfp4,
# packed uint32 [B, N, D/8] (element j in byte j/2 of the row, low nibble = even j) plus
# UE8M0 scales uint8 [B, N, D/32].
KEY_MODES = ("f32", "bf16", "fp4")

_KEY_INPUTS = {"f32": ["k"], "bf16": ["k"], "fp4": ["kq", "ks"]}

_KEY_LOAD = {
    "f32": """\
      KI_UNROLL
      for (int j = 0; j < D / 4; ++j) {
        const float4 v = KI_LOAD4F(k + row * D, j);
        kr[4 * j + 0] = v.x; kr[4 * j + 1] = v.y; kr[4 * j + 2] = v.z; kr[4 * j + 3] = v.w;
      }
""",
    "bf16": """\
      // bf16 -> fp32 is the 16 bits moved to the top of the word
      KI_UNROLL
      for (int j = 0; j < D / 8; ++j) {
        const uint4 v = KI_LOAD4U(k + row * (D / 2), j);
        kr[8 * j + 0] = KI_AS_FLOAT(v.x << 16); kr[8 * j + 1] = KI_AS_FLOAT(v.x & 0xffff0000u);
        kr[8 * j + 2] = KI_AS_FLOAT(v.y << 16); kr[8 * j + 3] = KI_AS_FLOAT(v.y & 0xffff0000u);
        kr[8 * j + 4] = KI_AS_FLOAT(v.z << 16); kr[8 * j + 5] = KI_AS_FLOAT(v.z & 0xffff0000u);
        kr[8 * j + 6] = KI_AS_FLOAT(v.w << 16); kr[8 * j + 7] = KI_AS_FLOAT(v.w & 0xffff0000u);
      }
""",
    "fp4": """\
      // mxfp4: one UE8M0 scale per 32 elements = per 4 words; the FP4 keys of the
      // reference (spec §4.13 item 3) are read packed and decoded into registers
      KI_UNROLL
      for (int g = 0; g < D / 32; ++g) {
        const float s = ki_e8m0((unsigned int)ks[row * (D / 32) + g]);
        const uint4 v = KI_LOAD4U(kq + row * (D / 8), g);
        KI_UNROLL
        for (int i = 0; i < 8; ++i) {
          kr[32 * g + 0 + i] = ki_e2m1((v.x >> (4 * i)) & 15u) * s;
          kr[32 * g + 8 + i] = ki_e2m1((v.y >> (4 * i)) & 15u) * s;
          kr[32 * g + 16 + i] = ki_e2m1((v.z >> (4 * i)) & 15u) * s;
          kr[32 * g + 24 + i] = ki_e2m1((v.w >> (4 * i)) & 15u) * s;
        }
      }
""",
}

# The (query row, visible prefix, output row) of a scoring threadgroup; both scoring kernels.
_ROW_SETUP = """\
  const int T = q_shape[1];
  const int N = @KEYS@_shape[1];
  const int t = ki_gy;
  const int b = ki_gz;
  int vis = visible[t];
  vis = vis < 0 ? 0 : (vis > N ? N : vis);
  const int64_t bt = (int64_t)b * T + t;
  KI_DEVICE float* out = scores + bt * N;
"""

_SCORE_BODY = """\
  // ---- lightning-indexer scores (spec §4.7) ----
  //   score[b, t, n] = sum_h w[b, t, h] * relu(q[b, t, h, :] . K[b, n, :])   n < visible[t]
  //                  = -inf                                                 otherwise
  // A thread owns one key row at a time (E rows, BN apart), decoded to fp32 registers;
  // the queries of (b, t) sit in shared memory, HC heads at a time; the weighted ReLU sum
  // over heads accumulates in one register, so no [heads x entries] buffer ever exists.
  // Grid: (ceil(N / (BN * E)) * BN, T, B) threads in threadgroups of (BN, 1, 1).
  // Template constants: QT (query dtype), D, H, HC (heads per shared chunk), BN, E.
  constexpr int NCHUNK = (H + HC - 1) / HC;
  KI_SHARED float4 ki_qs[HC * (D / 4)];
@ROW@  const int n_first = ki_gx * (BN * E);

  if (n_first >= vis) {
    // the whole threadgroup lies past the visible prefix (uniform exit: no barrier skipped)
    for (int e = 0; e < E; ++e) {
      const int n = n_first + e * BN + ki_tid;
      if (n < N) out[n] = KI_NEG_INF;
    }
    return;
  }

  float kr[D];
  for (int e = 0; e < E; ++e) {
    const int n = n_first + e * BN + ki_tid;
    const bool active = n < vis;
    if (active) {
      const int64_t row = (int64_t)b * N + n;
@KEY_LOAD@    }
    float acc = 0.0f;
    for (int h0 = 0; h0 < H; h0 += HC) {
      if (NCHUNK > 1 || e == 0) {
        // (re)load queries h0 .. h0 + HC of (b, t) into shared memory, as fp32
        KI_BARRIER();
        for (int i = ki_tid; i < HC * (D / 4); i += BN) {
          const int hh = h0 + i / (D / 4);
          if (hh < H) {
            const int64_t src = (bt * H + hh) * D + 4 * (i % (D / 4));
            ki_qs[i] = KI_FLOAT4(ki_to_float(q[src]), ki_to_float(q[src + 1]),
                                 ki_to_float(q[src + 2]), ki_to_float(q[src + 3]));
          }
        }
        KI_BARRIER();
      }
      if (active) {
        const int hn = (H - h0) < HC ? (H - h0) : HC;
        for (int hc = 0; hc < hn; ++hc) {
          float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
          KI_UNROLL
          for (int j = 0; j < D / 4; ++j) {
            const float4 qv = ki_qs[hc * (D / 4) + j];
            d0 += qv.x * kr[4 * j + 0];
            d1 += qv.y * kr[4 * j + 1];
            d2 += qv.z * kr[4 * j + 2];
            d3 += qv.w * kr[4 * j + 3];
          }
          const float dot = (d0 + d1) + (d2 + d3);
          acc += w[bt * H + h0 + hc] * (dot > 0.0f ? dot : 0.0f);
        }
      }
    }
    if (n < N) out[n] = active ? acc : KI_NEG_INF;
  }
"""

# --------------------------------------------------------------------------------------------
# top-k selection kernel (spec §4.7)

_TOPK_BODY = """\
  // ---- top-k selection (spec §4.7) ----
  // One threadgroup a (row, segment): the K largest of its slice of scores[b, t, 0:vis) by
  // a radix select on an order-preserving 32-bit key, 8 bits a pass, most significant
  // first (at most 4 passes; it stops once the bin holding the K-th key is taken whole);
  // a last pass writes the entries above that bin and as many entries of it as are needed
  // (ties: any of them, §4.7). A slice of at most K entries is written whole, the rest of
  // its K slots as (-1, -inf). The order of the picks is unspecified.
  // S > 1 splits each row in S slices (rows few and long: decode); a second launch with
  // MAPPED = true and S = 1 then selects among the S * K candidates (all "visible"),
  // reading the entry numbers from `cidx`. With S = 1 and MAPPED = false one launch does it:
  // while vis > K every pick is visible; when vis <= K the picks are 0 .. vis-1 and -1.
  // A slice of at most R * TG entries (R > 0) is read once into registers (R keys a thread)
  // and every pass reads those; a longer one is read again by every pass, U loads in flight.
  // Grid: (S * TG, T, B) threads in threadgroups of (TG, 1, 1); TG >= 256.
  // Template: K, TG, U (loads in flight a thread), S, MAPPED, R (register keys a thread, 0:
  // none), WALK (0/1: how a pass finds its digit; the same digit either way). Outputs idx,
  // val [B, T, S * K] (slice sg's K picks at sg * K).
  KI_SHARED KI_ATOMIC_UINT ki_hist[256];
  KI_SHARED unsigned int ki_scan[16];
  KI_SHARED unsigned int ki_sel[3];
  KI_SHARED KI_ATOMIC_UINT ki_cnt[2];
  const int T = scores_shape[1];
  const int M = scores_shape[2];
  const int t = ki_gy;
  const int b = ki_gz;
  const int sg = ki_gx;
  int vis = MAPPED ? M : visible[t];
  vis = vis < 0 ? 0 : (vis > M ? M : vis);
  const int seg = (vis + S - 1) / S;
  const int lo = sg * seg;
  const int hi = lo + seg < vis ? lo + seg : vis;
  const int nseg = hi > lo ? hi - lo : 0;
  const int64_t bt = (int64_t)b * T + t;
  const int64_t base = bt * M;
  KI_DEVICE int32_t* out = idx + (bt * S + sg) * K;
  KI_DEVICE float* oval = val + (bt * S + sg) * K;

  if (nseg <= K) {
    for (int i = ki_tid; i < K; i += TG) {
      if (i < nseg) {
        out[i] = @ENTRY(lo + i)@;
        oval[i] = scores[base + lo + i];
      } else {
        out[i] = -1;
        oval[i] = KI_NEG_INF;
      }
    }
@SMALL_EXIT@  }
@RADIX@"""

# The digit of a radix pass (256 bins in ki_hist) whose bin holds the krem-th largest
# matching key -> ki_sel (digit, the rank left within the bin, the bin's count); every thread
# of the group reaches it (WALK: a template constant).
_TOPK_DIGIT = """\
    // the digit whose bin holds the krem-th largest matching key
    if (!WALK) {
      // 16 threads sum 16 bins each, then one thread walks the chunks from the top, and the
      // bins of its chunk (3 barriers a pass instead of a 16-barrier parallel scan)
      if (ki_tid < 16) {
        unsigned int c = 0u;
        for (int j = 0; j < 16; ++j) c += KI_ATOMIC_LOAD(ki_hist[16 * ki_tid + j]);
        ki_scan[ki_tid] = c;
      }
      KI_BARRIER();
      if (ki_tid == 0) {
        // the matching keys number >= krem, so both walks stop at a bin that holds the
        // krem-th (the bounds only guard the indices)
        unsigned int above = 0u;
        int ch = 15;
        while (ch > 0 && above + ki_scan[ch] < (unsigned int)krem) {
          above += ki_scan[ch];
          --ch;
        }
        int d = 16 * ch + 15;
        unsigned int cnt = KI_ATOMIC_LOAD(ki_hist[d]);
        while (d > 16 * ch && above + cnt < (unsigned int)krem) {
          above += cnt;
          --d;
          cnt = KI_ATOMIC_LOAD(ki_hist[d]);
        }
        ki_sel[0] = (unsigned int)d;
        ki_sel[1] = (unsigned int)krem - above;
        ki_sel[2] = cnt;  // keys in that bin
      }
    } else if (ki_tid < 32) {
      // WALK: the first warp alone, in parallel: lane l sums bins 8l .. 8l+7 (its loads
      // together), the lanes' sums are added from the top lane down by shuffles (exact in
      // fp32: counts < 2^24), and the one lane whose bins hold the krem-th key walks its 8
      // bins in registers. One barrier and ~8 dependent steps fewer than the serial walk.
      const int lane = ki_tid;
      unsigned int bc[8];
      unsigned int c = 0u;
      KI_UNROLL
      for (int j = 0; j < 8; ++j) {
        bc[j] = KI_ATOMIC_LOAD(ki_hist[8 * lane + j]);
        c += bc[j];
      }
      float sfx = (float)c;  // keys in the bins of lanes >= this one
      KI_UNROLL
      for (int o = 1; o < 32; o <<= 1) {
        const float t = KI_SHFL(sfx, lane + o < 32 ? lane + o : lane);
        if (lane + o < 32) sfx += t;
      }
      unsigned int above = (unsigned int)sfx - c;  // keys in the bins of lanes above
      if (above < (unsigned int)krem && (unsigned int)sfx >= (unsigned int)krem) {
        int d = 8 * lane;
        unsigned int cnt = bc[0];
        bool found = false;
        KI_UNROLL
        for (int j = 7; j > 0; --j) {
          if (!found) {
            if (above + bc[j] < (unsigned int)krem) {
              above += bc[j];
            } else {
              d = 8 * lane + j;
              cnt = bc[j];
              found = true;
            }
          }
        }
        ki_sel[0] = (unsigned int)d;
        ki_sel[1] = (unsigned int)krem - above;
        ki_sel[2] = cnt;
      }
    }
"""

# The streamed parts of a radix select (entries lo .. hi of the row at `base`, U loads in flight
# a thread, @GUARD@ before the bound: "!reg && " where register keys may serve instead):
# a pass's histogram of the keys matching `prefix` under `mask`, and the last pass's picks.
_STREAM_HIST = """\
    for (int i0 = lo + ki_tid; @GUARD@i0 < hi; i0 += TG * U) {
      unsigned int uk[U];
      KI_UNROLL
      for (int j = 0; j < U; ++j) {
        const int i = i0 + j * TG;
        uk[j] = i < hi ? @KEY(base + i)@ : 0u;
      }
      KI_UNROLL
      for (int j = 0; j < U; ++j) {
        if (i0 + j * TG < hi && (uk[j] & mask) == prefix) {
          KI_HIST_ADD(ki_hist, (uk[j] >> shift) & 255u);
        }
      }
    }
"""
_STREAM_PICK = """\
  for (int i0 = lo + ki_tid; @GUARD@i0 < hi; i0 += TG * U) {
    float sv[U];
    KI_UNROLL
    for (int j = 0; j < U; ++j) {
      const int i = i0 + j * TG;
      sv[j] = i < hi ? @VAL(base + i)@ : 0.0f;
    }
    KI_UNROLL
    for (int j = 0; j < U; ++j) {
      const int i = i0 + j * TG;
@PICK_STREAM@    }
  }
"""


def _sub_calls(text: str, name: str, fn) -> str:
    """`text` with every @name(arg)@ replaced by fn(arg)."""
    while f"@{name}(" in text:
        a = text.index(f"@{name}(")
        b = text.index(")@", a)
        text = text[:a] + fn(text[a + len(name) + 2:b]) + text[b + 2:]
    return text


def _streamed(guard: str) -> dict:
    """The @STREAM_HIST@ / @STREAM_PICK@ replacements (`_STREAM_HIST`, `_STREAM_PICK`)."""
    return {"@STREAM_HIST@": _STREAM_HIST.replace("@GUARD@", guard),
            "@STREAM_PICK@": _STREAM_PICK.replace("@GUARD@", guard)}


_TOPK_RADIX = """
  // the slice in registers: key j of a thread is entry lo + ki_tid + j * TG
  constexpr int RR = @R@ > 0 ? @R@ : 1;
  const bool reg = @R@ > 0 && nseg <= @R@ * TG;  // (uniform)
  unsigned int rk[RR];
  if (reg) {
    KI_UNROLL
    for (int j = 0; j < RR; ++j) {
      const int i = lo + ki_tid + j * TG;
      rk[j] = i < hi ? @KEY(base + i)@ : 0u;
    }
  }
@PREFIX@  int krem = K;              // how many picks remain among the keys matching `prefix`
  for (int pass = @PASS0@; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    if (ki_tid < 256) KI_ATOMIC_STORE(ki_hist[ki_tid], 0u);
    KI_BARRIER();
    if (reg) {
      KI_UNROLL
      for (int j = 0; j < RR; ++j) {
        if (lo + ki_tid + j * TG < hi && (rk[j] & mask) == prefix) {
          KI_HIST_ADD(ki_hist, (rk[j] >> shift) & 255u);
        }
      }
    }
@STREAM_HIST@    KI_BARRIER();
@DIGIT@    KI_BARRIER();
    prefix |= ki_sel[0] << shift;
    mask |= 255u << shift;
    krem = (int)ki_sel[1];
    if (ki_sel[2] == (unsigned int)krem) break;  // the whole bin is taken (uniform)
  }
  // keys above the bin `prefix` (under `mask`) are all taken, and krem keys of the bin
  if (ki_tid < 2) KI_ATOMIC_STORE(ki_cnt[ki_tid], 0u);
  KI_BARRIER();
  const int n_above = K - krem;
  if (reg) {
    KI_UNROLL
    for (int j = 0; j < RR; ++j) {
      const int i = lo + ki_tid + j * TG;
@PICK_REG@    }
  }
@STREAM_PICK@"""

# The last pass's pick of entry i with order key KEY and score VALUE (both paths above): a key
# above the bin is taken, one in the bin while krem remain; the pick's slot from the counters.
_TOPK_PICK = """const unsigned int um = (KEY) & mask;
int p = -1;
if (i < hi) {
  if (um > prefix) {
    p = (int)KI_ATOMIC_ADD(ki_cnt[0], 1u);
  } else if (um == prefix) {
    const int q2 = (int)KI_ATOMIC_ADD(ki_cnt[1], 1u);
    if (q2 < krem) p = n_above + q2;
  }
}
if (p >= 0) {
@PUT@}
"""

# The fused top-k (CUDA; S > 1): after its slice's picks, each group publishes its slice's
# bound (the K-th key's bits fixed by the select, the rest 0: every pick's key is >= it) and
# takes a ticket; the row's last group to arrive then selects the K largest of the S * K
# candidates itself (no second launch), as `fin` [B, T, K]. The global K-th key is >= the
# largest bound `lb` (that slice alone has K keys >= its bound), so candidates below `lb` are
# dropped (key 0) and the select starts at the first byte where `lb` and the largest
# candidate differ (the bytes above are the same for every candidate that can be picked).
# `tick` [B * T] must be 0 when the launch starts (the scoring kernel's `tick` output, or
# zeros); the kernel leaves it counted up. Candidates are read through L2 (KI_LOAD_CG): they
# were written by other groups during this launch.
_TOPK_MERGE = """
  // ---- the fused merge: the row's last group selects among the S * K candidates ----
  KI_SHARED unsigned int ki_last[1];
  KI_SHARED float ki_wmax[32];
  if (ki_tid == 0) thr[bt * S + sg] = nseg <= K ? 0u : prefix;
  KI_DEVICE_FENCE();
  KI_BARRIER();
  if (ki_tid == 0) ki_last[0] = KI_TICKET(tick, bt) == (unsigned int)(S - 1) ? 1u : 0u;
  KI_BARRIER();
  if (ki_last[0] == 0u) return;  // (uniform)
  KI_DEVICE_FENCE();
  {
    unsigned int lb = 0u;
    for (int j = 0; j < S; ++j) {
      const unsigned int tj = KI_LOAD_CG(thr, bt * S + j);
      lb = tj > lb ? tj : lb;
    }
    const int lo = 0;
    const int hi = S * K;
    const int nseg = S * K;
    const int64_t base = bt * S * K;
    KI_DEVICE int32_t* fout = fin + bt * K;
    // the largest candidate (as a float: the lanes exchange floats)
    float vmax = KI_NEG_INF;
    for (int i = ki_tid; i < hi; i += TG) {
      const float v = KI_LOAD_CG(val, base + i);
      vmax = v > vmax ? v : vmax;
    }
    const int lane = ki_tid & 31;
    KI_UNROLL
    for (int o = 16; o > 0; o >>= 1) {
      const float t2 = KI_SHFL(vmax, lane ^ o);
      vmax = t2 > vmax ? t2 : vmax;
    }
    if (lane == 0) ki_wmax[ki_tid >> 5] = vmax;
    KI_BARRIER();
    vmax = ki_wmax[0];
    for (int w = 1; w < TG / 32; ++w) vmax = ki_wmax[w] > vmax ? ki_wmax[w] : vmax;
    const unsigned int kmax = ki_order_key(vmax);
    // whole bytes above the first one where lb and kmax differ: the same in every candidate
    // that can be picked (lb <= key <= kmax)
    int pass0 = 0;
    while (pass0 < 3 && ((lb ^ kmax) >> (24 - 8 * pass0)) == 0u) ++pass0;
    const unsigned int fixed = pass0 == 0 ? 0u : 0xffffffffu << (32 - 8 * pass0);
@RADIX2@  }
"""


def _topk_pick(key: str, put: str) -> str:
    return textwrap.indent(_TOPK_PICK.replace("KEY", key).replace("@PUT@", put), " " * 6)


def _topk_radix(regs: str, key_at, val_at, key_of_val, put: str, prefix: str,
                pass0: str) -> str:
    """`_TOPK_RADIX` for one select: register keys a thread `regs`; ``key_at(i)`` /
    ``val_at(i)`` the order key / value at element i, ``key_of_val(v)`` the key of a loaded
    value; `put` the pick's stores (entry i, slot p, its value VALUE); the declarations of
    `prefix` and `mask`; the first pass."""
    t = _TOPK_RADIX
    for mark, text in _streamed("!reg && ").items():
        t = t.replace(mark, text)
    t = (t.replace("@DIGIT@", _TOPK_DIGIT).replace("@R@", regs)
         .replace("@PREFIX@", prefix).replace("@PASS0@", pass0))
    t = _sub_calls(_sub_calls(t, "KEY", key_at), "VAL", val_at)
    t = t.replace("@PICK_REG@", _topk_pick("rk[j]", put.replace("VALUE", "ki_order_value(rk[j])")))
    return t.replace("@PICK_STREAM@", _topk_pick(key_of_val("sv[j]"), put.replace("VALUE", "sv[j]")))


_PREFIX0 = ("  unsigned int prefix = 0u;  // key bits fixed so far\n"
            "  unsigned int mask = 0u;    // which bits of the key are fixed\n")


_TOPK_VIS_READ = "  int vis = MAPPED ? M : visible[t];\n"


def _topk_body(fused: bool, allvis: bool = False) -> str:
    """The top-k body: one launch a slice set (`fused` False: MAPPED reads `cidx`), or the
    fused slices + merge (`_TOPK_MERGE`); `allvis`: every entry visible (`visible` unread)."""
    entry = (lambda i: f"{i}") if fused else (lambda i: f"MAPPED ? cidx[base + {i}] : {i}")
    put = ("  out[p] = " + entry("i") + ";\n  oval[p] = (VALUE);\n")
    radix1 = _topk_radix("R", lambda i: f"ki_order_key(scores[{i}])", lambda i: f"scores[{i}]",
                         lambda v: f"ki_order_key({v})", put, _PREFIX0, "0")
    body = _TOPK_BODY.replace("@ENTRY(lo + i)@", entry("lo + i"))
    if allvis:
        assert body.count(_TOPK_VIS_READ) == 1
        body = body.replace(_TOPK_VIS_READ, "  int vis = M;\n")
    if not fused:
        return body.replace("@SMALL_EXIT@", "    return;\n").replace("@RADIX@", radix1)
    # the slice's select runs only past K entries; every group then reaches the ticket
    body = body.replace("@SMALL_EXIT@", "").replace(
        "@RADIX@", "  unsigned int prefix = 0u;  // (the published bound: 0 for a short slice)\n"
        "  if (nseg > K) {\n" + radix1.replace(_PREFIX0, "  prefix = 0u;\n  unsigned int mask = 0u;\n")
        + "  }\n")
    keep = lambda k: f"ki_keep({k}, lb)"  # noqa: E731
    radix2 = _topk_radix("R2", lambda i: keep(f"ki_order_key(KI_LOAD_CG(val, {i}))"),
                         lambda i: f"KI_LOAD_CG(val, {i})", lambda v: keep(f"ki_order_key({v})"),
                         "  fout[p] = KI_LOAD_CG(idx, base + i);\n",
                         "  unsigned int prefix = lb & fixed;\n  unsigned int mask = fixed;\n",
                         "pass0")
    return body + _TOPK_MERGE.replace("@RADIX2@", textwrap.indent(radix2, "  "))


# The top-k of a decode row by one group (`topk_row_source`; `indexer.TOPK_ROW`: the default
# on CUDA for 32K-128K entries): the row read twice instead of S slices and a merge. A
# histogram of the keys' top 12 bits (sign, exponent, 3 mantissa bits: 4096 bins, where the
# first pass of `_TOPK_RADIX` has 256 bins of which a row's scores fill two or three) finds
# the bin of the K-th key; a second read takes the keys above it and copies the bin's keys to
# shared memory when they fit, and 8-bit passes finish there.
_TOPK_ROW_BODY = """\
  // ---- top-k selection, one group a row (spec §4.7; decode rows) ----
  // The K largest of scores[b, t, 0:vis) by one group of TG threads, the row streamed from
  // global memory, U loads in flight a thread: a histogram of the keys' top 12 bits gives
  // the bin of the K-th key; a second read writes the keys above that bin as picks and,
  // once the bin holds at most CAP keys, copies its keys and entries to shared memory, where
  // 8-bit radix passes over bits 19-12, 11-4 and 7-0 (each stopping once the bin holding
  // the K-th key is taken whole) finish the select. A bin of more than CAP keys is narrowed
  // by passes over the row until it fits. Ties: any of them (§4.7). A row of at most K
  // entries is written whole, the rest of its K slots as (-1, -inf). The order of the picks
  // is unspecified.
  // Grid: (TG, T, B) threads in groups of (TG, 1, 1); TG a multiple of 32 dividing 4096.
  // Template: K, TG, U, CAP, HA (0/1: the first histogram's adds plain / as KI_HIST_ADD),
  // WALK. Outputs idx, val [B, T, K].
  constexpr int HB = 4096;  // bins of the first digit, key bits 31-20
  constexpr int NB = HB > 2 * CAP ? HB : 2 * CAP;
  // the first histogram, then the bin's keys (0 .. CAP) and their entries (CAP .. 2 CAP)
  KI_SHARED KI_ATOMIC_UINT ki_big[NB];
  KI_SHARED KI_ATOMIC_UINT ki_hist[256];
  KI_SHARED unsigned int ki_scan[16];
  KI_SHARED unsigned int ki_sel[3];
  KI_SHARED KI_ATOMIC_UINT ki_cnt[2];
  KI_SHARED float ki_wsum[32];
  const int T = scores_shape[1];
  const int M = scores_shape[2];
  const int t = ki_gy;
  const int b = ki_gz;
  int vis = visible[t];
  vis = vis < 0 ? 0 : (vis > M ? M : vis);
  const int64_t bt = (int64_t)b * T + t;
  const int64_t base = bt * M;
  KI_DEVICE int32_t* out = idx + bt * K;
  KI_DEVICE float* oval = val + bt * K;
  if (vis <= K) {
    for (int i = ki_tid; i < K; i += TG) {
      out[i] = i < vis ? i : -1;
      oval[i] = i < vis ? scores[base + i] : KI_NEG_INF;
    }
    return;
  }
  for (int i = ki_tid; i < HB; i += TG) KI_ATOMIC_STORE(ki_big[i], 0u);
  if (ki_tid < 2) KI_ATOMIC_STORE(ki_cnt[ki_tid], 0u);
  KI_BARRIER();
  for (int i0 = ki_tid; i0 < vis; i0 += TG * U) {
    unsigned int uk[U];
    KI_UNROLL
    for (int j = 0; j < U; ++j) {
      const int i = i0 + j * TG;
      uk[j] = i < vis ? ki_order_key(scores[base + i]) : 0u;
    }
    KI_UNROLL
    for (int j = 0; j < U; ++j) {
      if (i0 + j * TG < vis) {
        if (HA) {
          KI_HIST_ADD(ki_big, uk[j] >> 20);
        } else {
          KI_ATOMIC_ADD(ki_big[uk[j] >> 20], 1u);
        }
      }
    }
  }
  KI_BARRIER();
"""
_TOPK_ROW_REST = """\
  {
    // the bin of the K-th largest key: a thread sums its BPT bins (the bins above them are
    // the threads' above), the sums above it by shuffles within its warp and over the
    // warps' totals (exact in fp32: counts < 2^24); the one thread whose bins hold the K-th
    // key walks them
    constexpr int BPT = HB / TG;
    const int lane = ki_tid & 31;
    const int wid = ki_tid >> 5;
    unsigned int bc[BPT];
    unsigned int c = 0u;
    KI_UNROLL
    for (int j = 0; j < BPT; ++j) {
      bc[j] = KI_ATOMIC_LOAD(ki_big[BPT * ki_tid + j]);
      c += bc[j];
    }
    float sfx = (float)c;  // keys in the bins of this warp's lanes >= this one
    KI_UNROLL
    for (int o = 1; o < 32; o <<= 1) {
      const float t2 = KI_SHFL(sfx, lane + o < 32 ? lane + o : lane);
      if (lane + o < 32) sfx += t2;
    }
    if (lane == 0) ki_wsum[wid] = sfx;
    KI_BARRIER();
    float ws = lane < TG / 32 ? ki_wsum[lane] : 0.0f;  // then: the warps >= lane
    KI_UNROLL
    for (int o = 1; o < 32; o <<= 1) {
      const float t2 = KI_SHFL(ws, lane + o < 32 ? lane + o : lane);
      if (lane + o < 32) ws += t2;
    }
    const float wa = KI_SHFL(ws, wid + 1 < 32 ? wid + 1 : 0);
    unsigned int above = (unsigned int)((wid + 1 < 32 ? wa : 0.0f) + sfx) - c;
    if (above < (unsigned int)K && above + c >= (unsigned int)K) {
      int d = BPT * ki_tid;
      unsigned int cnt = bc[0];
      bool found = false;
      KI_UNROLL
      for (int j = BPT - 1; j > 0; --j) {
        if (!found) {
          if (above + bc[j] < (unsigned int)K) {
            above += bc[j];
          } else {
            d = BPT * ki_tid + j;
            cnt = bc[j];
            found = true;
          }
        }
      }
      ki_sel[0] = (unsigned int)d;
      ki_sel[1] = (unsigned int)K - above;
      ki_sel[2] = cnt;
    }
    KI_BARRIER();
  }
  unsigned int prefix = ki_sel[0] << 20;  // key bits fixed so far
  unsigned int mask = 0xfff00000u;        // which bits of the key are fixed
  int krem = (int)ki_sel[1];              // picks left among the keys matching `prefix`
  unsigned int binc = ki_sel[2];          // the keys matching `prefix`
  int ncand = 0;                          // the bin's keys in ki_big (0: not copied; uniform)
  for (int lv = 0; lv < 3 && binc != (unsigned int)krem; ++lv) {
    const int shift = lv == 0 ? 12 : (lv == 1 ? 4 : 0);
    if (ncand == 0 && binc <= (unsigned int)CAP) {
      // the second read: keys above the bin are picks, the bin's keys go to ki_big
@SECOND_READ@          const unsigned int um = ki_order_key(sv[j]) & mask;
          if (i < vis && um > prefix) {
            const int p = (int)KI_ATOMIC_ADD(ki_cnt[0], 1u);
@PUT_ABOVE@          } else if (i < vis && um == prefix) {
            const unsigned int q2 = KI_ATOMIC_ADD(ki_cnt[1], 1u);
            KI_ATOMIC_STORE(ki_big[q2], ki_order_key(sv[j]));
            KI_ATOMIC_STORE(ki_big[CAP + q2], (unsigned int)i);
          }
        }
      }
      ncand = (int)binc;
      KI_BARRIER();
      // (the pick counts the bin again: ordered before it by the barriers below)
      if (ki_tid == 0) KI_ATOMIC_STORE(ki_cnt[1], 0u);
    }
    for (int i = ki_tid; i < 256; i += TG) KI_ATOMIC_STORE(ki_hist[i], 0u);
    KI_BARRIER();
    if (ncand > 0) {
      for (int i = ki_tid; i < ncand; i += TG) {
        const unsigned int key = KI_ATOMIC_LOAD(ki_big[i]);
        if ((key & mask) == prefix) KI_HIST_ADD(ki_hist, (key >> shift) & 255u);
      }
    } else {
      const int lo = 0;
      const int hi = vis;
  @STREAM_HIST@    }
    KI_BARRIER();
@DIGIT@    KI_BARRIER();
    prefix |= ki_sel[0] << shift;
    mask |= 255u << shift;
    krem = (int)ki_sel[1];
    binc = ki_sel[2];
  }
  // keys above the bin `prefix` (under `mask`) are all taken (those above the copied bin
  // already: ki_cnt[0] counts on), and krem keys of the bin
  const int n_above = K - krem;
  if (ncand > 0) {
    const int hi = ncand;
    for (int i = ki_tid; i < hi; i += TG) {
      const unsigned int key = KI_ATOMIC_LOAD(ki_big[i]);
@PICK_CAND@    }
  } else {
    const int lo = 0;
    const int hi = vis;
  @STREAM_PICK@  }
"""


# The one-group top-k's second read of the row: `_STREAM_PICK`'s loop heads over entries
# 0 .. vis (U scalar loads in flight a thread; each lane's value sv[j] of entry i then goes to
# the pick or the bin's copy), two levels deeper.
_ROW_READ = textwrap.indent(
    _STREAM_PICK[:_STREAM_PICK.index("@PICK_STREAM@")].replace("@GUARD@", "")
    .replace("lo + ki_tid", "ki_tid").replace("< hi", "< vis"), "    ")
assert _ROW_READ.count("vis") == 2 and "hi" not in _ROW_READ and "lo +" not in _ROW_READ


def _row_rest(val_at, put: str, put_cand: str, read: str = _ROW_READ) -> str:
    """`_TOPK_ROW_REST` (the bin of the K-th key onward) reading the row's entry i as
    ``val_at(i)``, writing a pick (entry i, slot p, its value VALUE) with `put`, a copied
    candidate's (entry ``KI_ATOMIC_LOAD(ki_big[CAP + i])``, key `key`) with `put_cand`; the
    second read's loop heads `read`."""
    body = _TOPK_ROW_REST.replace("@SECOND_READ@", read)
    pick = _topk_pick("ki_order_key(sv[j])", put.replace("VALUE", "sv[j]"))
    for mark, text in _streamed("").items():  # (one level deeper than the radix select's)
        body = body.replace("  " + mark,
                            textwrap.indent(text.replace("@PICK_STREAM@", pick), "  "))
    body = _sub_calls(_sub_calls(body, "KEY", lambda i: f"ki_order_key({val_at(i)})"), "VAL",
                      val_at)
    body = body.replace("@DIGIT@", _TOPK_DIGIT)
    body = body.replace("@PUT_ABOVE@", textwrap.indent(put.replace("VALUE", "sv[j]"), " " * 10))
    return body.replace("@PICK_CAND@", _topk_pick("key", put_cand))


def _topk_row_body(allvis: bool) -> str:
    body = _TOPK_ROW_BODY + _row_rest(
        lambda i: f"scores[{i}]", "  out[p] = i;\n  oval[p] = VALUE;\n",
        "  out[p] = (int)KI_ATOMIC_LOAD(ki_big[CAP + i]);\n  oval[p] = ki_order_value(key);\n")
    if allvis:
        assert body.count(_VIS_READ) == 1
        body = body.replace(_VIS_READ, "  int vis = M;\n")
    return body


@dataclass(frozen=True)
class KernelSource:
    """What ``mx.fast.{metal,cuda}_kernel`` takes, for one kernel in one dialect."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    header: str
    source: str


# After the common helpers, CUDA only: four e4m3 codes converted by the hardware (sm_89 on:
# cvt.rn.f16x2.e4m3x2, exact, NaN for S.1111.111; the upper byte of each 16-bit half to the
# upper f16), the common helper before that.
_CUDA_TAIL = r"""
__device__ __forceinline__ float4 ki_e4m3x4_hw(unsigned int w) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  unsigned int lo, hi;
  asm("{\n .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.rn.f16x2.e4m3x2 %0, l;\n"
      " cvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
      : "=r"(lo), "=r"(hi)
      : "r"(w));
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&lo));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&hi));
  return make_float4(a.x, a.y, b.x, b.y);
#else
  return ki_e4m3x4_sw(w);
#endif
}
#define KI_E4M3X4(w) ki_e4m3x4_hw((w))
"""
_SW_TAIL = "\n#define KI_E4M3X4(w) ki_e4m3x4_sw((w))\n"  # (Metal, the C++ emulation)


def _header(dialect: str) -> str:
    if dialect not in _DIALECTS:
        raise ValueError(f"unknown dialect {dialect!r}; expected one of {sorted(_DIALECTS)}")
    return _DIALECTS[dialect] + _COMMON_HEADER + (_CUDA_TAIL if dialect == "cuda" else _SW_TAIL)


# Trimming a header to what a body uses. MLX hashes a custom kernel's whole source at every
# evaluation (both backends) and rebuilds it at every call: a kernel carries only the
# definitions its body reaches (directly or through other kept definitions), ~1-3 KB instead
# of ~16 KB. A header is cut into units: a #define (with its continuation lines), a
# function, struct, typedef or declaration (to the end of its braces or its `;`), each with
# the comment lines just above it. Conditional blocks (#if .. #endif), #include lines and
# namespaces are always kept. Identifiers are matched in code only (comments and string
# literals removed).
_IDENT = re.compile(r"[A-Za-z_]\w*")
_NOT_CODE = re.compile(r'"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'|//[^\n]*')


def _code(text: str) -> str:
    return _NOT_CODE.sub(" ", text)


def _unit_name(code: str):
    """The name a code unit defines (None: keep it whatever the body uses)."""
    c = code.strip()
    if c.startswith("namespace"):
        return None
    m = re.match(r"(?:typedef|using)\b", c)
    if m:
        return _IDENT.findall(c.split(";")[0])[-1]
    m = re.match(r"struct\s+([A-Za-z_]\w*)", c)
    if m:
        return m.group(1)
    head = c.split("(")[0] if "(" in c else c.split("{")[0]
    while "<" in head:  # template arguments (not nested in our headers)
        a = head.index("<")
        b = head.find(">", a)
        head = head[:a] + " " + head[b + 1:] if b >= 0 else head[:a]
    ids = _IDENT.findall(head)
    return ids[-1] if ids else None


def _header_units(header: str):
    """[(names or None, text)] of `header` (see above)."""
    lines = header.split("\n")
    units, pending, i = [], [], 0
    while i < len(lines):
        st = lines[i].strip()
        if not st or st.startswith("//"):
            pending.append(lines[i])
            i += 1
            continue
        start = i
        if st.startswith("#"):
            if re.match(r"#\s*if", st):  # to the matching #endif
                depth = 0
                while i < len(lines):
                    s2 = lines[i].strip()
                    depth += bool(re.match(r"#\s*if", s2)) - bool(re.match(r"#\s*endif", s2))
                    i += 1
                    if depth == 0:
                        break
                # named by its #defines (the shift-built byte permute where the dialect has
                # none): kept if the body reaches one; without any, kept
                name = set(re.findall(r"#\s*define\s+([A-Za-z_]\w*)", "\n".join(lines[start:i])))
                name = name or None
            else:
                while lines[i].rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                i += 1
                m = re.match(r"#\s*define\s+([A-Za-z_]\w*)", st)
                name = {m.group(1)} if m else None
        else:  # code: to the end of its braces, or its `;` outside any
            depth, opened = 0, False
            while i < len(lines):
                c = _code(lines[i])
                depth += c.count("{") - c.count("}")
                opened = opened or "{" in c
                i += 1
                if depth == 0 and ((opened and "}" in c) or (not opened and c.rstrip().endswith(";"))):
                    break
            name = _unit_name(_code("\n".join(lines[start:i])))
            name = None if name is None else {name}
        units.append((name, "\n".join(pending + lines[start:i])))
        pending = []
    if pending:
        units.append((None, "\n".join(pending)))
    return units


def trim_header(header: str, body: str) -> str:
    """`header` less the definitions `body` never reaches."""
    units = _header_units(header)
    keep = [name is None for name, _ in units]
    refs = set(_IDENT.findall(_code(body)))
    for k, (_, text) in zip(keep, units):
        if k:
            refs |= set(_IDENT.findall(_code(text)))
    changed = True
    while changed:
        changed = False
        for j, (name, text) in enumerate(units):
            if not keep[j] and name & refs:
                keep[j] = changed = True
                refs |= set(_IDENT.findall(_code(text)))
    return "\n".join(text for k, (_, text) in zip(keep, units) if k) + "\n"


def strip_comments(text: str) -> str:
    """`text` without its // comments and the lines they leave blank (string literals kept):
    the comments are for readers of this module, not for MLX's hashing at every launch."""
    out = []
    for line in text.split("\n"):
        if "//" in line:
            line = _NOT_CODE.sub(lambda m: "" if m.group(0).startswith("//") else m.group(0),
                                 line).rstrip()
            if not line.strip():
                continue
        out.append(line)
    return "\n".join(out)


def make_source(dialect: str, name: str, input_names, output_names, body: str) -> KernelSource:
    """A kernel of `body` in `dialect`: the dialect's header (trimmed to what the body uses:
    `trim_header`), its prologue before the body; // comments stripped from both."""
    source = strip_comments(_PROLOGUES[dialect] + body)
    # (the signature that MLX or the emulation puts around the body names dtypes too: the
    # emulation's bf16 is a struct of its header)
    types = " ".join(_SIGNATURE_TYPES[dialect].values())
    return KernelSource(name=name, input_names=tuple(input_names), output_names=tuple(output_names),
                        header=strip_comments(trim_header(_header(dialect),
                                                          source + "\n" + types)),
                        source=source)


# With a `tick` output [B * T] uint32: the row's first group zeroes the row's counter, which
# the fused top-k then counts on (its input; the graph orders the two launches by it).
_TICK_ZERO = "  if (ki_gx == 0 && ki_tid == 0) tick[bt] = 0u;\n"


# All visible (`allvis`: a decode row sees every entry): the count is N (M) without reading
# `visible`. MLX's CUDA allocator keeps arrays of <= 8 bytes (a decode step's [1] counts) in
# managed memory whose pages stay on the host, so every thread block's first load of it went
# over the bus: under Nsight Compute 58% of the register-fragment scorer's stall samples sat
# on that one load (H100, 64K entries; 28.0 -> 14.1 us with the counts in device memory).
_VIS_READ = "  int vis = visible[t];\n"
_VIS_ALL = "  int vis = N;\n"


def _rows(tick: bool, allvis: bool = False) -> str:
    assert _ROW_SETUP.count(_VIS_READ) == 1
    rows = _ROW_SETUP.replace(_VIS_READ, _VIS_ALL) if allvis else _ROW_SETUP
    return rows + (_TICK_ZERO if tick else "")


def _suffix(tick: bool, allvis: bool) -> str:
    return ("_tick" if tick else "") + ("_all" if allvis else "")


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def score_source(dialect: str, key_mode: str, tick: bool = False,
                 allvis: bool = False) -> KernelSource:
    """Scoring kernel. Inputs: q [B,T,H,D] (QT), w [B,T,H] f32, keys (per `key_mode`),
    visible [T] int32 (never read with `allvis`: every entry visible); output scores [B,T,N]
    f32 (and, with `tick`, tick [B*T] uint32 zeros). Template: QT, D, H, HC, BN, E."""
    if key_mode not in KEY_MODES:
        raise ValueError(f"unknown key mode {key_mode!r}; expected one of {KEY_MODES}")
    keys = _KEY_INPUTS[key_mode]
    body = (_SCORE_BODY.replace("@ROW@", _rows(tick, allvis)).replace("@KEYS@", keys[0])
            .replace("@KEY_LOAD@", _KEY_LOAD[key_mode]))
    return make_source(dialect, f"dsv4_indexer_score_{key_mode}" + _suffix(tick, allvis),
                       ("q", "w", *keys, "visible"), ("scores", "tick") if tick else ("scores",),
                       body)


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def topk_source(dialect: str, allvis: bool = False) -> KernelSource:
    """Top-k kernel. Inputs: scores [B,T,M] f32, visible [T] int32, cidx [B,T,M] int32
    (read only when MAPPED); outputs idx [B,T,S*K] int32, val [B,T,S*K] f32 (slice s's K
    picks at s*K).
    Template: K, TG, U, S, MAPPED, R, WALK. `allvis`: every entry visible (`visible` unread)."""
    return make_source(dialect, "dsv4_indexer_topk" + _suffix(False, allvis),
                       ("scores", "visible", "cidx"), ("idx", "val"), _topk_body(False, allvis))


@functools.lru_cache(maxsize=None)
def topk_fused_source(dialect: str, allvis: bool = False) -> KernelSource:
    """The fused top-k (S > 1 slices and their merge in one launch; `_TOPK_MERGE`). Inputs:
    scores [B,T,M] f32, visible [T] int32, tick [>= B*T] uint32 (zeros; counted up);
    outputs idx, val [B,T,S*K] (the candidates), thr [B,T,S] uint32 (the slices' bounds),
    fin [B,T,K] int32 (the picks, -1 where not visible).
    Template: K, TG, U, S, R, R2 (register keys a thread of the merge, 0: none), WALK."""
    return make_source(dialect, "dsv4_indexer_topk_fused" + _suffix(False, allvis),
                       ("scores", "visible", "tick"), ("idx", "val", "thr", "fin"),
                       _topk_body(True, allvis))


@functools.lru_cache(maxsize=None)
def topk_row_source(dialect: str, allvis: bool = False) -> KernelSource:
    """The top-k of a row by one group (`_TOPK_ROW_BODY`; decode rows). Inputs: scores
    [B,T,M] f32, visible [T] int32 (never read with `allvis`); outputs idx [B,T,K] int32
    (-1 where not visible), val [B,T,K] f32. Template: K, TG, U, CAP, HA, WALK."""
    return make_source(dialect, "dsv4_indexer_topk_row" + _suffix(False, allvis),
                       ("scores", "visible"), ("idx", "val"), _topk_row_body(allvis))


# --------------------------------------------------------------------------------------------
# scoring on the matrix units (tensor cores / simdgroup matrices), spec §4.7

# Key tile loaders: entries n0 .. n0+NB, dims kc .. kc+KC of the keys -> kb (ki_mma_t),
# rows past N as zeros. Only exact-in-bf16 key layouts: FP4 (e2m1 x 2^k) and bf16. Loading
# and storing are apart, so that a thread's loads all leave before any is used and can be
# issued a tile early: "decl" (the registers), "load" (global memory -> registers; reads
# kn0, the tile's first entry, and kc), "put" (registers -> the shared tile; reads n0, the
# same entry, and kc). KL: a thread's share.
_KEY_TILE = {
    "bf16": {
        "decl": """\
  constexpr int KL = (NB * (KC / 8) + TPG - 1) / TPG;  // 16-byte pieces a thread
  uint4 kv[KL];
""",
        "load": """\
      KI_UNROLL
      for (int j = 0; j < KL; ++j) {
        const int i = ki_tid + j * TPG;
        const int n = kn0 + i / (KC / 8);
        const int64_t row = (int64_t)b * N + (n < N ? n : 0);
        kv[j] = i < NB * (KC / 8) ? KI_LOAD4U(k + row * (D / 2), kc / 8 + i % (KC / 8))
                                  : uint4_zero;
      }
""",
        "put": """\
      KI_UNROLL
      for (int j = 0; j < KL; ++j) {
        const int i = ki_tid + j * TPG;
        if (i < NB * (KC / 8)) {
          const int r = i / (KC / 8);
          ki_put8_bf16(kb + r * LDK + 8 * (i % (KC / 8)), n0 + r < N ? kv[j] : uint4_zero);
        }
      }
""",
    },
    "fp4": {
        "decl": """\
  // one (entry, 32-value scale group) a piece: 4 packed words and one UE8M0 scale
  constexpr int KL = (NB * (KC / 32) + TPG - 1) / TPG;  // pieces a thread
  uint4 kv[KL];
  unsigned int ksv[KL];
""",
        "load": """\
      KI_UNROLL
      for (int j = 0; j < KL; ++j) {
        const int i = ki_tid + j * TPG;
        const int n = kn0 + i / (KC / 32);
        const int64_t row = (int64_t)b * N + (n < N ? n : 0);
        const int gg = kc / 32 + i % (KC / 32);
        const bool in = i < NB * (KC / 32);
        kv[j] = in ? KI_LOAD4U(kq + row * (D / 8), gg) : uint4_zero;
        ksv[j] = in ? (unsigned int)ks[row * (D / 32) + gg] : 0u;
      }
""",
        "put": """\
      KI_UNROLL
      for (int j = 0; j < KL; ++j) {
        const int i = ki_tid + j * TPG;
        if (i < NB * (KC / 32)) {
          const int r = i / (KC / 32);
          const int g = i % (KC / 32);
          const unsigned int vw[4] = {kv[j].x, kv[j].y, kv[j].z, kv[j].w};
          const unsigned int sb = ksv[j];
          if (IDEC != 0 && n0 + r < N && sb >= 3u && sb <= 251u) {
            // IDEC 1: bf16 bits from integer operations (the same bits as the fp32 path
            // below, ~20% fewer instructions: 112 vs 136 SASS for 8 codes); IDEC 2: the same
            // bits by byte permutes from this group's tables (made for IDEC 2 only)
            const unsigned int lb0 = IDEC == 2 ? ki_e2m1_table(sb, 0u) : 0u;
            const unsigned int hb0 = IDEC == 2 ? ki_e2m1_table(sb, 1u) : 0u;
            const unsigned int lb1 = IDEC == 2 ? ki_e2m1_table(sb, 2u) : 0u;
            const unsigned int hb1 = IDEC == 2 ? ki_e2m1_table(sb, 3u) : 0u;
            KI_UNROLL
            for (int jj = 0; jj < 4; ++jj) {
              const unsigned int u = vw[jj];
              ki_put8_bf16(kb + r * LDK + 32 * g + 8 * jj,
                           KI_UINT4(ki_e2m1x2_dec(IDEC, u, 0u, sb, lb0, hb0, lb1, hb1),
                                    ki_e2m1x2_dec(IDEC, u, 1u, sb, lb0, hb0, lb1, hb1),
                                    ki_e2m1x2_dec(IDEC, u, 2u, sb, lb0, hb0, lb1, hb1),
                                    ki_e2m1x2_dec(IDEC, u, 3u, sb, lb0, hb0, lb1, hb1)));
            }
          } else {
            // the fp32 product rounded to the tile's type; with IDEC 1 / 2 only for rows past N
            // (zeros) and scales at the ends of the range (subnormal or infinite products)
            const float s = n0 + r < N ? ki_e8m0(sb) : 0.0f;
            KI_UNROLL
            for (int jj = 0; jj < 4; ++jj) {
              const unsigned int u = vw[jj];
              ki_put8(kb + r * LDK + 32 * g + 8 * jj,
                      ki_e2m1(u & 15u) * s, ki_e2m1((u >> 4) & 15u) * s,
                      ki_e2m1((u >> 8) & 15u) * s, ki_e2m1((u >> 12) & 15u) * s,
                      ki_e2m1((u >> 16) & 15u) * s, ki_e2m1((u >> 20) & 15u) * s,
                      ki_e2m1((u >> 24) & 15u) * s, ki_e2m1((u >> 28) & 15u) * s);
            }
          }
        }
      }
""",
    },
}
MMA_KEY_MODES = tuple(_KEY_TILE)

# The queries (b, t, 0..H, kc..kc+KC) -> qs: every load of a thread requested ("load", into
# qv), then stored ("put"); with resident queries once (kc = 0, KC = D), else each chunk.
_Q_LOAD = """\
    uint4 qv[QL];
    KI_UNROLL
    for (int j = 0; j < QL; ++j) {
      const int i = ki_tid + j * TPG;
      qv[j] = i < H * (KC / 8)
                  ? KI_LOAD4U(q + (bt * H + i / (KC / 8)) * (D / 2), kc / 8 + i % (KC / 8))
                  : uint4_zero;
    }
"""
_Q_PUT = """\
    KI_UNROLL
    for (int j = 0; j < QL; ++j) {
      const int i = ki_tid + j * TPG;
      if (i < H * (KC / 8)) ki_put8_bf16(qs + (i / (KC / 8)) * LDQ + 8 * (i % (KC / 8)), qv[j]);
    }
"""

_SCORE_MMA_BODY = """\
  // ---- lightning-indexer scores on the matrix units (spec §4.7) ----
  //   score[b, t, n] = sum_h w[b, t, h] * relu(q[b, t, h, :] . K[b, n, :])   n < visible[t]
  // q: bf16 queries as their uint32 view [B, T, H, D / 2] (pairs, low half first).
  // One threadgroup of NW warps (simdgroups) takes query (b, t) against TPT tiles of
  // NB = 16 NW entries, one tile after the other: the [H x NB] dot products of a tile are a
  // small matrix product, Q [H x D] times K^T [D x NB], computed in 16x16 tiles (warp w:
  // entries 16w .. 16w+16, all H / 16 head tiles) from shared tiles of KC dims at a time,
  // then stored (fp32) to shared memory, where the weighted ReLU sum over heads is taken.
  // The [H x NB] block is the only intermediate: no [heads x entries] buffer. With QRES
  // (all D dims of the queries fit beside a key tile) the queries are read into shared memory
  // once for the group's TPT tiles; otherwise each chunk of each tile reads its KC dims again.
  // Exact products need bf16-exact inputs (bf16 queries; FP4 or bf16 keys); the sums are
  // fp32 in another order than the ops path.
  // Memory latency, not work, bounds a group: a thread issues all
  // its loads of a kind (queries, a key tile, its head weights) before it uses any, and with
  // QRES the next tile's keys are requested before this tile's products, and the first
  // tile's together with the queries. A group then waits on memory about once a tile.
  // Grid: (ceil(N / (NB TPT)) * TPG, T, B) threads in threadgroups of (TPG, 1, 1), TPG = 32 NW.
  // Template: D, H (multiple of 16), NW, KC (multiple of 32 dividing D; D with QRES), SMEM4
  // (float4 words of the shared tile area), QRES, TPT (tiles a group), IDEC (0/1/2: how FP4
  // keys are decoded, fp32 products / integer operations / byte-permute tables; the same
  // bits every way), MMAPTX (0/1: CUDA's matrix products by
  // nvcuda::wmma or by ldmatrix + mma.sync; other dialects ignore it).
  static_assert(!QRES || KC == D, "resident queries: one chunk of all D dims");
  constexpr int NB = 16 * NW;
  constexpr int TPG = 32 * NW;
  constexpr int MT = H / 16;
  constexpr int LDQ = KC + 8;  // row strides: 16 bytes more than a row (bank spread)
  constexpr int LDK = KC + 8;
  constexpr int LDC = NB + 4;
  KI_SHARED KI_ALIGN32 float4 ki_smem[SMEM4];
  KI_SHARED float ki_part[TPG];
  KI_TG ki_mma_t* qs = (KI_TG ki_mma_t*)ki_smem;  // [H][LDQ]
  KI_TG ki_mma_t* kb = qs + H * LDQ;              // [NB][LDK]
  // [H][LDC] fp32 after the products: over the key tile (QRES) or over both tiles
  KI_TG float* cs = QRES ? (KI_TG float*)kb : (KI_TG float*)ki_smem;
@ROW@  const uint4 uint4_zero = KI_UINT4(0u, 0u, 0u, 0u);
  (void)uint4_zero;
  (void)IDEC;  // (read by the FP4 keys' decode only)
  (void)MMAPTX;  // (read by the CUDA dialect's ki_mma macros only)
  const int warp = ki_tid / 32;
  // the weighted ReLU sum: thread (entry c, head slice sl) takes heads sl, sl + 2, ...
  // (TPG = 2 NB); their weights are read once for all the group's tiles
  const int c = ki_tid % NB;
  const int sl = ki_tid / NB;
  float wr[H / 2];
  KI_UNROLL
  for (int j = 0; j < H / 2; ++j) wr[j] = w[bt * H + sl + 2 * j];
@KEY_DECL@  // queries: 16-byte pieces (8 bf16) of a chunk a thread
  constexpr int QL = (H * (KC / 8) + TPG - 1) / TPG;

  if (QRES) {
    // queries (b, t, 0..H, 0..D) -> qs once (the one chunk: KC = D), with the first tile's
    // keys in flight too; the barrier before the first products orders these writes
    const int kc = 0;
@Q_LOAD@    const int kn0 = ki_gx * TPT * NB;
    if (kn0 < N && kn0 < vis) {
@KEY_LOAD@    }
@Q_PUT@  }
  for (int tile = 0; tile < TPT; ++tile) {
    const int n0 = (ki_gx * TPT + tile) * NB;  // (every test below is uniform in the group)
    if (n0 >= N) break;
    if (n0 >= vis) {  // the whole tile lies past the visible prefix
      for (int i = ki_tid; i < NB; i += TPG) {
        if (n0 + i < N) out[n0 + i] = KI_NEG_INF;
      }
      continue;
    }
    ki_mma_acc acc[MT];  // stays in registers: every loop over m is unrolled
    KI_UNROLL
    for (int m = 0; m < MT; ++m) ki_mma_zero(acc[m]);
    KI_UNROLL
    for (int kc = 0; kc < D; kc += KC) {
      KI_BARRIER();  // the previous chunk's (or tile's) tiles, cs and ki_part are consumed
      if (!QRES) {
        // queries (b, t, 0..H, kc..kc+KC) and this chunk's keys, all requested, then stored
@Q_LOAD@        const int kn0 = n0;
@KEY_LOAD@@Q_PUT@      }
@KEY_PUT@      if (QRES) {
        // the next tile's keys (the only chunk: kc = 0) requested now, used after this tile
        const int kn0 = n0 + NB;
        if (tile + 1 < TPT && kn0 < N && kn0 < vis) {
@KEY_LOAD@        }
      }
      KI_BARRIER();
      KI_UNROLL
      for (int kk = 0; kk < KC; kk += 16) {
        KI_UNROLL
        for (int m = 0; m < MT; ++m) {
          ki_mma(acc[m], qs + 16 * m * LDQ + kk, LDQ, kb + 16 * warp * LDK + kk, LDK);
        }
      }
    }
    KI_BARRIER();  // every warp is done with the tiles: cs takes their place
    KI_UNROLL
    for (int m = 0; m < MT; ++m) ki_mma_store(cs + 16 * m * LDC + 16 * warp, LDC, acc[m]);
    KI_BARRIER();
    {
      float a = 0.0f;
      KI_UNROLL
      for (int j = 0; j < H / 2; ++j) {
        const float v = cs[(sl + 2 * j) * LDC + c];
        a += wr[j] * (v > 0.0f ? v : 0.0f);
      }
      ki_part[ki_tid] = a;
    }
    KI_BARRIER();
    if (ki_tid < NB) {
      const int n = n0 + ki_tid;
      if (n < N) out[n] = n < vis ? ki_part[ki_tid] + ki_part[NB + ki_tid] : KI_NEG_INF;
    }
  }
"""

# bytes of one ki_mma_t element per dialect (the shared tiles' element type)
MMA_ELEM_BYTES = {"metal": 4, "cuda": 2, "cpp": 4}
# static shared-memory budget a threadgroup (Metal: 32 KiB; CUDA: 48 KiB static)
MMA_SHARED_BYTES = {"metal": 32768, "cuda": 49152, "cpp": 49152}


@functools.lru_cache(maxsize=None)  # asked on every call of the dispatch point
def mma_layout(dialect: str, H: int, D: int, NW: int = 4) -> tuple[int, int, bool] | None:
    """(KC, SMEM4, QRES) for the matrix-unit scoring kernel, None if no layout fits the
    dialect's shared-memory budget. QRES (queries resident: read once for all of a group's
    tiles) where all D dims of the queries fit beside a key tile, the fp32 [H x NB] block
    over the key tile; otherwise the largest chunk of dims (a multiple of 32 dividing D)
    whose query and key tiles fit, the fp32 block over both."""
    nb = 16 * NW
    eb = MMA_ELEM_BYTES[dialect]
    budget = MMA_SHARED_BYTES[dialect] - 4 * 32 * NW  # less ki_part
    cblock = H * (nb + 4) * 4
    rup = lambda n: -(-n // 16) * 16  # noqa: E731
    resident = rup(H * (D + 8) * eb + max(nb * (D + 8) * eb, cblock))
    if resident <= budget:
        return D, resident // 16, True
    for kc in range(D, 0, -32):
        if D % kc:
            continue
        area = rup(max((H + nb) * (kc + 8) * eb, cblock))
        if area <= budget:
            return kc, area // 16, False
    return None


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def score_mma_source(dialect: str, key_mode: str, tick: bool = False,
                     allvis: bool = False) -> KernelSource:
    """Matrix-unit scoring kernel. Inputs: q bf16 [B,T,H,D] as uint32 [B,T,H,D/2], w [B,T,H]
    f32, keys (per `key_mode`: "fp4" or "bf16"), visible [T] int32; output scores [B,T,N]
    f32. Template: D, H, NW, KC, SMEM4, QRES (see `mma_layout`), TPT (tiles a group), IDEC
    (the FP4 keys' decode: fp32 products, or the same bits from integer operations, 1, or
    from byte-permute tables, 2), MMAPTX (CUDA:
    wmma, or ldmatrix + mma.sync)."""
    return make_source(dialect, f"dsv4_indexer_score_mma_{key_mode}" + _suffix(tick, allvis),
                       ("q", "w", *_KEY_INPUTS[key_mode], "visible"),
                       ("scores", "tick") if tick else ("scores",),
                       _mma_body(key_mode, _rows(tick, allvis)))


def _mma_body(key_mode: str, rows: str) -> str:
    """`_SCORE_MMA_BODY` for `key_mode` keys with the row set-up `rows` (`_rows`' text, or
    the one launch's), its key tile and query parts in place."""
    if key_mode not in _KEY_TILE:
        raise ValueError(f"no matrix-unit path for key mode {key_mode!r}; "
                         f"expected one of {MMA_KEY_MODES}")
    parts = _KEY_TILE[key_mode]
    body = (_SCORE_MMA_BODY.replace("@ROW@", rows).replace("@KEYS@", _KEY_INPUTS[key_mode][0])
            .replace("@KEY_DECL@", parts["decl"]).replace("@KEY_PUT@", parts["put"]))
    # the load part at its three places: the first tile's (with the queries), a chunk's
    # (without QRES), the next tile's (with QRES)
    assert body.count("@KEY_LOAD@") == 3
    return (body.replace("@KEY_LOAD@", textwrap.indent(parts["load"], "    "))
            .replace("@Q_LOAD@", _Q_LOAD).replace("@Q_PUT@", _Q_PUT))


# --------------------------------------------------------------------------------------------
# scoring and the top-k of decode rows in one launch (CUDA), spec §4.7

# The matrix-unit scorer's groups each add their entries' keys (top 12 bits) to the row's
# histogram in global memory and take a ticket; the row's last group to arrive then selects
# the K largest as the one-group top-k does from its first histogram on (`_TOPK_ROW_REST`),
# reading the row's scores through L2. One launch and one MLX primitive a call instead of two.
# `work` [B * T, NP + 4100] f32 (NP: N rounded up to 4) must be zeros when the launch starts
# (MLX's init_value, which fills every output: two fill kernels before this one on the GPU,
# but no primitive more on the host): a row's scores (0 .. N), its histogram (NP .. NP + 4096)
# and ticket (NP + 4096), both as uint32. With `scratch` (an input [>= B * T, 4100] uint32
# that is zeros when the launch starts): the histogram and ticket are there and the last
# group leaves them zeroed again; `work` [B * T, NP] is the scores alone and nothing is
# filled. A scratch must never serve two launches that may run at once (MLX orders launches
# only by data: the calls of one model layer, each fed by the one before, never overlap). Metal: written, never dispatched; before it is, its
# L2 reads (KI_LOAD_CG, a plain load there) and fences would need device-scope coherence.
_SELECT_EPILOGUE = """\
  // ---- the row's top-k: its histogram built by every group, selected by the last ----
  // (shared arrays at the kernel's scope: Metal takes threadgroup declarations only there;
  // `select_shared_bytes` counts them)
  KI_SHARED KI_ATOMIC_UINT ki_hist[256];
  KI_SHARED unsigned int ki_scan[16];
  KI_SHARED unsigned int ki_sel[3];
  KI_SHARED KI_ATOMIC_UINT ki_cnt[2];
  KI_SHARED float ki_wsum[32];
  {
    constexpr int TG = TPG;
    constexpr int HB = 4096;  // bins of the first digit, key bits 31-20
    constexpr int NBIG = HB > 2 * CAP ? HB : 2 * CAP;
    static_assert(4 * SMEM4 >= NBIG, "the shared tiles hold the histogram and the bin's keys");
    static_assert(HB % TG == 0, "a thread's bins");
    // the first histogram, then the bin's keys (0 .. CAP) and entries (CAP .. 2 CAP), over
    // the shared tiles (every warp is done with them at the barrier below)
    KI_TG KI_ATOMIC_UINT* ki_big = (KI_TG KI_ATOMIC_UINT*)ki_smem;
@ROWH@    const int ngroups = (N + NB * TPT - 1) / (NB * TPT);
    KI_BARRIER();
    for (int i = ki_tid; i < HB; i += TG) KI_ATOMIC_STORE(ki_big[i], 0u);
    KI_BARRIER();
    if (ki_tid < NB) {
      // this group's entries (the thread's own stores above: read back in program order)
      for (int tile = 0; tile < TPT; ++tile) {
        const int n = (ki_gx * TPT + tile) * NB + ki_tid;
        if (n < N && n < vis) KI_ATOMIC_ADD(ki_big[ki_order_key(out[n]) >> 20], 1u);
      }
    }
    KI_BARRIER();
    for (int i = ki_tid; i < HB; i += TG) {
      const unsigned int c = KI_ATOMIC_LOAD(ki_big[i]);
      if (c != 0u) KI_GLOBAL_ADD(rowh, i, c);
    }
    KI_DEVICE_FENCE();  // this thread's scores and adds, before the group's ticket
    KI_BARRIER();
    if (ki_tid == 0) ki_sel[0] = KI_TICKET(rowh, HB) == (unsigned int)(ngroups - 1) ? 1u : 0u;
    KI_BARRIER();
    if (ki_sel[0] == 0u) return;  // (uniform)
    KI_DEVICE_FENCE();
    const int64_t base = 0;  // (the row's scores: `out`)
    KI_DEVICE int32_t* oidx = idx + bt * K;
    for (int i = ki_tid; i < HB; i += TG) {
      KI_ATOMIC_STORE(ki_big[i], KI_LOAD_CG(rowh, i));
@CLEAR@    }
    if (vis <= K) {
      for (int i = ki_tid; i < K; i += TG) oidx[i] = i < vis ? i : -1;
      return;
    }
    if (ki_tid < 2) KI_ATOMIC_STORE(ki_cnt[ki_tid], 0u);
    KI_BARRIER();
@REST@  }
"""

# The last group's second read: float4 loads through L2 (U a thread in flight), lane j of a
# thread's 4 U values being entry i0 + (j / 4) 4 TG + j % 4 (the row's padding past vis is
# read but never taken: every use tests i < vis).
_SELECT_READ = """\
      for (int i0 = 4 * ki_tid; i0 < vis; i0 += 4 * TG * U) {
        float sv[4 * U];
        KI_UNROLL
        for (int j = 0; j < U; ++j) {
          const int i = i0 + 4 * TG * j;
          const float4 v4 = i < vis ? KI_LOAD_CG((const KI_DEVICE float4*)out, i / 4)
                                    : KI_FLOAT4(0.0f, 0.0f, 0.0f, 0.0f);
          sv[4 * j] = v4.x;
          sv[4 * j + 1] = v4.y;
          sv[4 * j + 2] = v4.z;
          sv[4 * j + 3] = v4.w;
        }
        KI_UNROLL
        for (int j = 0; j < 4 * U; ++j) {
          const int i = i0 + 4 * TG * (j / 4) + (j % 4);
"""


def select_shared_bytes(dialect: str, H: int, D: int, NW: int = 4) -> int | None:
    """Static shared memory of the one-launch scoring and top-k (`score_select_source`): the
    scorer's tiles (at least the 16 KB the select reuses), its partial sums and the select's
    own arrays; None where the scorer has no layout."""
    lay = mma_layout(dialect, H, D, NW)
    if lay is None:
        return None
    return max(16 * lay[1], 16384) + 4 * 32 * NW + 4 * (256 + 16 + 3 + 2 + 32)


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def score_select_source(dialect: str, key_mode: str, allvis: bool = False,
                        scratch: bool = False) -> KernelSource:
    """The matrix-unit scorer and the top-k of its rows in one launch (`_SELECT_EPILOGUE`;
    decode rows). Inputs as `score_mma_source`'s (with `scratch`: then scratch [>= B*T, 4100]
    uint32, zeros, left zeros); outputs idx [B,T,K] int32 (-1 where not visible), work
    [B*T, NP + 4100] f32 (zeros at the start: the scores, then the row's histogram and
    ticket; with `scratch`: [B*T, NP], the scores). Template: `score_mma_source`'s, then K, U
    (float4 loads a thread of the second read), CAP, WALK."""
    rows = _rows(False, allvis)
    old = "  KI_DEVICE float* out = scores + bt * N;\n"
    assert rows.count(old) == 1
    rows = rows.replace(old, "  KI_DEVICE float* out = work + bt * (((N + 3) & ~3)"
                        + (");\n" if scratch else " + 4100);\n"))
    body = _mma_body(key_mode, rows)
    rest = _row_rest(lambda i: f"KI_LOAD_CG(out, {i})", "  oidx[p] = i;\n",
                     "  oidx[p] = (int)KI_ATOMIC_LOAD(ki_big[CAP + i]);\n", _SELECT_READ)
    if scratch:  # the histogram and ticket in the scratch input, left zeroed for the next call
        rowh = ("    KI_DEVICE unsigned int* rowh = (KI_DEVICE unsigned int*)scratch"
                " + bt * (HB + 4);\n")
        clear = "      rowh[i] = 0u;\n      if (i == 0) rowh[HB] = 0u;\n"
    else:  # after the row's scores in `work`
        rowh = ("    const int NP = (N + 3) & ~3;\n"
                "    KI_DEVICE unsigned int* rowh = (KI_DEVICE unsigned int*)(out + NP);\n")
        clear = ""
    body += (_SELECT_EPILOGUE.replace("@ROWH@", rowh).replace("@CLEAR@", clear)
             .replace("@REST@", textwrap.indent(rest, "  ")))
    return make_source(dialect, f"dsv4_indexer_score_select_{key_mode}"
                       + _suffix(False, allvis) + ("_scr" if scratch else ""),
                       ("q", "w", *_KEY_INPUTS[key_mode], "visible")
                       + (("scratch",) if scratch else ()), ("idx", "work"), body)


# --------------------------------------------------------------------------------------------
# scoring with the keys decoded straight into the matrix units' registers (CUDA), spec §4.7

def _frag_rows(body: str, row: bool, indent: int) -> str:
    """`body` inside a thread's loops over its pass's rows: tile m < ME, row r < 2 (entries
    n0 + 16 m + g + 8 r), scale group j < GJ (group 4 j + t4 of the row); with `row`, the
    row's key offset `row` (rows past N read row 0, never written out) for loads."""
    head = ("KI_UNROLL\nfor (int m = 0; m < ME; ++m) {\n  KI_UNROLL\n"
            "  for (int r = 0; r < 2; ++r) {\n")
    if row:
        head += ("    const int n = n0 + 16 * m + g + 8 * r;\n"
                 "    const int64_t row = (int64_t)b * N + (n < N ? n : 0);\n")
    head += "    KI_UNROLL\n    for (int j = 0; j < GJ; ++j) {\n"
    return textwrap.indent(head + textwrap.indent(body, "      ") + "    }\n  }\n}\n",
                           " " * indent)


# A thread's share of a pass's key rows: for each of its scale groups the group's 32 values.
# "decl" (registers), "load" (global memory -> registers, for the pass starting at n0),
# "decode" (registers -> ap, the A fragments' bf16 pairs: ap[m][r][j][p] holds the group's
# values 2p and 2p + 1).
_FRAG_KEYS = {
    "fp4": {
        "decl": """\
  uint4 kx[ME][2][GJ];
  unsigned int kxs[ME][2][GJ];
""",
        "load": _frag_rows("""\
kx[m][r][j] = KI_LOAD4U(kq + row * (D / 8), 4 * j + t4);
kxs[m][r][j] = (unsigned int)ks[row * (D / 32) + 4 * j + t4];
""", True, 6),
        "decode": _frag_rows("""\
const unsigned int sb = kxs[m][r][j];
const unsigned int vw[4] = {kx[m][r][j].x, kx[m][r][j].y, kx[m][r][j].z, kx[m][r][j].w};
if (IDEC != 0 && sb >= 3u && sb <= 251u) {
  // IDEC 1 / 2 (`_KEY_TILE`'s FP4 decode): the bits of the fp32 path below
  const unsigned int lb0 = IDEC == 2 ? ki_e2m1_table(sb, 0u) : 0u;
  const unsigned int hb0 = IDEC == 2 ? ki_e2m1_table(sb, 1u) : 0u;
  const unsigned int lb1 = IDEC == 2 ? ki_e2m1_table(sb, 2u) : 0u;
  const unsigned int hb1 = IDEC == 2 ? ki_e2m1_table(sb, 3u) : 0u;
  KI_UNROLL
  for (int p = 0; p < 16; ++p)
    ap[m][r][j][p] = ki_e2m1x2_dec(IDEC, vw[p / 4], (unsigned int)(p % 4), sb, lb0, hb0,
                                   lb1, hb1);
} else {
  KI_UNROLL
  for (int p = 0; p < 16; ++p) ap[m][r][j][p] = ki_e2m1x2_f32(vw[p / 4], (unsigned int)(p % 4), sb);
}
""", False, 4),
    },
    "bf16": {
        "decl": """\
  uint4 kx[ME][2][GJ][4];
""",
        "load": _frag_rows("""\
KI_UNROLL
for (int e = 0; e < 4; ++e) kx[m][r][j][e] = KI_LOAD4U(k + row * (D / 2), 4 * (4 * j + t4) + e);
""", True, 6),
        "decode": _frag_rows("""\
KI_UNROLL
for (int e = 0; e < 4; ++e) {
  ap[m][r][j][4 * e + 0] = kx[m][r][j][e].x;
  ap[m][r][j][4 * e + 1] = kx[m][r][j][e].y;
  ap[m][r][j][4 * e + 2] = kx[m][r][j][e].z;
  ap[m][r][j][4 * e + 3] = kx[m][r][j][e].w;
}
""", False, 4),
    },
}
FRAG_KEY_MODES = tuple(_FRAG_KEYS)

_SCORE_FRAG_BODY = """\
  // ---- lightning-indexer scores, the keys decoded into mma.sync's registers (spec §4.7) ----
  //   score[b, t, n] = sum_h w[b, t, h] * relu(q[b, t, h, :] . K[b, n, :])   n < visible[t]
  // One warp takes 16 ME entries a pass (TPW passes) and computes their [16 x H] products
  // with mma.sync m16n8k16: the entries are the rows of A, the heads the columns of B (H / 8
  // tiles of 8), the D dims the reduction in steps of 16. A step's 16 k-slots are dims chosen
  // so that each thread's share is contiguous: at step (j, s) thread t4 of a quad holds, for
  // its two entry rows, dims 32 (4 j + t4) + 4 s + 0..3, i.e. four values of its own scale
  // group, decoded from one 16-byte load of the packed keys straight into A's registers (no
  // shared tile, no barrier after the queries). B's registers for the same slots are 8
  // contiguous bytes of a query row in shared memory (read once a group; with 2 words of
  // padding a 32-dim group, a warp's 64-bit reads (the compiler pairs b0 and b1: LDS.64) hit
  // all 32 banks once at D = 128; at D = 256 rows g and g + 2 share banks). The sum over k of
  // every product is the dot product whatever the slot order: the same scores as the tiled
  // kernel (products exact in fp32, sums in another order than the ops path). The
  // accumulators stay in
  // registers: each thread holds C(g, 2 t4 .. 2 t4 + 1) and C(g + 8, ..) of every head tile,
  // so the weighted ReLU sum over heads is a register sum and two shuffles in the quad. The
  // next pass's keys are requested before this pass's products. No [heads x entries] buffer.
  // CUDA (and the C++ emulation, whose ki_mma_16816 follows the PTX fragment layouts).
  // Grid: (ceil(N / (16 ME TPW NW)) * 32 NW, T, B) threads in threadgroups of (32 NW, 1, 1).
  // Template: D (a multiple of 128), H (a multiple of 8), NW (warps a group), TPW (passes a
  // warp), ME (16-entry tiles a pass, sharing B's reads), IDEC (FP4 decode: 0 fp32 products,
  // 1 integer operations, 2 byte-permute tables; the same bits every way).
  constexpr int GJ = D / 128;      // scale groups of 32 dims a thread of each key row
  constexpr int NT = H / 8;        // head tiles
  constexpr int GW = 18;           // words a 32-dim group of a shared query row (16 + 2 pad)
  constexpr int QW = (D / 32) * GW;
  constexpr int TPG = 32 * NW;
  KI_SHARED unsigned int qs[H * QW];
@ROW@  const int lane = ki_tid % 32;
  const int warp = ki_tid / 32;
  const int g = lane / 4;
  const int t4 = lane % 4;
  (void)IDEC;
  // the queries of (b, t): 16-byte pieces, piece p of a row = group p / 4, words 4 (p % 4) ..
  for (int i = ki_tid; i < H * (D / 8); i += TPG) {
    const int h = i / (D / 8);
    const int p = i % (D / 8);
    const uint4 v = KI_LOAD4U(q + (bt * H + h) * (D / 2), p);
    const int o = h * QW + (p / 4) * GW + 4 * (p % 4);
    qs[o] = v.x;
    qs[o + 1] = v.y;
    qs[o + 2] = v.z;
    qs[o + 3] = v.w;
  }
  // the weights of this thread's heads: 8 nt + 2 t4 and 8 nt + 2 t4 + 1
  float w0[NT], w1[NT];
  KI_UNROLL
  for (int nt = 0; nt < NT; ++nt) {
    w0[nt] = w[bt * H + 8 * nt + 2 * t4];
    w1[nt] = w[bt * H + 8 * nt + 2 * t4 + 1];
  }
@KEY_DECL@  const int tile0 = (ki_gx * NW + warp) * TPW * ME;  // this warp's first 16-entry tile
  {  // the first pass's keys, in flight with the queries
    const int n0 = 16 * tile0;
    if (n0 < N && n0 < vis) {
@KEY_LOAD@    }
  }
  KI_BARRIER();  // the queries are in shared memory (the only barrier)
  for (int pass = 0; pass < TPW; ++pass) {
    const int n0 = 16 * (tile0 + pass * ME);  // (every test below is uniform in the warp)
    if (n0 >= N) break;
    if (n0 >= vis) {  // the whole pass lies past the visible prefix
      for (int i = lane; i < 16 * ME; i += 32) {
        if (n0 + i < N) out[n0 + i] = KI_NEG_INF;
      }
      continue;
    }
    unsigned int ap[ME][2][GJ][16];
@KEY_DECODE@    {  // the next pass's keys, requested before this pass's products
      const int n0 = 16 * (tile0 + (pass + 1) * ME);
      if (pass + 1 < TPW && n0 < N && n0 < vis) {
@KEY_LOAD@      }
    }
    float acc[ME][NT][4];
    KI_UNROLL
    for (int m = 0; m < ME; ++m) {
      KI_UNROLL
      for (int nt = 0; nt < NT; ++nt) {
        acc[m][nt][0] = 0.0f; acc[m][nt][1] = 0.0f; acc[m][nt][2] = 0.0f; acc[m][nt][3] = 0.0f;
      }
    }
    KI_UNROLL
    for (int j = 0; j < GJ; ++j) {
      KI_UNROLL
      for (int s = 0; s < 8; ++s) {
        const int qo = (4 * j + t4) * GW + 2 * s;
        KI_UNROLL
        for (int nt = 0; nt < NT; ++nt) {
          const unsigned int b0 = qs[(8 * nt + g) * QW + qo];
          const unsigned int b1 = qs[(8 * nt + g) * QW + qo + 1];
          KI_UNROLL
          for (int m = 0; m < ME; ++m) {
            const unsigned int a[4] = {ap[m][0][j][2 * s], ap[m][1][j][2 * s],
                                       ap[m][0][j][2 * s + 1], ap[m][1][j][2 * s + 1]};
            ki_mma_16816(acc[m][nt], a, b0, b1);
          }
        }
      }
    }
    KI_UNROLL
    for (int m = 0; m < ME; ++m) {
      float r0 = 0.0f, r1 = 0.0f;  // entries n0 + 16 m + g and + 8: this thread's heads
      KI_UNROLL
      for (int nt = 0; nt < NT; ++nt) {
        const float c0 = acc[m][nt][0], c1 = acc[m][nt][1];
        const float c2 = acc[m][nt][2], c3 = acc[m][nt][3];
        r0 += w0[nt] * (c0 > 0.0f ? c0 : 0.0f) + w1[nt] * (c1 > 0.0f ? c1 : 0.0f);
        r1 += w0[nt] * (c2 > 0.0f ? c2 : 0.0f) + w1[nt] * (c3 > 0.0f ? c3 : 0.0f);
      }
      r0 += KI_SHFL(r0, lane ^ 1);  // the quad's four head shares
      r1 += KI_SHFL(r1, lane ^ 1);
      r0 += KI_SHFL(r0, lane ^ 2);
      r1 += KI_SHFL(r1, lane ^ 2);
      const int n = n0 + 16 * m + g;
      if (t4 == 0) {
        if (n < N) out[n] = n < vis ? r0 : KI_NEG_INF;
        if (n + 8 < N) out[n + 8] = n + 8 < vis ? r1 : KI_NEG_INF;
      }
    }
  }
"""


@functools.lru_cache(maxsize=None)  # rendered once: asked at every launch
def score_frag_source(dialect: str, key_mode: str, tick: bool = False,
                      allvis: bool = False) -> KernelSource:
    """Register-fragment scoring kernel (CUDA; the C++ emulation for tests): the inputs and
    outputs of `score_mma_source`. Template: D, H, NW, TPW, ME, IDEC (`_SCORE_FRAG_BODY`)."""
    if dialect == "metal":
        raise ValueError("the register-fragment scorer is written for CUDA's mma.sync only")
    if key_mode not in _FRAG_KEYS:
        raise ValueError(f"no register-fragment path for key mode {key_mode!r}; "
                         f"expected one of {FRAG_KEY_MODES}")
    keys = _KEY_INPUTS[key_mode]
    parts = _FRAG_KEYS[key_mode]
    body = (_SCORE_FRAG_BODY.replace("@ROW@", _rows(tick, allvis)).replace("@KEYS@", keys[0])
            .replace("@KEY_DECL@", parts["decl"]).replace("@KEY_DECODE@", parts["decode"]))
    assert body.count("@KEY_LOAD@") == 2
    body = body.replace("@KEY_LOAD@", parts["load"])
    return make_source(dialect, f"dsv4_indexer_score_frag_{key_mode}" + _suffix(tick, allvis),
                       ("q", "w", *keys, "visible"), ("scores", "tick") if tick else ("scores",),
                       body)


# --------------------------------------------------------------------------------------------
# full-source renderers (what MLX compiles), for the compile and emulation tests

# dtype name (mx.Dtype str without the "mlx.core." prefix) -> type spelled in each dialect
METAL_TYPES = {
    "float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t", "int32": "int32_t",
    "int64": "int64_t", "uint8": "uint8_t", "uint32": "uint32_t",
}
CUDA_TYPES = {
    "float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16", "int32": "int32_t",
    "int64": "int64_t", "uint8": "uint8_t", "uint32": "uint32_t",
}
CPP_TYPES = {"float32": "float", "int32": "int32_t", "uint8": "uint8_t", "uint32": "uint32_t",
             "bfloat16": "ki_bf16"}
_SIGNATURE_TYPES = {"metal": METAL_TYPES, "cuda": CUDA_TYPES, "cpp": CPP_TYPES}

_METAL_ATTRIBUTES = [  # mlx metal_kernel: (name, type), added when the body names them
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]


def _tmpl_value(v, types) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    return types[v]


def render_metal(ks: KernelSource, inputs, output_dtypes, template) -> str:
    """Full Metal source as mx.fast.metal_kernel builds it (less MLX's utils prelude).

    ``inputs``: [(dtype_name, ndim, size)] per input; ``template``: [(name, int|bool|dtype)].
    """
    name = "custom_kernel_" + ks.name
    out = [ks.header]
    if template:
        kinds = ["bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "typename"
                 for _, v in template]
        params = ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, template))
        out.append(f"template <{params}>\n")
    params = []
    idx = 0
    for n, (dt, ndim, size) in zip(ks.input_names, inputs):
        loc = "constant" if size < 8 else "device"
        ref = "&" if ndim == 0 else "*"
        params.append(f"  const {loc} {METAL_TYPES[dt]}{ref} {n} [[buffer({idx})]]")
        idx += 1
        if ndim > 0:
            if n + "_shape" in ks.source:
                params.append(f"  const constant int* {n}_shape [[buffer({idx})]]")
                idx += 1
            if n + "_strides" in ks.source:
                params.append(f"  const constant int64_t* {n}_strides [[buffer({idx})]]")
                idx += 1
            if n + "_ndim" in ks.source:
                params.append(f"  const constant int& {n}_ndim [[buffer({idx})]]")
                idx += 1
    for n, dt in zip(ks.output_names, output_dtypes):
        params.append(f"  device {METAL_TYPES[dt]}* {n} [[buffer({idx})]]")
        idx += 1
    for attr, ty in _METAL_ATTRIBUTES:
        if attr in ks.source:
            params.append(f"  {ty} {attr} [[{attr}]]")
    out.append(f"[[kernel]] void {name}(\n" + ",\n".join(params) + ") {\n")
    out.append(ks.source + "\n}\n")
    if template:
        targs = "<" + ", ".join(_tmpl_value(v, METAL_TYPES) for _, v in template) + ">"
        out.append(f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({name}{targs}) '
                   f"{name}{targs};\n")
    return "".join(out)


def render_cuda(ks: KernelSource, inputs, output_dtypes, template) -> str:
    """Full CUDA source as mx.fast.cuda_kernel builds it."""
    name = "custom_kernel_" + ks.name
    out = ['\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n',
           ks.header, "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n",
           f"__global__ void {name}(\n"]
    params = []
    for n, (dt, ndim, _size) in zip(ks.input_names, inputs):
        params.append(f"    const {CUDA_TYPES[dt]}* {n}")
        if ndim > 0:
            if n + "_shape" in ks.source:
                params.append(f"    const __grid_constant__ Shape {n}_shape")
            if n + "_strides" in ks.source:
                params.append(f"    const __grid_constant__ Strides {n}_strides")
            if n + "_ndim" in ks.source:
                params.append(f"    const __grid_constant__ int {n}_ndim")
    for n, dt in zip(ks.output_names, output_dtypes):
        params.append(f"    {CUDA_TYPES[dt]}* {n}")
    out.append(",\n".join(params) + ") {\n")
    for n, v in template:
        if isinstance(v, bool):
            out.append(f"  constexpr bool {n} = {_tmpl_value(v, CUDA_TYPES)};\n")
        elif isinstance(v, int):
            out.append(f"  constexpr int {n} = {v};\n")
        else:
            out.append(f"  using {n} = {CUDA_TYPES[v]};\n")
    out.append("\n" + ks.source + "\n}\n\n} // namespace mlx::core::cu\n")
    return "".join(out)


def render_cpp_kernel(ks: KernelSource, inputs, output_dtypes, template, fn_name: str) -> str:
    """The body as a plain C++ function for the CPU emulation (shapes as ``const int*``)."""
    params = []
    for n, (dt, ndim, _size) in zip(ks.input_names, inputs):
        params.append(f"const {CPP_TYPES[dt]}* {n}")
        if ndim > 0 and n + "_shape" in ks.source:
            params.append(f"const int* {n}_shape")
    for n, dt in zip(ks.output_names, output_dtypes):
        params.append(f"{CPP_TYPES[dt]}* {n}")
    consts = []
    for n, v in template:
        if isinstance(v, bool):
            consts.append(f"  constexpr bool {n} = {_tmpl_value(v, CPP_TYPES)};\n")
        elif isinstance(v, int):
            consts.append(f"  constexpr int {n} = {v};\n")
        else:
            consts.append(f"  using {n} = {CPP_TYPES[v]};\n")
    return (f"static void {fn_name}(" + ", ".join(params) + ") {\n" + "".join(consts) + "\n"
            + ks.source + "\n}\n")
