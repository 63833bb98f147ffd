"""Lightning-indexer scoring and top-k (spec §4.7): pure-ops path, GPU kernels, dispatch.

``score[t, w] = sum_h wI[t, h] * relu(qI[t, h] . KI[w])`` over visible entries
``w < visible[t]``; invisible entries score -inf; the top-k selection keeps
``k = min(topk, N)`` entries and marks any invisible pick as -1.

Keys come either as a float array [B, N, d] (fp32/bf16/fp16) or, for the FP4 indexer cache
(spec §4.13 item 3), as MLX ``mxfp4`` arrays ``(packed uint32 [B, N, d/8], scales uint8
[B, N, d/32])``: element j of a row in byte j//2 (low nibble = even j), value
``e2m1(code) * 2^(scale - 127)``.

`indexer_topk` is the dispatch point (see `dispatch.py` for ``DSV4_INDEXER_KERNEL``):

* ``ops``: `indexer_topk_ops`, plain MLX ops (the CPU path; also the reference);
* ``metal`` / ``cuda``: `indexer_topk_kernel`, one fused scoring kernel (no [heads x
  entries] intermediate; `indexer_source.py` holds its body) writing scores [B, T, N] fp32,
  then a radix-select top-k kernel. Both run from one source text on Metal and CUDA.
"""

from __future__ import annotations

import functools
import os
import re

import mlx.core as mx

from . import dispatch
from . import indexer_source as src

# --------------------------------------------------------------------------------------------
# pure-ops path


def _is_fp4(keys) -> bool:
    return isinstance(keys, (tuple, list))


def dequantize_keys(keys) -> mx.array:
    """Keys as float32 [B, N, d] (mxfp4 pairs are dequantized, exactly)."""
    if _is_fp4(keys):
        packed, scales = keys
        return mx.dequantize(packed, scales, group_size=32, bits=4, mode="mxfp4",
                             dtype=mx.float32)
    return keys.astype(mx.float32)


def _num_entries(keys) -> int:
    return (keys[0] if _is_fp4(keys) else keys).shape[1]


def indexer_scores_ops(q: mx.array, w: mx.array, keys) -> mx.array:
    """q [B, T, H, d], w [B, T, H] (already scaled), keys [B, N, d] or an mxfp4 pair
    -> scores [B, T, N] fp32 (no visibility mask)."""
    q = q.astype(mx.float32)
    keys = dequantize_keys(keys)
    s = q @ keys[:, None].swapaxes(-1, -2)  # [B, T, H, N]
    s = mx.maximum(s, 0.0) * w.astype(mx.float32)[..., None]
    return s.sum(axis=2)


def indexer_topk_ops(q: mx.array, w: mx.array, keys, visible: mx.array, topk: int) -> mx.array:
    """Top-k entry indices per query, [B, T, k] int32, -1 where the pick is not visible.

    `visible` [T] (int32): the number of entries query t may see; None: all N (a decode
    token sees every entry: the kernels then never read a count).
    """
    N = _num_entries(keys)
    k = min(topk, N)
    idx_range = mx.arange(N)
    if k == N:
        # every entry is selected; only visibility matters
        idx = mx.broadcast_to(idx_range.astype(mx.int32), (q.shape[0], q.shape[1], N))
    else:
        scores = indexer_scores_ops(q, w, keys)
        if visible is not None:
            invisible = idx_range[None, :] >= visible[:, None]  # [T, N]
            scores = mx.where(invisible[None], -mx.inf, scores)
        idx = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k].astype(mx.int32)
    return idx if visible is None else mx.where(idx >= visible[None, :, None], -1, idx)


# --------------------------------------------------------------------------------------------
# kernel path

_SHARED_BYTES = 32768  # Metal's threadgroup-memory limit; CUDA's static limit is 48 KiB
_kernel = dispatch.build_kernel  # a module name of its own: tests replace it to simulate failures


def _key_inputs(keys):
    """(key_mode, [kernel inputs], N, d) for a float array or an mxfp4 pair."""
    if _is_fp4(keys):
        packed, scales = keys
        if packed.dtype != mx.uint32 or scales.dtype != mx.uint8:
            raise TypeError(f"mxfp4 keys must be (uint32, uint8), got "
                            f"({packed.dtype}, {scales.dtype})")
        B, N, d8 = packed.shape
        if scales.shape != (B, N, d8 // 4):
            raise ValueError(f"mxfp4 keys {packed.shape} / scales {scales.shape} do not match")
        return "fp4", [packed, scales], N, d8 * 8
    B, N, d = keys.shape
    if keys.dtype == mx.bfloat16:
        return "bf16", [keys.view(mx.uint32)], N, d
    return "f32", [_f32(keys)], N, d


@functools.lru_cache(maxsize=256)
def score_launch(B: int, T: int, N: int, H: int, D: int) -> tuple[int, int, int]:
    """(BN threads a group, HC heads a shared-memory chunk, E entries a thread)."""
    bn = 128
    hc = max(1, min(H, _SHARED_BYTES // (4 * D)))
    # enough threadgroups to fill a large GPU (~1000), then more entries a thread so that
    # fewer groups re-read the queries
    rows = B * T
    blocks = -(-N // bn)
    e = 1
    while e < 8 and -(-blocks // (2 * e)) * rows >= 1024:
        e *= 2
    return bn, hc, e


@functools.lru_cache(maxsize=256)
def topk_launch(B: int, T: int, N: int, k: int) -> tuple[int, int, int]:
    """(TG threads a group, U loads in flight a thread, S slices a row) of the top-k kernel.

    Many rows (prefill): a group of 256 a row. Few rows (decode): one group of 1024 a row,
    and from 32K entries on each row in S <= 16 slices of >= 4096 entries selected apart
    by groups of 512, then the S * k candidates by one group of 1024. H100, GPU time of
    one row (Nsight Compute, `bench/indexer.py --profile-parts`), S = 1 vs the S chosen:
    34.5 vs 27.8 us at 32K (S = 8), 59.4 vs 34.0 us at 64K, 202.5 vs 56.2 us at 256K
    (S = 16); at 16K S = 1 is best (23.2 us)."""
    rows = B * T
    if rows >= 132:
        return 256, 4, 1
    s = 1
    if N >= 32768:
        while s < 16 and N // (2 * s) >= max(4096, 4 * k) and rows * 2 * s <= 528:
            s *= 2
    return (512 if s > 1 else 1024), 4, s


@functools.lru_cache(maxsize=256)
def topk_regs(M: int, tg: int, s: int) -> int:
    """R of the top-k kernel: score keys a thread held in registers (a power of two) so that
    a slice of ceil(M / S) entries is read once instead of once a radix pass; 0 (no
    registers) past 16 a thread."""
    need = -(-(-(-M // s)) // tg)
    r = 1
    while r < need:
        r *= 2
    return r if r <= 16 else 0


def kernel_supported(q, keys) -> bool:
    """Shapes the kernels take: d a multiple of 32 (<= 256), keys batch == query batch."""
    try:
        _, _, N, d = _key_inputs(keys)
    except (TypeError, ValueError):
        return False
    kb = (keys[0] if _is_fp4(keys) else keys).shape[0]
    return (q.ndim == 4 and q.shape[3] == d and d % 32 == 0 and d <= 256
            and kb == q.shape[0] and N > 0)


def _q_ready(q):
    return q if q.dtype in (mx.float32, mx.bfloat16, mx.float16) else q.astype(mx.float32)


MMA_WARPS = 4  # warps (simdgroups) a threadgroup of the matrix-unit kernel: 64 entries


def mma_usable(backend: str, q, key_mode: str) -> bool:
    """Whether the matrix-unit scoring kernel takes these inputs: bf16 queries (their
    products with FP4 or bf16 keys are exact in the fp32 accumulator), H a multiple of 16,
    and shared tiles that fit."""
    return _mma_usable(backend, q.dtype, q.shape[2], q.shape[3], key_mode)


def _mma_usable(backend: str, qdtype, H: int, D: int, key_mode: str) -> bool:
    """`mma_usable` from the query's dtype and head shape."""
    return (qdtype == mx.bfloat16 and key_mode in src.MMA_KEY_MODES and H % 16 == 0
            and D % 32 == 0 and src.mma_layout(backend, H, D, MMA_WARPS) is not None)


@functools.lru_cache(maxsize=256)
def mma_tiles(rows: int, N: int, qres: bool) -> int:
    """Tiles of 16 NW entries a threadgroup of the matrix-unit kernel (TPT): with resident
    queries, as many (a power of two, <= 16) as still leave >= 512 groups (~4 an SM of a
    large GPU); each tile then reads only its keys. Without, 1 (a tile reads the queries
    anyway)."""
    tiles = -(-N // (16 * MMA_WARPS))
    tpt = 1
    while qres and tpt < 16 and -(-tiles // (2 * tpt)) * rows >= 512:
        tpt *= 2
    return tpt



def frag_usable(backend: str, qdtype, H: int, D: int, key_mode: str) -> bool:
    """Whether the register-fragment scorer (`indexer_source.score_frag_source`) takes these
    inputs: CUDA, bf16 queries, FP4 or bf16 keys, H a multiple of 8, D a multiple of 128
    (<= 256: a thread's registers hold D / 128 scale groups of two key rows), and the padded
    queries (H x D x 2.25 bytes) within CUDA's 48 KiB of static shared memory (H x D <=
    16,384: 64 x 256 or 128 x 128 at most)."""
    return (backend == "cuda" and qdtype == mx.bfloat16 and key_mode in src.FRAG_KEY_MODES
            and H % 8 == 0 and H >= 8 and D % 128 == 0 and D <= 256 and H * D <= 16384)


@functools.lru_cache(maxsize=256)
def frag_launch(rows: int, N: int) -> tuple[int, int, int]:
    """(NW warps a group, TPW passes a warp, ME 16-entry tiles a pass) of the
    register-fragment scorer: groups of 4 warps, a pass of one tile, and as many passes (a
    power of two, <= 16) as still leave >= 512 groups (each group reads the queries once)."""
    nw, me = 4, 1
    tiles = -(-N // 16)
    tpw = 1
    while tpw < 16 and -(-tiles // (2 * tpw * nw * me)) * rows >= 512:
        tpw *= 2
    return nw, tpw, me

# How the matrix-unit scorer decodes FP4 keys into its bf16 tile: 0, each value as the fp32
# product e2m1 x scale rounded to bf16; 1, the same bits built with integer operations where
# the scale byte allows (3..251; ~20% fewer instructions for the decode, emulation-tested
# bit for bit). Its GPU tests passed (2026-12-07, sixth session) but the timings are mixed:
# with MMA_PTX 1, 64K 35.2 / 35.0 / 32.5 us vs 33.8 / 30.5 / 31.4 without, 256K 65.5 / 64.9
# vs 72.6 / 71.9 (`bench/indexer.py --profile-parts --defaults-only`): left at 0.
# 2, the same bits again from two byte-permute tables a scale group (three permutes a pair of
# codes, one more for their signs: ~3.4 instructions a value against ~14 / ~17), emulation-
# tested bit for bit. The default on CUDA since 2026-12-07 (sixth session, H100): its GPU
# tests gave bit-identical scores and the 64K scorer took 25.8 us against 35.7 (IDEC 0) and
# 30.7 (IDEC 1) in the same run. Metal has no byte-permute instruction (the dialect builds it
# from shifts): 0 there until measured on a Mac.
MMA_INT_DECODE = 2
MMA_INT_DECODE_METAL = 0
# How the CUDA dialect does the scorer's matrix products: 0, nvcuda::wmma (its fragment
# loads from shared memory compile to generic-address loads, ~47% of the scorer's waiting
# under Nsight Compute was on such L1TEX loads); 1, ldmatrix + mma.sync in PTX. Other dialects
# ignore it. 1 since 2026-12-07 (sixth session, H100): its GPU tests passed and the 64K
# scorer's GPU time fell in every one of four Nsight Compute runs (33.8 / 30.5 / 31.4 / 34.0
# us vs 42.5 / 34.4 / 35.8 / 36.1 with wmma); 256K even (72.6 / 71.9 vs 69.0 / 72.5).
MMA_PTX = 1

# Which scorer CUDA runs where both apply (`frag_usable`): 0, the tiled matrix-unit kernel
# (`score_mma_source`: keys decoded into shared tiles, four barriers a tile); 1, the
# register-fragment kernel (`score_frag_source`: keys decoded straight into mma.sync's A
# registers, the products' accumulators summed over heads in registers; one barrier a
# group). Opt-in ("frag" in DSV4_INDEXER_VARIANTS). On an H100 (2026-12-07, ninth session) its
# GPU tests passed; at 64K entries, one query, reading the count it took 26.8 / 28.0 / 27.7 us
# of GPU time against the tiled kernel's 24.1 / 27.9 / 32.1 (three runs) and its wall time
# was worse in two of them; with every entry visible (decode's path now) it was faster in the
# one run that measured it (13.8 vs 15.1 us) but not in wall time (0.075 vs 0.076 ms a call,
# 16 an evaluation). Left at 0 until decode-row runs decide it in wall time.
FRAG_SCORER = 0

# The top-k of few long rows (S > 1 slices: decode) in one launch instead of two: the row's
# last slice group to finish selects among the S * K candidates itself, from the largest
# slice bound on (`indexer_source._TOPK_MERGE`); the scoring launch zeroes the row counters
# it counts on. CUDA only: Metal keeps the two launches (its merge is written but not
# validated without a Mac, and a decode row's counter would sit in Metal's constant address
# space). 0: the two launches everywhere. Left at 0: on an H100 (2026-12-07, eighth session)
# its GPU tests passed (`test_gpu_sliced_topk`, the merge streaming its candidates), but the
# scoring + top-k of one 64K-entry row took 80.1 us of GPU time fused against 60.7 us in
# three launches (Nsight Compute), and the wall time of a call moved within the host's noise
# (0.059-0.088 ms against 0.071-0.087 with 16 calls an evaluation, four runs interleaved).
TOPK_FUSE = 0

# The top-k of a decode row (fewer than 132 rows, as `topk_launch` tells them) of ROW_MIN ..
# ROW_MAX entries by one group of `topk_row_launch` (`indexer_source.topk_row_source`): the
# row read twice (a 4096-bin histogram of the keys' top 12 bits, then the picks above the
# K-th key's bin and that bin's keys copied to shared memory) instead of S slices and their
# merge: one launch instead of two. 0: `topk_launch`'s slices everywhere. 1 on CUDA since
# 2026-12-07 (tenth session): its GPU tests passed (H100); GPU time of the top-k (Nsight
# Compute at boost clocks, warm caches) 18.4 vs 19.5 us at 64K entries (H200), 30.9 vs 25.9 at
# 128K (H100), 51.2 vs 36.0 at 256K (H200): one SM streams the row, so past 128K the slices
# are kept. Wall time of the whole call at 64K (H100, three rounds, ops path in the same
# runs): alone 0.160 vs 0.174 ms (3.03x the ops path vs 2.79x), 16 calls chained an
# evaluation 0.115 vs 0.133 ms a call. Metal keeps the slices (not measured on a Mac).
TOPK_ROW = 1
TOPK_ROW_METAL = 0
ROW_MIN, ROW_MAX = 32768, 131072

# Scoring and the top-k of a decode row in one launch (`indexer_source.score_select_source`):
# the matrix-unit scorer's groups each add their entries' top 12 key bits to the row's
# histogram in global memory and take a ticket; the last group to arrive selects the K
# largest from that histogram on, as the one-group top-k does (float4 reads through L2). One
# launch and one MLX primitive a call instead of two, for the rows `TOPK_ROW`'s range takes
# (decode rows of ROW_MIN .. ROW_MAX entries) where the tiled matrix-unit scorer runs.
# 0: the scorer and the top-k apart. Opt-in ("one" in DSV4_INDEXER_VARIANTS): on an H100
# (2026-12-07, eleventh session) its GPU tests passed (picks exactly the top k of the
# scorer's own scores, 65,536-140,000 entries) but it measured slower: 66.9 us of GPU time
# at 64K entries (59.2 with `SELECT_SCRATCH`) against 30.8 for the scorer + one-group top-k
# (Nsight Compute, boost clocks): the last group has the scorer's 128 threads, where the
# one-group top-k has 1,024, and its tail on one SM outweighs the launch saved; wall time
# 0.232 vs 0.208 ms alone, 0.155 vs 0.129 ms a call chained. Metal: written, never
# dispatched (no Mac to validate it).
SCORE_SELECT = 0
SCORE_SELECT_METAL = 0
# Where the one launch keeps a row's histogram and ticket: 0, after its scores in an output
# that MLX zeroes (`init_value`: two fill kernels on the GPU before the launch, the fill's
# value read from host-resident managed memory by every block); 1, in a scratch input the
# caller owns (`select_scratch`: one a model layer), zeroed once and left zeroed by the
# row's last group: no fill. Opt-in ("scratch" in DSV4_INDEXER_VARIANTS): the two fills
# took 7.7 us of the one launch's GPU time at 64K (66.9 -> 59.2 us, H100), GPU tests passed.
SELECT_SCRATCH = 0

# Variants by name, for measuring them without editing this module: a comma (or "+") list of
# "f32dec", "idec", "prmt" (the scorer's FP4 decode: MMA_INT_DECODE 0, 1, 2, whatever the
# backend's default), "wmma", "mmaptx" (MMA_PTX 0, 1), "walk" (TOPK_WALK 1), "nofuse",
# "fuse" (TOPK_FUSE 0, 1), "tiles", "frag" (FRAG_SCORER 0, 1), "norow", "row" (TOPK_ROW 0,
# 1), "noone", "one" (SCORE_SELECT 0, 1), "noscratch", "scratch" (SELECT_SCRATCH 0, 1); read at
# each call.
VARIANTS_ENV = "DSV4_INDEXER_VARIANTS"
VARIANT_NAMES = ("f32dec", "idec", "prmt", "wmma", "mmaptx", "walk", "nofuse", "fuse",
                 "tiles", "frag", "norow", "row", "noone", "one", "noscratch", "scratch")
# name -> (the launch choice it sets, the value); where two named set one choice, the earlier
# in this table wins
_VARIANT_CHOICES = {"prmt": ("idec", 2), "idec": ("idec", 1), "f32dec": ("idec", 0),
                    "wmma": ("mmaptx", 0), "mmaptx": ("mmaptx", 1), "walk": ("walk", 1),
                    "nofuse": ("fuse", 0), "fuse": ("fuse", 1), "tiles": ("frag", 0),
                    "frag": ("frag", 1), "norow": ("row", 0), "row": ("row", 1),
                    "noone": ("one", 0), "one": ("one", 1), "noscratch": ("scr", 0),
                    "scratch": ("scr", 1)}
_variants: dict = {}  # raw value -> (names, {choice: value})


def _parsed() -> tuple:
    """(names, {choice: value}) of `VARIANTS_ENV` (validated; remembered per value)."""
    raw = os.environ.get(VARIANTS_ENV, "")
    got = _variants.get(raw)
    if got is None:
        names = frozenset(v.strip().lower() for v in re.split(r"[,+]", raw) if v.strip())
        bad = sorted(names - set(VARIANT_NAMES))
        if bad:
            raise ValueError(f"{VARIANTS_ENV}={raw!r}: unknown {', '.join(bad)}; expected a "
                             f"comma list of {', '.join(VARIANT_NAMES)}")
        chosen: dict = {}
        for name, (choice, value) in _VARIANT_CHOICES.items():
            if name in names:
                chosen.setdefault(choice, value)
        got = _variants[raw] = (names, chosen)
    return got


def variants() -> frozenset:
    """The variant names `VARIANTS_ENV` turns on."""
    return _parsed()[0]


def _flag(name: str, value, default: int) -> int:
    """An explicit 0/1 `value`, else what `VARIANTS_ENV` names for the choice `name`, else
    `default`."""
    if value is not None:
        return int(bool(value))
    return _parsed()[1].get(name, default)


def _idec(value, backend: str = "cuda") -> int:
    """The FP4 decode of the matrix-unit scorer: an explicit 0/1/2 `value`, else what
    `VARIANTS_ENV` names ("prmt" 2, "idec" 1, "f32dec" 0), else the backend's default
    (`MMA_INT_DECODE`; Metal: `MMA_INT_DECODE_METAL`)."""
    if value is not None:
        if int(value) not in (0, 1, 2):
            raise ValueError(f"idec must be 0, 1 or 2, got {value!r}")
        return int(value)
    return _parsed()[1].get("idec", MMA_INT_DECODE_METAL if backend == "metal"
                            else MMA_INT_DECODE)


def _fuse(value, backend: str) -> int:
    """The fused top-k (S > 1)? An explicit 0/1 `value`, else what `VARIANTS_ENV` names, else
    `TOPK_FUSE`; never on Metal (see `TOPK_FUSE`)."""
    if backend == "metal":
        return 0
    return _flag("fuse", value, TOPK_FUSE)


def _fused(S: int, value, backend: str) -> bool:
    """Whether a top-k of S slices runs fused (`_fuse`; one slice has nothing to merge)."""
    return S > 1 and bool(_fuse(value, backend))


def _row(B: int, T: int, N: int, k: int, value, backend: str = "cuda") -> bool:
    """Whether the top-k of these rows runs one group a row (`topk_row_source`): an explicit
    `value` 1 for any rows of more than k entries (< 2^24: the kernel's counts add in fp32);
    else decode rows (fewer than 132) of ROW_MIN .. ROW_MAX entries where `VARIANTS_ENV`
    names "row", or (neither "row" nor "norow" named) `TOPK_ROW` (Metal: `TOPK_ROW_METAL`)."""
    if not k < N < 1 << 24:
        return False
    if value is not None:
        return bool(value)
    return (B * T < 132 and ROW_MIN <= N <= ROW_MAX
            and bool(_flag("row", None, TOPK_ROW_METAL if backend == "metal" else TOPK_ROW)))


@functools.lru_cache(maxsize=None)
def select_usable(backend: str, qdtype, H: int, D: int, key_mode: str) -> bool:
    """Whether the one-launch scoring and top-k takes these inputs: the tiled matrix-unit
    scorer's (`_mma_usable`), with the select's arrays within the dialect's static shared
    memory (`indexer_source.select_shared_bytes`)."""
    if not _mma_usable(backend, qdtype, H, D, key_mode):
        return False
    return src.select_shared_bytes(backend, H, D, MMA_WARPS) <= src.MMA_SHARED_BYTES[backend]


def _one(B: int, T: int, N: int, k: int, value, backend: str, frag: int) -> bool:
    """Whether scoring and top-k run as one launch (`score_select_source`; the caller checks
    that the tiled matrix-unit scorer takes the inputs): an explicit `value` 1 for any rows of
    more than k entries (< 2^24); else, without the register-fragment scorer (`frag`), the
    rows `_row`'s range takes where `VARIANTS_ENV` names "one", or (neither "one" nor "noone"
    named) `SCORE_SELECT` (Metal: `SCORE_SELECT_METAL`)."""
    if not k < N < 1 << 24:
        return False
    if value is not None:
        return bool(value)
    return (not frag and B * T < 132 and ROW_MIN <= N <= ROW_MAX and bool(
        _flag("one", None, SCORE_SELECT_METAL if backend == "metal" else SCORE_SELECT)))


@functools.lru_cache(maxsize=256)
def select_launch(B: int, T: int, N: int, k: int) -> tuple[int, int]:
    """(U float4 loads in flight a thread of the last group's read of the row, CAP keys of
    the K-th key's bin held in shared memory) of the one-launch scoring and top-k. U 8: the
    last group has the scorer's 128 threads, so each keeps 8 x 16 bytes in flight (16 KB the
    group) where the one-group top-k's 1,024 threads keep 8 x 4; NVRTC gives the kernel 124
    registers at U 4 and 8, 121 at 16 (the scorer's count bounds it). H100, 64K entries:
    70.1 / 66.9 / 71.8 us at U 4 / 8 / 16 (with the fills)."""
    return 8, 2048


SCRATCH_WORDS = 4100  # a row's histogram (4096) and ticket, in a scratch row


def select_scratch(rows: int, owner: dict | None = None):
    """A zeroed scratch [rows, SCRATCH_WORDS] uint32 for the one launch (`SELECT_SCRATCH`),
    kept in `owner` (a dict the caller keeps: one a model layer, whose calls never overlap on
    the GPU), or None where `VARIANTS_ENV` / `SELECT_SCRATCH` leave it off."""
    if owner is None or not _flag("scr", None, SELECT_SCRATCH):
        return None
    got = owner.get(rows)
    if got is None:
        got = owner[rows] = mx.zeros((rows, SCRATCH_WORDS), mx.uint32)
    return got


def _select_spec(B, T, N, k, score_template, u, cap, walk=None, scratch=False):
    """(template, output shapes, output dtypes) of the one-launch scoring and top-k: the
    scorer's template (its shared tiles at least the 16 KB the select reuses), then K, U, CAP,
    WALK; outputs idx [B, T, k] int32 and the zeroed work rows [B * T, NP + 4100] f32 (with
    `scratch`: [B * T, NP], not zeroed)."""
    walk = _flag("walk", walk, TOPK_WALK)
    if not (1 <= cap <= 2048 and u >= 1):
        raise ValueError(f"the one-launch top-k takes CAP of 1-2048 (its shared keys within "
                         f"the scorer's tiles) and U >= 1, got CAP {cap}, U {u}")
    template = [(n, max(v, 1024) if n == "SMEM4" else v) for n, v in score_template]
    np4 = -(-N // 4) * 4
    return (template + [("K", k), ("U", u), ("CAP", cap), ("WALK", walk)],
            [(B, T, k), (B * T, np4 + (0 if scratch else SCRATCH_WORDS))], [mx.int32, mx.float32])


def _row_asked(row, *slice_args):
    """`row` as a call gives it, None turned to 0 where the call names any of the slices' own
    parameters (their count, registers, merge, counters): it asked for the slices."""
    return 0 if row is None and any(a is not None for a in slice_args) else row


@functools.lru_cache(maxsize=256)
def topk_row_launch(B: int, T: int, N: int, k: int) -> tuple[int, int, int, int]:
    """(TG threads a group, U loads in flight a thread, CAP keys of the K-th key's bin held in
    shared memory, HA: the first histogram's adds warp-aggregated) of the one-group top-k.
    HA 0: on an H100 (Nsight Compute, one 64K-entry row) the first histogram's adds took the
    kernel from 27.4 us plain to 78.2 us through `__match_any_sync` (4096 bins: a warp's keys
    rarely share one), 79.5 vs 276.0 us at 256K."""
    return 1024, 8, 2048, 0


def _row_spec(B, T, k, tg, u, cap, ha, walk=None):
    """`_topk_spec` of the one-group top-k: outputs idx, val [B, T, K]."""
    walk = _flag("walk", walk, TOPK_WALK)
    if not (32 <= tg <= 1024 and tg % 32 == 0 and 4096 % tg == 0 and 1 <= cap <= 2048):
        raise ValueError(f"the one-group top-k takes TG of 32-1024 dividing 4096 (its warps' "
                         f"sums: 32 at most) and CAP of 1-2048 (16 KB of shared keys, within "
                         f"Metal's 32 KB), got TG {tg}, CAP {cap}")
    return ([("K", k), ("TG", tg), ("U", u), ("CAP", cap), ("HA", ha), ("WALK", walk)],
            (tg, T, B), (tg, 1, 1), [(B, T, k)] * 2, [mx.int32, mx.float32])


@functools.lru_cache(maxsize=256)  # one per shape: N changes every `ratio` tokens
def _score_plan(backend: str, qdtype, B: int, T: int, H: int, D: int, N: int, key_mode: str,
                bn, hc, e, mma, tpt, idec: int, mmaptx: int, tick: bool = False,
                frag: int = 0, fl=None, allvis: bool = False):
    """(matrix units?, kernel source, template, grid, threadgroup) of one scoring launch
    (`idec`, `mmaptx`, `frag`: resolved by `_idec` and `_flag`, outside this cache; `tick`:
    the source with the fused top-k's zeroed row counters as a second output; `fl`: the
    register-fragment scorer's (NW, TPW, ME), default `frag_launch`; `allvis`: the sources
    that take every entry as visible)."""
    if frag and mma is not False and frag_usable(backend, qdtype, H, D, key_mode):
        NW, TPW, ME = fl or frag_launch(B * T, N)
        ngroups = -(-N // (16 * ME * TPW * NW))
        return (True, src.score_frag_source(backend, key_mode, tick, allvis),
                [("D", D), ("H", H), ("NW", NW), ("TPW", TPW), ("ME", ME), ("IDEC", idec)],
                (ngroups * 32 * NW, T, B), (32 * NW, 1, 1))
    usable = _mma_usable(backend, qdtype, H, D, key_mode)
    if usable if mma is None else mma:
        if not usable:
            raise ValueError(f"the matrix-unit kernel does not take q {qdtype} {(B, T, H, D)} "
                             f"with {key_mode} keys")
        kc, smem4, qres = src.mma_layout(backend, H, D, MMA_WARPS)
        tpt = tpt or mma_tiles(B * T, N, qres)
        tpg = 32 * MMA_WARPS
        ngroups = -(-N // (16 * MMA_WARPS * tpt))
        return (True, src.score_mma_source(backend, key_mode, tick, allvis),
                [("D", D), ("H", H), ("NW", MMA_WARPS), ("KC", kc), ("SMEM4", smem4),
                 ("QRES", qres), ("TPT", tpt),
                 ("IDEC", idec), ("MMAPTX", mmaptx)],
                (ngroups * tpg, T, B), (tpg, 1, 1))
    BN, HC, E = score_launch(B, T, N, H, D)
    BN, HC, E = bn or BN, hc or HC, e or E
    nblk = -(-N // (BN * E))
    return (False, src.score_source(backend, key_mode, tick, allvis),
            [("QT", qdtype), ("D", D), ("H", H), ("HC", HC), ("BN", BN), ("E", E)],
            (nblk * BN, T, B), (BN, 1, 1))


def indexer_scores_kernel(q, w, keys, visible, *, backend: str, bn=None, hc=None, e=None,
                          mma=None, tpt=None, idec=None, mmaptx=None, tick: bool = False,
                          frag=None, fl=None):
    """Scores [B, T, N] fp32 from the fused kernel, -inf at invisible entries (``visible``
    None: every entry visible, no count read; with `tick`:
    (scores, zeroed row counters [B * T] uint32) for the fused top-k).

    ``mma``: None picks the matrix-unit kernel where `mma_usable`, else the fp32 one;
    True / False force one (True raises where it does not apply). ``tpt``: tiles a group of
    the matrix-unit kernel (default `mma_tiles`); ``idec``: its FP4 decode (0, 1 or 2;
    default `MMA_INT_DECODE`); ``mmaptx``: its CUDA matrix products (default `MMA_PTX`).
    ``frag``: the register-fragment scorer where `frag_usable` (0/1; default `FRAG_SCORER`),
    ``fl``: its (NW, TPW, ME) (default `frag_launch`)."""
    q = _q_ready(q)
    B, T, H, D = q.shape
    key_mode, key_in, N, d = _key_inputs(keys)
    on_mma, ks, template, grid, tg = _score_plan(backend, q.dtype, B, T, H, D, N, key_mode,
                                                 bn, hc, e, mma, tpt,
                                                 _idec(idec, backend),
                                                 _flag("mmaptx", mmaptx, MMA_PTX), tick,
                                                 _flag("frag", frag, FRAG_SCORER),
                                                 tuple(fl) if fl else None, visible is None)
    shapes, dtypes = _score_outputs(B, T, N, tick)
    out = _kernel(backend, ks)(
        inputs=_score_inputs(q, w, key_in, _vis_in(visible), on_mma),
        template=template, grid=grid, threadgroup=tg,
        output_shapes=shapes, output_dtypes=dtypes, stream=mx.gpu,
    )
    return tuple(out) if tick else out[0]


def _score_outputs(B, T, N, tick: bool):
    """(output shapes, dtypes) of a scoring launch: scores, and the row counters."""
    if tick:
        return [(B, T, N), (B * T,)], [mx.float32, mx.uint32]
    return [(B, T, N)], [mx.float32]


def _score_inputs(q, w, key_in, visible, on_mma: bool):
    """The scoring kernel's inputs (the matrix-unit kernel reads bf16 queries as uint32)."""
    return [q.view(mx.uint32) if on_mma else q, _f32(w), *key_in, visible]


def _vis_in(visible):
    """The `visible` input of a launch: int32 counts, or (None: all visible, the kernel never
    reads it) a one-element placeholder made once."""
    return _no_cidx() if visible is None else _i32(visible)


def _f32(a):
    return a if a.dtype == mx.float32 else a.astype(mx.float32)


def _i32(a):
    return a if a.dtype == mx.int32 else a.astype(mx.int32)


_dummy = {}


def _no_cidx():
    """A 1-element int32 array for the unused `cidx` input (made and evaluated once)."""
    if "a" not in _dummy:
        _dummy["a"] = mx.zeros((1,), mx.int32)
        mx.eval(_dummy["a"])
    return _dummy["a"]


# How a top-k pass finds the bin of the krem-th key: 0, 16 threads sum 16 bins each and one
# thread walks them; 1, the first warp in parallel (shuffles; one barrier fewer). The same
# picks either way (emulation tests and, 2026-12-07's sixth session, the GPU tests). Left at
# 0: two H100 runs of `bench/indexer.py --profile-parts --defaults-only` gave 30.1 / 30.3 us
# vs 31.4 / 31.0 at 64K entries but 62.0 / 62.1 vs 53.1 / 53.3 at 256K.
TOPK_WALK = 0


def _topk_spec(B, T, M, k, tg, u, s, mapped, r=None, walk=None):
    """(template, grid, threadgroup, output shapes, output dtypes) of one top-k launch over
    rows of M scores; the outputs [B, T, S*k] written directly (row-contiguous: the same
    memory as [B, T, S, k])."""
    r = topk_regs(M, tg, s) if r is None else r
    walk = _flag("walk", walk, TOPK_WALK)
    return ([("K", k), ("TG", tg), ("U", u), ("S", s), ("MAPPED", mapped), ("R", r),
             ("WALK", walk)],
            (s * tg, T, B), (tg, 1, 1), [(B, T, s * k)] * 2, [mx.int32, mx.float32])


def _fused_spec(B, T, M, k, tg, u, s, r=None, walk=None, r2=None):
    """`_topk_spec` of the fused top-k (`indexer_source.topk_fused_source`): the slices' own
    registers R, the merge's R2 (its S * K candidates), outputs idx, val (the candidates),
    thr (the slices' bounds), fin (the picks)."""
    if r2 is None:  # (r = 0 asked: no registers anywhere)
        r2 = 0 if r == 0 else topk_regs(s * k, tg, 1)
    r = topk_regs(M, tg, s) if r is None else r
    walk = _flag("walk", walk, TOPK_WALK)
    return ([("K", k), ("TG", tg), ("U", u), ("S", s), ("MAPPED", False), ("R", r), ("R2", r2),
             ("WALK", walk)],
            (s * tg, T, B), (tg, 1, 1), [(B, T, s * k)] * 2 + [(B, T, s), (B, T, k)],
            [mx.int32, mx.float32, mx.uint32, mx.int32])


def _select_launch(backend, scores, visible, cidx, k, tg, u, s, mapped, r=None, walk=None,
                   allvis=False):
    template, grid, tgs, shapes, dtypes = _topk_spec(*scores.shape, k, tg, u, s, mapped, r,
                                                     walk)
    idx, val = _kernel(backend, src.topk_source(backend, allvis and not mapped))(
        inputs=[scores, visible, cidx], template=template, grid=grid, threadgroup=tgs,
        output_shapes=shapes, output_dtypes=dtypes, stream=mx.gpu,
    )
    return idx, val


def indexer_select_kernel(scores, visible, k: int, *, backend: str, tg=None, u=None, s=None,
                          r=None, walk=None, fuse=None, tick=None, row=None, cap=None,
                          ha=None, r2=None):
    """Top-k indices [B, T, k] int32 of masked scores (-1 for invisible picks; ``visible``
    None: every entry visible, no count read).

    ``r``: register keys a thread of the first launch (default `topk_regs`; 0: none, in
    either launch, the scores read at every pass); ``r2``: the merge's, where given.
    ``walk``: `TOPK_WALK` by default.
    ``fuse``: with S > 1, one launch (`TOPK_FUSE` by default; see `_fuse`); ``tick``: its
    zeroed row counters (the scoring kernel's, `indexer_scores_kernel(tick=True)`; default
    fresh zeros). ``row``: one group a row (`topk_row_source`): 1 forces it, 0 forbids it,
    None: `_row`'s rule (slices wherever ``s``, ``r``, ``fuse`` or ``tick`` is given); ``tg``,
    ``u`` tune whichever top-k runs; ``cap``, ``ha``: the one group's (default
    `topk_row_launch`)."""
    B, T, N = scores.shape
    allvis = visible is None
    if _row(B, T, N, k, _row_asked(row, fuse, s, r, r2, tick), backend):
        TG, U, CAP, HA = topk_row_launch(B, T, N, k)
        template, grid, tgs, shapes, dtypes = _row_spec(
            B, T, k, tg or TG, u or U, cap or CAP, HA if ha is None else int(bool(ha)), walk)
        return _kernel(backend, src.topk_row_source(backend, allvis))(
            inputs=[scores, _vis_in(visible)], template=template, grid=grid, threadgroup=tgs,
            output_shapes=shapes, output_dtypes=dtypes, stream=mx.gpu,
        )[0]
    TG, U, S = topk_launch(B, T, N, k)
    TG, U, S = tg or TG, u or U, s or S
    visible = _vis_in(visible)
    if _fused(S, fuse, backend):
        if tick is None:
            tick = mx.zeros((B * T,), mx.uint32)
        template, grid, tgs, shapes, dtypes = _fused_spec(B, T, N, k, TG, U, S, r, walk, r2)
        out = _kernel(backend, src.topk_fused_source(backend, allvis))(
            inputs=[scores, visible, tick], template=template, grid=grid, threadgroup=tgs,
            output_shapes=shapes, output_dtypes=dtypes, stream=mx.gpu,
        )
        return out[3]
    idx, val = _select_launch(backend, scores, visible, _no_cidx(), k, TG, U, S, False, r,
                              walk, allvis)
    if S > 1:  # the S * k candidates of each row, selected by one group of 1024
        idx, _ = _select_launch(backend, val, visible, idx, k, 1024, U, 1, True,
                                (0 if r == 0 else None) if r2 is None else r2, walk)
    return idx


def indexer_topk_kernel(q, w, keys, visible, topk: int, *, backend: str,
                        select: str = "kernel", launch: dict | None = None,
                        mma=None, scratch=None) -> mx.array:
    """`indexer_topk_ops` through the kernels (no probe, no fallback: see `indexer_topk`).

    ``select``: ``"kernel"`` (radix select) or ``"argpartition"`` (``mx.argpartition`` on
    the kernel's scores). ``launch``: overrides of the launch parameters (``bn``, ``hc``,
    ``e``, ``tpt``, ``idec``, ``mmaptx``, ``frag``, ``fl`` of the scoring kernels, ``tg``,
    ``u``, ``s``, ``r``, ``walk``, ``fuse``, ``row``, ``cap``, ``ha`` of the top-k kernel),
    for tuning. ``scratch``: the one launch's zeroed histogram rows (`select_scratch`; only
    that launch reads it).
    """
    if not launch and select == "kernel" and mma is None:
        return _planned(backend, q, w, keys, visible, topk, scratch=scratch)
    launch = launch or {}
    pick = lambda names: {a: launch[a] for a in names if a in launch}  # noqa: E731
    N = _num_entries(keys)
    k = min(topk, N)
    if k == N:
        return indexer_topk_ops(q, w, keys, visible, topk)
    visible = None if visible is None else _i32(visible)
    if select not in ("kernel", "argpartition"):
        raise ValueError(f"select must be 'kernel' or 'argpartition', got {select!r}")
    qdtype, (B, T, H, D), key_mode = _q_ready(q).dtype, q.shape, _key_inputs(keys)[0]
    frag = _flag("frag", launch.get("frag"), FRAG_SCORER) and mma is not False and \
        frag_usable(backend, qdtype, H, D, key_mode)
    one = _row_asked(launch.get("one"), *(launch.get(a) for a in (
        "row", "fuse", "s", "r", "tg", "ha", "bn", "hc", "e")))
    if select == "kernel" and mma is not False and _one(B, T, N, k, one, backend, frag) and \
            select_usable(backend, qdtype, H, D, key_mode):
        return _score_select(q, w, keys, visible, k, backend, scratch=scratch,
                             **pick(("tpt", "idec", "mmaptx", "u", "cap", "walk")))
    # the fused top-k counts on row counters that the scoring launch zeroes
    row = _row_asked(launch.get("row"), *(launch.get(a) for a in ("fuse", "s", "r")))
    fused = (select == "kernel" and not _row(B, T, N, k, row, backend)
             and _fused(launch.get("s") or topk_launch(B, T, N, k)[2], launch.get("fuse"),
                        backend))
    out = indexer_scores_kernel(q, w, keys, visible, backend=backend, mma=mma, tick=fused,
                                **pick(("bn", "hc", "e", "tpt", "idec", "mmaptx", "frag",
                                        "fl")))
    scores, tick = out if fused else (out, None)
    if select == "kernel":
        return indexer_select_kernel(scores, visible, k, backend=backend, tick=tick,
                                     **pick(("tg", "u", "s", "r", "walk", "fuse", "row",
                                             "cap", "ha")))
    with mx.stream(mx.gpu):
        idx = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k].astype(mx.int32)
        return idx if visible is None else mx.where(idx >= visible[None, :, None], -1, idx)


def _select_plan(backend, qdtype, B, T, H, D, N, key_mode, k, allvis, scr, tpt=None,
                 idec=None, mmaptx=None, u=None, cap=None, walk=None):
    """(kernel, template, grid, threadgroup, output shapes, output dtypes) of the one-launch
    scoring and top-k (`scr`: the scratch's kernel); None parameters: the defaults."""
    _, _, template, grid, tg = _score_plan(backend, qdtype, B, T, H, D, N, key_mode, None, None,
                                           None, True, tpt, _idec(idec, backend),
                                           _flag("mmaptx", mmaptx, MMA_PTX), False, 0, None,
                                           allvis)
    U, CAP = select_launch(B, T, N, k)
    template, shapes, dtypes = _select_spec(B, T, N, k, template, U if u is None else u,
                                            CAP if cap is None else cap, walk, scr)
    return (_kernel(backend, src.score_select_source(backend, key_mode, allvis, scr)),
            template, grid, tg, shapes, dtypes)


def _run_select(launch, inputs, scratch):
    """idx of a `_select_plan` launch on the scoring inputs: with `scratch` (zeros [>= B * T,
    SCRATCH_WORDS] uint32, left zeros) as the last input, else its outputs zeroed by MLX."""
    kern, template, grid, tg, shapes, dtypes = launch
    fill = {"init_value": 0.0} if scratch is None else {}
    return kern(inputs=inputs + ([] if scratch is None else [scratch]), template=template,
                grid=grid, threadgroup=tg, output_shapes=shapes, output_dtypes=dtypes,
                stream=mx.gpu, **fill)[0]


def _score_select(q, w, keys, visible, k, backend, tpt=None, idec=None, mmaptx=None, u=None,
                  cap=None, walk=None, scratch=None):
    """The one-launch scoring and top-k (`score_select_source`) -> idx [B, T, k]; with
    `scratch` no output is filled (`_run_select`)."""
    q = _q_ready(q)
    key_mode, key_in, N, _ = _key_inputs(keys)
    launch = _select_plan(backend, q.dtype, *q.shape, N, key_mode, k, visible is None,
                          scratch is not None, tpt, idec, mmaptx, u, cap, walk)
    return _run_select(launch, _score_inputs(q, w, key_in, _vis_in(visible), True), scratch)


_plans: dict = {}
_usable: dict = dispatch.remembered({})  # shape key -> the kernels take it (probed once)


def _shape_key(backend, q, keys, topk, allvis=False):
    """What a call's plan (and whether the kernels take it) depends on."""
    if _is_fp4(keys):
        return (backend, _kernel, q.dtype, q.shape, keys[0].dtype, keys[0].shape,
                keys[1].dtype, keys[1].shape, topk, variants(), TOPK_FUSE, FRAG_SCORER, TOPK_ROW,
                TOPK_ROW_METAL, ROW_MIN, ROW_MAX, SCORE_SELECT, SCORE_SELECT_METAL, allvis)
    return (backend, _kernel, q.dtype, q.shape, keys.dtype, keys.shape, topk, variants(),
            TOPK_FUSE, FRAG_SCORER, TOPK_ROW, TOPK_ROW_METAL, ROW_MIN, ROW_MAX, SCORE_SELECT,
            SCORE_SELECT_METAL, allvis)


def _plan(backend, q, keys, topk, allvis=False):
    """The launches of one `indexer_topk_kernel` call with its default parameters, for these
    shapes: whether the scoring takes the queries as uint32 (the matrix-unit kernel), how
    the top-k runs ("slices", "fused", "row" or "one"), and [(kernel, template, grid,
    threadgroup, output shapes, output dtypes)] of the scoring launch, the top-k launch and
    (S > 1) the merge, or (fused) the scoring launch with its row counters and the fused
    top-k, or (row) the scoring launch and the one-group top-k, or (one) the one launch of
    both."""
    B, T, H, D = q.shape
    key_mode, _, N, _ = _key_inputs(keys)
    k = min(topk, N)
    TG, U, S = topk_launch(B, T, N, k)
    frag = _flag("frag", None, FRAG_SCORER)
    if _one(B, T, N, k, None, backend, frag and frag_usable(backend, q.dtype, H, D, key_mode)) \
            and select_usable(backend, q.dtype, H, D, key_mode):
        return True, "one", [  # the work rows zeroed by MLX, or the scratch's
            _select_plan(backend, q.dtype, B, T, H, D, N, key_mode, k, allvis, scr)
            for scr in (False, True)]
    row = _row(B, T, N, k, None, backend)
    fused = not row and _fused(S, None, backend)
    on_mma, ks, template, grid, tg = _score_plan(backend, q.dtype, B, T, H, D, N, key_mode,
                                                 None, None, None, None, None,
                                                 _idec(None, backend),
                                                 _flag("mmaptx", None, MMA_PTX), fused,
                                                 frag, None, allvis)
    launches = [(_kernel(backend, ks), template, grid, tg, *_score_outputs(B, T, N, fused))]
    if row:
        launches.append((_kernel(backend, src.topk_row_source(backend, allvis)),
                         *_row_spec(B, T, k, *topk_row_launch(B, T, N, k))))
        return on_mma, "row", launches
    if fused:
        launches.append((_kernel(backend, src.topk_fused_source(backend, allvis)),
                         *_fused_spec(B, T, N, k, TG, U, S)))
        return on_mma, "fused", launches
    launches.append((_kernel(backend, src.topk_source(backend, allvis)),
                     *_topk_spec(B, T, N, k, TG, U, S, False)))
    if S > 1:  # the merge, as `indexer_select_kernel` makes it
        launches.append((_kernel(backend, src.topk_source(backend)),
                         *_topk_spec(B, T, S * k, k, 1024, U, 1, True)))
    return on_mma, "slices", launches


def _planned(backend, q, w, keys, visible, topk, key=None, scratch=None):
    """`indexer_topk_kernel` with its default launch parameters, the launches made once per
    shape (the same kernels and parameters as `indexer_scores_kernel` and
    `indexer_select_kernel` choose; a decode step makes one call a CSA layer). ``key``: the
    call's `_shape_key`, where the caller has it."""
    q = _q_ready(q)
    fp4 = _is_fp4(keys)
    key = key or _shape_key(backend, q, keys, topk, visible is None)
    p = _plans.get(key)
    if p is None:
        N = _num_entries(keys)
        p = dispatch.bounded_put(_plans, key, False if min(topk, N) == N
                                 else _plan(backend, q, keys, topk, visible is None))
    if p is False:  # every entry is selected: only visibility matters
        return indexer_topk_ops(q, w, keys, visible, topk)
    on_mma, how, launches = p
    visible = _vis_in(visible)
    key_in = list(keys) if fp4 else _key_inputs(keys)[1]  # (fp4: checked by the plan)
    if how == "one":  # (its work rows zeroed by MLX's init_value, or the caller's scratch)
        return _run_select(launches[scratch is not None],
                           _score_inputs(q, w, key_in, visible, on_mma), scratch)
    out = None
    for i, (kern, template, grid, tg, shapes, dtypes) in enumerate(launches):
        if i == 0:
            inputs = _score_inputs(q, w, key_in, visible, on_mma)
        elif how == "fused":  # the fused top-k on the scores and their row counters
            inputs = [out[0], visible, out[1]]
        elif how == "row":
            inputs = [out[0], visible]
        elif i == 1:
            inputs = [out[0], visible, _no_cidx()]
        else:
            inputs = [out[1], visible, out[0]]
        out = kern(inputs=inputs, template=template, grid=grid, threadgroup=tg,
                   output_shapes=shapes, output_dtypes=dtypes, stream=mx.gpu)
    return out[3] if how == "fused" else out[0]


@functools.lru_cache(maxsize=256)
def _variant(backend: str, qdtype, B: int, T: int, H: int, D: int, key_mode: str, N: int, k: int,
             fuse: int, frag: int = 0, allvis: bool = False, row: bool = False,
             one: bool = False, scr: bool = False):
    """(probe key, launch parameters) of the kernel variants one call would use (`fuse`,
    `frag`, `row`, `one`: `_fuse`'s, `_flag`'s, `_row`'s and `_one`'s answers, outside this
    cache)."""
    BN, HC, E = score_launch(B, T, N, H, D)
    TG, U, S = topk_launch(B, T, N, k)
    R = topk_regs(N, TG, S)
    mma = _mma_usable(backend, qdtype, H, D, key_mode)
    tpt = mma_tiles(B * T, N, src.mma_layout(backend, H, D, MMA_WARPS)[2]) if mma else None
    fused = int(S > 1 and fuse and not row)
    frag = int(bool(frag) and frag_usable(backend, qdtype, H, D, key_mode))
    fl = frag_launch(B * T, N) if frag else None  # (template constants: probed as they run)
    rl = topk_row_launch(B, T, N, k) if row else None  # (likewise)
    ol = (select_launch(B, T, N, k) if one and not frag and select_usable(backend, qdtype, H, D,
                                                                          key_mode) else None)
    key = (f"{backend}/{key_mode}/{qdtype}/D{D}/H{H}/HC{HC}/BN{BN}/E{E}/K{k}/TG{TG}/U{U}/S{S}"
           f"/R{R}/mma{int(mma)}/TPT{tpt}/F{fused}/FR{fl}/RW{rl}/O{ol}{'s' if ol and scr else ''}"
           f"/A{int(allvis)}")
    return key, (BN, HC, E, TG, U, S, R, mma, tpt, fused, frag, fl, rl, ol)


def _variant_key(backend, q, keys, k, allvis=False) -> tuple[str, callable]:
    """Probe key and probe function for the kernel variants one call would use."""
    q = _q_ready(q)
    B, T, H, D = q.shape
    key_mode, key_in, N, d = _key_inputs(keys)
    frag = _flag("frag", None, FRAG_SCORER)
    scr = bool(_flag("scr", None, SELECT_SCRATCH))
    key, (BN, HC, E, TG, U, S, R, mma, tpt, fused, frag, fl, rl, ol) = _variant(
        backend, q.dtype, B, T, H, D, key_mode, N, k, bool(_fuse(None, backend)), frag,
        allvis, _row(B, T, N, k, None, backend),
        _one(B, T, N, k, None, backend, frag and frag_usable(backend, q.dtype, H, D, key_mode)),
        scr)
    if variants():  # (the opt-in variants compile apart)
        key += "/" + "+".join(sorted(variants()))

    def probe():
        n = max(2 * k + 2, S * (k + 1))  # more entries than k a slice: the radix path runs
        qq = mx.zeros((1, 1, H, D), q.dtype)
        ww = mx.zeros((1, 1, H), mx.float32)
        if key_mode == "fp4":
            kk = (mx.zeros((1, n, D // 8), mx.uint32), mx.full((1, n, D // 32), 127, mx.uint8))
        else:
            kk = mx.zeros((1, n, D), mx.bfloat16 if key_mode == "bf16" else mx.float32)
        vis = None if allvis else mx.array([n], mx.int32)
        if ol:  # the one launch, with the call's template (and the scratch's, where on)
            mx.eval(_score_select(qq, ww, kk, vis, k, backend, tpt=tpt, u=ol[0], cap=ol[1]))
            if scr:  # (the scratch's kernel too, where asked for)
                mx.eval(_score_select(qq, ww, kk, vis, k, backend, tpt=tpt, u=ol[0], cap=ol[1],
                                      scratch=mx.zeros((1, SCRATCH_WORDS), mx.uint32)))
            return
        s = indexer_scores_kernel(qq, ww, kk, vis, backend=backend, bn=BN, hc=HC, e=E,
                                  mma=None if frag else mma, tpt=tpt, tick=bool(fused),
                                  frag=frag, fl=fl)
        s, tick = s if fused else (s, None)
        if rl:  # the one-group top-k with the call's launch
            i = indexer_select_kernel(s, vis, k, backend=backend, row=True, tg=rl[0], u=rl[1],
                                      cap=rl[2], ha=rl[3])
        else:
            # (the merge with the registers the call's default gives it, whatever R is)
            i = indexer_select_kernel(s, vis, k, backend=backend, tg=TG, u=U, s=S, r=R,
                                      fuse=fused, tick=tick, row=False,
                                      r2=topk_regs(S * k, TG if fused else 1024, 1))
        mx.eval(s, i)

    return key, probe


def indexer_topk(q, w, keys, visible, topk, *, q_exact_bf16: bool = False, scratch=None):
    """Dispatch point (signature of `indexer_topk_ops`): the GPU kernels where the backend
    allows (`dispatch.select_backend`), the pure-ops path otherwise.

    `keys`: float array [B, N, d] or mxfp4 pair (packed uint32 [B, N, d/8], scales uint8
    [B, N, d/32]). `visible`: [T] int32 counts, or None when every query sees all N entries
    (a decode token: the kernels then read no count). ``q_exact_bf16``: the caller vouches
    that q's values are bf16 numbers (FP4-rounded queries are), so a float32 q may go to the
    matrix-unit kernel as bf16 without any rounding. ``scratch``: `select_scratch`'s array
    (or None), read only where the one launch of scoring and top-k runs.
    """
    backend = dispatch.select_backend()
    N = _num_entries(keys)
    k = min(topk, N)
    if backend != "ops" and q_exact_bf16 and q.dtype == mx.float32:
        q = q.astype(mx.bfloat16)  # exact (see above)
    if backend != "ops" and k < N:
        skey = _shape_key(backend, _q_ready(q), keys, topk, visible is None)
        key = (skey, dispatch.kernel_usable)
        ok = _usable.get(key)
        if ok is None:  # once per shape: the checks, and the build probe (once per variant)
            ok = kernel_supported(q, keys)
            if ok:
                vkey, probe = _variant_key(backend, q, keys, k, visible is None)
                ok = dispatch.kernel_usable(vkey, probe, f"lightning indexer ({backend})")
            dispatch.bounded_put(_usable, key, ok)
        if ok:  # (`indexer_topk_kernel` with its defaults)
            return _planned(backend, q, w, keys, visible, topk, skey, scratch)
    return indexer_topk_ops(q, w, keys, visible, topk)


__all__ = [
    "dequantize_keys", "indexer_scores_ops", "indexer_topk_ops", "indexer_scores_kernel",
    "indexer_select_kernel", "indexer_topk_kernel", "indexer_topk", "score_launch",
    "topk_launch", "topk_regs", "mma_tiles", "kernel_supported", "mma_usable",
]
