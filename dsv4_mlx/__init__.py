"""dsv4-mlx: DeepSeek-V4 on Apple MLX."""

__version__ = "0.1.0"


def load(path, lazy: bool = False):
    """A converted model folder -> (model, tokenizer) ready to generate."""
    from .loader import load as _load

    return _load(path, lazy=lazy)
