"""The DeepSeek-V4 model in MLX. Read next to the spec, section by section:

config (§2) · rope (§4.4) · mhc (§4.2-4.3) · attention (§4.5, §4.8, §4.9) · compressor (§4.6)
· indexer (§4.7) · moe (§4.10) · model (§4.1, §4.11, §4.12).
"""

from .config import ConfigError, ModelArgs
from .model import Model, WeightsError

__all__ = ["Model", "ModelArgs", "ConfigError", "WeightsError"]
