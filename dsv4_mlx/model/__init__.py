"""The DeepSeek-V4 model in MLX. Read next to the spec, section by section:

config (§2) · rope (§4.4) · mhc (§4.2-4.3) · attention (§4.5, §4.8, §4.9) · compressor (§4.6)
· indexer (§4.7) · moe (§4.10) · kv_formats (§4.13) · model (§4.1, §4.11, §4.12).
"""

from .config import ConfigError, ModelArgs

__all__ = ["Model", "ModelArgs", "ConfigError", "WeightsError"]


def __getattr__(name):  # lazy: dsv4_mlx.cache imports kv_formats from this package
    if name in ("Model", "WeightsError"):
        from . import model

        return getattr(model, name)
    raise AttributeError(name)
