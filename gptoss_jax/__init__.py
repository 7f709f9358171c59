"""gptoss-jax: OpenAI's gpt-oss-20b / gpt-oss-120b in JAX and Flax NNX."""

from .api import load_model
from .checkpoint import CheckpointError, convert, write_random_checkpoint
from .config import GptOssConfig, load_config, preset
from .model import GptOss

__all__ = ["GptOss", "GptOssConfig", "CheckpointError", "convert", "load_config", "load_model", "preset",
           "write_random_checkpoint"]
