"""dsv4-mlx: DeepSeek-V4 on Apple MLX."""

__version__ = "0.1.0"
