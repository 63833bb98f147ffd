"""The DeepSeek-V4 model (spec §4.1, §4.2, §4.11, §4.12), with the checkpoint's official names.

Follows mlx-lm's model protocol: ``Model(args)``, ``model(inputs, cache=None)`` -> logits of
every position, ``model.make_cache()``, ``model.layers``, ``model.sanitize(weights)``.
"""

from __future__ import annotations

import contextlib
import os
import re
import weakref
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn

from ..cache import LayerCache, make_layer_caches, make_mtp_caches
from .attention import Attention
from .config import ModelArgs
from .kv_formats import DEFAULT_KV_FORMAT
from .layers import RMSNorm
from ..kernels.embed import embed_streams
from ..kernels.mhc import hc_head, hc_post, hc_pre
from ..kernels.qgemv import head_logits
from .moe import MoE


_FP32_WEIGHTS = (".compressor.wkv.weight", ".compressor.wgate.weight", ".ffn.gate.weight")
# an affine-quantized head's scales and biases: it takes fp32 input (fp32 logits), and MLX
# would otherwise cast its bf16 scales and biases to fp32 at every step (two launches and
# ~100 MB of traffic a token for Flash's head); the values are the same
_FP32_HEAD = ("head.scales", "head.biases")


class WeightsError(ValueError):
    """Weights that cannot be loaded into this model."""


#: environment variable: "1" runs every block's stateless parts of a decode step as
#: `mx.compile`d functions (see `Block`), "0" as plain calls; "auto" (the default): compiled
#: where that has been measured, MLX's CUDA backend with the GPU as default device (2026-12-07,
#: H100: 260 -> 340 tok/s a step, 395 -> 585 pipelined, bit-identical logits). Not yet on
#: Metal (never run there) nor on the CPU (MLX compiles fused CPU kernels with a C++
#: compiler, which a machine may not have).
COMPILE_ENV = "DSV4_COMPILE_DECODE"


def dispatch_key() -> tuple:
    """What a traced decode part depends on besides its inputs and weights: the default
    device, every DSV4_* variable (the kernel dispatch reads them while tracing, e.g.
    `dsv4 check` and the GPU tests switch families to the ops path on one model) and the
    dispatch's generation (a kernel found broken, a reset). Not covered: module constants
    changed at run time (tests and benchmarks that do so run plain calls)."""
    from ..kernels import dispatch

    return (str(mx.default_device()), dispatch.generation[0],
            tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("DSV4_"))))


def compile_decode_default() -> bool:
    """Whether `COMPILE_ENV` asks for the compiled decode parts."""
    raw = os.environ.get(COMPILE_ENV, "auto").strip().lower()
    if raw not in ("0", "1", "auto"):
        raise ValueError(f"{COMPILE_ENV}={raw!r}: expected 0, 1 or auto")
    if raw == "auto":
        from ..kernels import dispatch

        return mx.default_device() == mx.gpu and dispatch.cuda_available()
    return raw == "1"


class _DropsTracedOnUpdate:
    """`update` and `update_modules` forget the traced decode functions first (`drop_compiled`:
    the weights are constants of those functions). `load_weights` goes through `update`."""

    def update(self, parameters: dict, strict: bool = True):
        self.drop_compiled()
        return super().update(parameters, strict=strict)

    def update_modules(self, modules: dict, strict: bool = True):
        self.drop_compiled()
        return super().update_modules(modules, strict=strict)


class Block(_DropsTracedOnUpdate, nn.Module):
    """One decoder block (spec §4.2): mHC around attention, then around the MoE.

    With `compile_decode`, a decode step (one token continuing one sequence) runs all that
    does not touch the cache as two `mx.compile`d functions: before the attention's cache
    part, the mHC pre step and the query / KV projections (`_decode_pre`); after it, the
    output projection, the mHC post step and the whole MoE half (`_decode_post`). They are
    traced at the block's second decode call (the first runs plainly: first-use work such as
    fusing w1/w3 happens there), then replayed by MLX without rebuilding their graphs in
    Python; one pair per dispatch configuration (`dispatch_key`: the device and the DSV4_*
    variables, which decide the kernels while tracing). The weights are constants of the
    traced functions: changing them through `update`, `update_modules` or `load_weights` on
    this block or on the model drops them; a change made below the block (a submodule's
    `update`, assigning a parameter) is not seen: call `drop_compiled` (the block's or the
    model's) after one.
    """

    #: see the class docstring; `Model` sets it on every block (default `COMPILE_ENV`)
    compile_decode: bool = False

    def __init__(self, args: ModelArgs, ratio: int, hash_routed: bool):
        super().__init__()
        n, D = args.hc_mult, args.hidden_size
        mix = (2 + n) * n
        self.args = args
        self.attn_norm = RMSNorm(D, args.rms_norm_eps)
        self.ffn_norm = RMSNorm(D, args.rms_norm_eps)
        self.hc_attn_fn = mx.zeros((mix, n * D))
        self.hc_attn_base = mx.zeros((mix,))
        self.hc_attn_scale = mx.ones((3,))
        self.hc_ffn_fn = mx.zeros((mix, n * D))
        self.hc_ffn_base = mx.zeros((mix,))
        self.hc_ffn_scale = mx.ones((3,))
        self.attn = Attention(args, ratio)
        self.ffn = MoE(args, hash_routed)

    def _hc(self, X, fn, scale, base, norm):
        """(norm(collapsed input), post, comb) of one mHC site (one fused kernel on the GPU)."""
        a = self.args
        return hc_pre(X, fn, scale, base, a.hc_mult, a.hc_sinkhorn_iters, a.hc_eps, a.rms_norm_eps,
                      norm)

    def __call__(self, X: mx.array, input_ids: mx.array, cache: LayerCache) -> mx.array:
        if X.shape[0] * X.shape[1] == 1 and cache.offset > 0:  # decode: plain or traced
            pre, post_fn = self._decode_fns()
            h, post, comb, *parts = pre(X)
            return post_fn(X, self.attn.decode_core(h, parts, cache), post, comb, input_ids)
        h, post, comb = self._hc(X, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base,
                                 self.attn_norm)
        X = hc_post(X, self.attn(h, cache), post, comb)
        return self._ffn_half(X, input_ids)

    def _decode_fns(self):
        """(pre, post) of a decode step: `_decode_pre` and `_decode_post` themselves, or (with
        `compile_decode`) their traced functions, one pair per dispatch configuration
        (`dispatch_key`; the model computes it once a step), made at its second step."""
        if not self.compile_decode:
            return self._decode_pre, self._decode_post
        key = self.__dict__.get("_step_key") or dispatch_key()
        traced = self.__dict__.setdefault("_compiled", {})
        f = traced.get(key)
        if f is None:
            warm = self.__dict__.setdefault("_warm", set())
            if key not in warm:  # the first step runs plainly (first-use work happens there)
                warm.add(key)
                return self._decode_pre, self._decode_post
            if len(traced) >= 8:  # (configurations come and go in checks and tests)
                traced.pop(next(iter(traced)))
            me = weakref.proxy(self)  # (no block -> function -> block cycle: a dropped
            # model's weights go when it does, not at the next garbage collection)
            f = traced[key] = (mx.compile(lambda X: Block._decode_pre(me, X)),
                               mx.compile(lambda *a: Block._decode_post(me, *a)))
        return f

    def _ffn_half(self, X: mx.array, input_ids: mx.array) -> mx.array:
        """The mHC site around the MoE: streams [B, S, n, D] -> streams."""
        h, post, comb = self._hc(X, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base,
                                 self.ffn_norm)
        routed, shared = self.ffn.branches(h, input_ids)
        return hc_post(X, shared, post, comb, routed)  # the MoE's sum happens in hc_post

    # one decode token as [compiled] pre -> attention's cache part -> [compiled] post
    def _decode_pre(self, X: mx.array) -> list:
        """The attention's mHC pre step and its stateless projections (`decode_pre`)."""
        h, post, comb = self._hc(X, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base,
                                 self.attn_norm)
        return [h, post, comb, *self.attn.decode_pre(h)]

    def _decode_post(self, X, o, post, comb, input_ids) -> mx.array:
        """The attention's output projection and mHC post step, then the MoE half."""
        return self._ffn_half(hc_post(X, self.attn._project(o), post, comb), input_ids)

    def drop_compiled(self) -> None:
        """Forget the traced functions (their weights are about to change)."""
        self.__dict__.pop("_compiled", None)
        self.__dict__.pop("_warm", None)

    def is_compiled(self) -> bool:
        """Whether a decode step of this block has run traced functions."""
        return bool(self.__dict__.get("_compiled"))


class MTPBlock(Block):
    """Multi-token prediction block `mtp.i` (spec §4.12): window-only attention, learned MoE.

    Combines the main model's final streams at position t with the embedding of token t+1 to
    predict token t+2. Shares `embed` and `head` with the main model.
    """

    def __init__(self, args: ModelArgs, i: int):
        super().__init__(args, args.mtp_ratio(i), hash_routed=False)
        n, D = args.hc_mult, args.hidden_size
        self.e_proj = nn.Linear(D, D, bias=False)
        self.h_proj = nn.Linear(D, D, bias=False)
        self.enorm = RMSNorm(D, args.rms_norm_eps)
        self.hnorm = RMSNorm(D, args.rms_norm_eps)
        self.norm = RMSNorm(D, args.rms_norm_eps)
        self.hc_head_fn = mx.zeros((n, n * D))
        self.hc_head_base = mx.zeros((n,))
        self.hc_head_scale = mx.ones((1,))

    def predict(self, streams, next_ids, embed, head, cache: LayerCache):
        """streams [B, S, n, D] (main model, before hc_head), next_ids [B, S] -> (logits, streams)."""
        e = self.enorm(embed(next_ids))
        X = self.e_proj(e)[:, :, None, :] + self.h_proj(self.hnorm(streams))
        X = super().__call__(X, next_ids, cache)
        a = self.args
        y = hc_head(X, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, a.hc_eps,
                    a.rms_norm_eps, self.norm)
        return head(y), X


class Model(_DropsTracedOnUpdate, nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if isinstance(args, dict):
            args = ModelArgs.from_dict(args)
        self.args = args
        self.model_type = args.model_type
        n, D = args.hc_mult, args.hidden_size
        self.embed = nn.Embedding(args.vocab_size, D)
        self.layers = [
            Block(args, args.layer_ratio(i), hash_routed=i < args.num_hash_layers)
            for i in range(args.num_hidden_layers)
        ]
        self.norm = RMSNorm(D, args.rms_norm_eps)
        self.hc_head_fn = mx.zeros((n, n * D))
        self.hc_head_base = mx.zeros((n,))
        self.hc_head_scale = mx.ones((1,))
        self.head = nn.Linear(D, args.vocab_size, bias=False)
        if args.num_nextn_predict_layers:
            self.mtp = [MTPBlock(args, i) for i in range(args.num_nextn_predict_layers)]
        self.set_compile_decode(compile_decode_default())

    # -- compiled decode parts (see `Block`) ----------------------------------------------------
    def _blocks(self):
        return list(self.layers) + list(getattr(self, "mtp", None) or [])

    @contextlib.contextmanager
    def _step_key(self, ids: mx.array, blocks):
        """`dispatch_key` once for a one-token step's blocks (not a block at a time)."""
        on = ids.size == 1 and blocks and blocks[0].compile_decode
        key = dispatch_key() if on else None
        for b in blocks if on else ():
            object.__setattr__(b, "_step_key", key)
        try:
            yield
        finally:
            for b in blocks if on else ():
                b.__dict__.pop("_step_key", None)

    def set_compile_decode(self, on: bool) -> None:
        """Run (or stop running) every block's decode parts as compiled functions."""
        self.drop_compiled()
        for b in self._blocks():
            b.compile_decode = bool(on)

    def drop_compiled(self) -> None:
        """Forget every block's traced functions."""
        for b in self._blocks():
            b.drop_compiled()

    # -- forward -----------------------------------------------------------------------------
    def __call__(
        self,
        inputs: mx.array,
        cache: Optional[List[LayerCache]] = None,
        return_streams: bool = False,
        last_only: bool = False,
    ):
        """inputs [B, S] token ids -> logits [B, S, V] (fp32) for every position.

        With `cache`, the tokens continue the cached sequence (any chunk size); without, they
        are a whole new sequence. `return_streams=True` also returns the final mHC streams
        [B, S, n, D] (the MTP block's input). `last_only=True` computes the logits of the last
        position only ([B, 1, V]): a prefill chunk then skips the S x V head matmul.
        """
        if cache is None:
            cache = self.make_cache()
        offsets = {c.offset for c in cache}
        if len(offsets) != 1:
            raise ValueError(f"inconsistent cache offsets {sorted(offsets)}")
        X = embed_streams(self.embed, inputs, self.args.hc_mult)  # [B, S, n, D]
        with self._step_key(inputs, self.layers):
            for layer, c in zip(self.layers, cache):
                X = layer(X, inputs, c)
        a = self.args
        y = hc_head(X[:, -1:] if last_only else X, self.hc_head_fn, self.hc_head_scale,
                    self.hc_head_base, a.hc_eps, a.rms_norm_eps, self.norm)
        logits = self.lm_head(y)
        return (logits, X) if return_streams else logits

    def lm_head(self, y: mx.array) -> mx.array:
        """fp32 logits; a quantized head takes fp32 input at no extra weight traffic (with its
        scales and biases in fp32, see `sanitize`)."""
        if isinstance(self.head, nn.QuantizedLinear):  # (one token: `kernels.qgemv`)
            return head_logits(self.head, y.astype(mx.float32))
        return self.head(y).astype(mx.float32)

    def mtp_predict(self, streams, next_ids, cache: Optional[List[LayerCache]] = None, i: int = 0):
        """Run MTP block `i` on the main model's final streams and the next tokens."""
        if cache is None:
            cache = self.make_mtp_cache()
        with self._step_key(next_ids, [self.mtp[i]]):
            return self.mtp[i].predict(streams, next_ids, self.embed, self.lm_head, cache[i])

    # -- protocol ----------------------------------------------------------------------------
    #: storage format of the decode state: "fp8" (FP8 KV + FP4 indexer keys, the official
    #: numerics) or "bf16" (as computed; exact transformers parity). See kv_formats.py.
    kv_format: str = DEFAULT_KV_FORMAT

    def make_cache(self, kv_format: Optional[str] = None) -> List[LayerCache]:
        return make_layer_caches(self.args, kv_format or self.kv_format)

    def make_mtp_cache(self, kv_format: Optional[str] = None) -> List[LayerCache]:
        return make_mtp_caches(self.args, kv_format or self.kv_format)

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Official-named (dequantized) weights -> this module tree.

        Stacks per-expert tensors ``*.ffn.experts.{e}.w1.weight`` into
        ``*.ffn.experts.w1.weight`` [E, out, in], casts ``tid2eid`` to int32, drops the MTP
        aliases of `embed`/`head` and any `mtp.*` this config does not have, and makes the
        router and compressor projections fp32 (what the reference computes with). Already
        sanitized weights (e.g. a converted MLX folder) pass through otherwise unchanged.
        """
        fp8_scales = [k for k in weights if k.endswith(".scale")]
        if fp8_scales:
            raise WeightsError(
                "these are quantized source weights (FP8/FP4 with '.scale' tensors, e.g. "
                f"{fp8_scales[0]!r}); convert the checkpoint with `dsv4 convert` first"
            )
        n_mtp = self.args.num_nextn_predict_layers
        out: Dict[str, mx.array] = {}
        experts: Dict[str, Dict[int, mx.array]] = {}
        pat = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")
        for k, v in weights.items():
            m = re.match(r"^mtp\.(\d+)\.(.*)$", k)
            if m:
                if int(m.group(1)) >= n_mtp or m.group(2) in ("embed.weight", "head.weight"):
                    continue
            if k.endswith("gate.tid2eid"):
                v = v.astype(mx.int32)
            elif ((k.endswith(_FP32_WEIGHTS) or k in _FP32_HEAD)
                  and mx.issubdtype(v.dtype, mx.floating)):
                # the reference holds these in fp32 (spec §3.3); upcasting once here saves an
                # fp32 copy of the weight on every call
                v = v.astype(mx.float32)
            e = pat.match(k)
            if e:
                experts.setdefault(f"{e.group(1)}.{e.group(3)}.weight", {})[int(e.group(2))] = v
                continue
            out[k] = v
        E = self.args.n_routed_experts
        for name, per in experts.items():
            if sorted(per) != list(range(E)):
                missing = sorted(set(range(E)) - set(per))[:5]
                raise WeightsError(f"{name}: missing experts {missing}")
            out[name] = mx.stack([per[i] for i in range(E)])
        return out

    @property
    def cast_predicate(self):
        # keep the fp32 tensors of spec §3.3 in fp32 when mlx-lm casts a model
        return lambda k: not any(
            s in k for s in ("hc_", "attn_sink", "ape", "gate.bias", "tid2eid")
        ) and k not in _FP32_HEAD
