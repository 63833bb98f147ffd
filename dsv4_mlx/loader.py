"""`dsv4_mlx.load(path)`: a converted MLX folder -> (model, tokenizer), through mlx-lm."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple


def get_model_classes(config: dict):
    from .model import Model, ModelArgs

    return Model, ModelArgs


def load_model(path, lazy: bool = False):
    from mlx_lm.utils import load_model as _load

    from .kernels.qgemv import use_for_linears

    model, _config = _load(Path(path), lazy=lazy, get_model_classes=get_model_classes)
    use_for_linears(model)  # (opt-in: DSV4_MX_GEMV_KERNEL; nothing changes when unset)
    return model


def load_tokenizer(path, eos_token_ids=(1,)):
    """The V4 tokenizer of a model folder in mlx-lm's `TokenizerWrapper`.

    Built from the fast-tokenizer class directly: `AutoTokenizer` would parse the model's
    config.json through transformers' config class, which rejects schedules it does not know
    (any HCA rate other than 128). The V4 tokenizer is byte-level BPE, so mlx-lm's BPE streaming
    detokenizer applies. The prompt string carries the BOS (spec §7.1): no special tokens are
    added on encode.
    """
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    return TokenizerWrapper(tok, BPEStreamingDetokenizer, eos_token_ids=list(eos_token_ids))


def load(path, lazy: bool = False) -> Tuple[object, object]:
    """Load a folder written by `dsv4 convert` (or `dsv4 demo-model`)."""
    model = load_model(path, lazy=lazy)
    eos = model.args.eos_token_id
    tokenizer = load_tokenizer(Path(path), [eos] if isinstance(eos, int) else eos)
    return model, tokenizer
