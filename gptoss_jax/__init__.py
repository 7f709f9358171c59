"""gptoss-jax: OpenAI's gpt-oss-20b / gpt-oss-120b in JAX and Flax NNX."""

from .platforms import cpu_xla_flags as _cpu_xla_flags, quiet_native_logs as _quiet_native_logs

_cpu_xla_flags()  # before jax starts a backend: XLA reads XLA_FLAGS then

with _quiet_native_logs():  # jaxlib's CUDA modules log a line each as they load on a host without CUDA
    import jax as _jax  # noqa: F401  (first, so that the imports below find it loaded)

from .api import load_model
from .checkpoint import convert, save_checkpoint, write_random_checkpoint
from .errors import CheckpointError
from .config import GptOssConfig, load_config, preset
from .engine import Engine, RequestOutput, SamplingParams
from .generate import GenerationResult, generate, generate_stream
from .model import GptOss
from .runtime import Runtime
from .tokenizer import load_tokenizer

__all__ = ["GptOss", "GptOssConfig", "CheckpointError", "Engine", "GenerationResult", "RequestOutput", "SamplingParams",
           "convert", "generate",
           "generate_stream", "load_config", "load_model", "load_tokenizer", "preset", "Runtime", "save_checkpoint",
           "write_random_checkpoint"]
