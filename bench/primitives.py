"""Where the primitives of one decode step come from, section by section.

    python bench/primitives.py --preset tiny --layers 4 --context 4096

Runs one decode step on a copy of a prefilled state, evaluating at every section boundary
(mHC parameters, norms, attention pieces, router, experts, ...) and counting the primitives of
each section's graph, split into views (no kernel launch) and the rest. Dimensions do not change
the counts, so the tiny preset answers for Flash; the device decides which kernels replace ops
(run it on the GPU machine for the GPU graph).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_decode  # noqa: E402
import standin_primitives  # noqa: E402
from decode_profile import VIEWS  # noqa: E402

from dsv4_mlx.cache import restore, snapshot  # noqa: E402
from dsv4_mlx.model import attention as attn_mod  # noqa: E402
from dsv4_mlx.model import model as model_mod  # noqa: E402


def prims(outs):
    outs = [o for o in outs if isinstance(o, mx.array)]
    if not outs:
        return {}
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "g.dot"
        mx.export_to_dot(str(p), *outs)
        text = p.read_text()
    c: dict = defaultdict(int)
    for o in re.findall(r'\[label ="([^"]+)", shape=rectangle\]', text):
        c[o] += 1
    return c


def raw_state(c):
    """The cache's arrays as held (no slicing views, unlike `state`)."""
    out = list((c.ring or {}).values())
    for st in (c.comp, c.index):
        if st is not None:
            out += list((st.buffers or {}).values())
            out += [st.pending_kv, st.pending_gate, st.overlap_kv, st.overlap_gate]
    return [x for x in out if x is not None]


TABLE: dict = defaultdict(lambda: defaultdict(int))
CACHE_REF: list = []


def section(name, fn, *a, **k):
    """Run fn, count what it built (its outputs and every cache array it touched), evaluate."""
    out = fn(*a, **k)
    flat = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (tuple, list)) else [out]
    state = [x for c in CACHE_REF for x in raw_state(c)]
    cnt = prims(flat + state)
    for op, n in cnt.items():
        TABLE[name][op] += n
    mx.eval(flat, state)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=None)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--detail", action="store_true", help="the ops of every section")
    ap.add_argument("--standin", action="store_true",
                    help="on a CPU-only MLX, count the GPU graph: kernels and mx.fast ops as one "
                         "stand-in node each (bench/standin_primitives.py); preset tiny-flash: "
                         "tiny dimensions, Flash's layer structure")
    a = ap.parse_args()
    gpu_decode.preset_config = standin_primitives.tiny_flash_config(gpu_decode.preset_config)
    model, args = gpu_decode.build(a.preset, a.layers, a.experts or 8)
    tokens = [(7 * i + 3) % args.vocab_size for i in range(a.context + 1)]
    cache = model.make_cache()
    for p in range(0, a.context, 2048):
        mx.eval(model(mx.array([tokens[p: p + 2048]]), cache=cache, last_only=True), [c.state for c in cache])
    work = restore(snapshot(cache))
    mx.eval([c.state for c in work])
    CACHE_REF[:] = work
    if a.standin:
        standin_primitives.install()
    # one decode step first (as `dsv4 bench` warms up): constants made at first use are not
    # part of a step's graph
    warm = restore(snapshot(cache))
    mx.eval(model(mx.array([[tokens[a.context]]]), cache=warm), [c.state for c in warm])

    # instrument: Block sections and the pieces of Attention / MoE
    Block = model_mod.Block
    orig_block = Block.__call__

    def block_call(self, X, ids, c):
        xn, post, comb = section("mhc pre + attn_norm", self._hc, X, self.hc_attn_fn,
                                 self.hc_attn_scale, self.hc_attn_base, self.attn_norm)
        o = section_attn(self.attn, xn, c)
        X = section("mhc post (attn)", model_mod.hc_post, X, o, post, comb)
        xn, post, comb = section("mhc pre + ffn_norm", self._hc, X, self.hc_ffn_fn,
                                 self.hc_ffn_scale, self.hc_ffn_base, self.ffn_norm)
        f = self.ffn
        idx, w = section("moe router", f.gate, xn, ids, expand=True)
        y = section("moe routed experts", f.experts.outputs, xn, idx, w)
        ys = section("moe shared expert", f.shared_experts, xn)
        return section("mhc post (ffn, with the MoE sum)", model_mod.hc_post, X, ys, post, comb, y)

    def section_attn(self, x, c):
        # mirrors Attention.__call__ for one decode token, section by section
        B, T, _ = x.shape
        s = c.offset
        qr = section("attn q_a + q_norm", lambda: self.q_norm(self.wq_a(x)))
        q, kv = section("attn q_b, wkv + norms + ropes (+ KV store)", lambda: attn_mod.norm_rope(
            self.wq_b(qr), self.wkv(x), self.kv_norm, self.eps, self.rope, s, c))
        idx, n_dense = None, 0
        kind = {0: "window", 4: "csa"}.get(self.ratio, "hca")
        if self.ratio:
            x32 = x.astype(mx.float32)
            N = self.compressor(x, c.comp, s, self.rope, x32)
            section(f"{kind} compressor", lambda: [])
            if N and (self.ratio != 4 or N <= self.indexer.topk):
                if self.ratio == 4:
                    self.indexer.compressor(x, c.index, s, self.rope, x32)
                    section("csa indexer compressor", lambda: [])
                n_dense = N
            elif N:
                idx = section("csa indexer (compressor + score + top-k)",
                              lambda: self.indexer(x, qr, c.index, s, self.rope, x32))
            elif self.ratio == 4:
                self.indexer.compressor(x, c.index, s, self.rope, x32)
                section("csa indexer compressor", lambda: [])
        o = section(f"{kind} decode attention + inv rope", self._decode_attention, q, kv, c,
                    n_dense, idx)
        c.advance(1)
        return section("attn output (wo_a, wo_b)", self._project, o)

    Block.__call__ = block_call
    try:
        ids = mx.array([[tokens[a.context]]])
        X = section("embed", lambda: model_mod.embed_streams(model.embed, ids, args.hc_mult))
        for layer, c in zip(model.layers, work):
            X = layer(X, ids, c)
        y = section("head (hc_head + norm, lm_head)", lambda: model.lm_head(
            model_mod.hc_head(X, model.hc_head_fn, model.hc_head_scale, model.hc_head_base,
                              args.hc_eps, args.rms_norm_eps, model.norm)))
    finally:
        Block.__call__ = orig_block

    L = len(model.layers)
    print(f"device {mx.default_device()}, {a.preset} structure, {L} layers, context {a.context}")
    print(f"{'section':44s} {'all':>6s} {'views':>6s} {'launch':>7s}   (summed over layers)")
    tot = tv = 0
    for name, ops in TABLE.items():
        n = sum(ops.values())
        v = sum(k for op, k in ops.items() if op in VIEWS)
        tot, tv = tot + n, tv + v
        print(f"{name:44s} {n:6d} {v:6d} {n - v:7d}")
        if a.detail:
            print("      " + ", ".join(f"{op} {k}" for op, k in sorted(ops.items(), key=lambda kv: -kv[1])))
    print(f"{'total':44s} {tot:6d} {tv:6d} {tot - tv:7d}   per layer {tot / L:.1f} ({(tot - tv) / L:.1f} non-view)")
    # the blocks alone: the embedding and the head happen once a step, not once a layer
    blk = {n: ops for n, ops in TABLE.items() if n != "embed" and not n.startswith("head")}
    bt = sum(sum(ops.values()) for ops in blk.values())
    bv = sum(k for ops in blk.values() for op, k in ops.items() if op in VIEWS)
    print(f"{'blocks only (no embed, no head)':44s} {bt:6d} {bv:6d} {bt - bv:7d}   per layer "
          f"{bt / L:.1f} ({(bt - bv) / L:.1f} non-view)")


if __name__ == "__main__":
    main()
