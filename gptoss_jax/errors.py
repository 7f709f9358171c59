"""User-facing error types (the CLI turns each into one `gptoss-jax <cmd>: error: ...` line)."""

from __future__ import annotations

import json
import os


class CheckpointError(ValueError):
    """A checkpoint that does not match the config: names the tensor and the file."""


class ConfigError(ValueError):
    """A config.json value of the wrong type or out of range: names the key (and the file)."""


def read_json_object(path: str, what: str = "", error: type[ValueError] = CheckpointError) -> dict:
    """A JSON file that must hold one object; any problem raises `error` naming the file."""
    what = f" ({what})" if what else ""
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{path}{what} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}{what} is not UTF-8 text: {e}") from None
    except IsADirectoryError:
        raise error(f"{path}{what} is a folder, expected a JSON file") from None
    if not isinstance(d, dict):
        raise error(f"{path}{what} must hold a JSON object, got a {type(d).__name__}")
    return d


def same_or_nested(a: str, b: str) -> bool:
    """True when the paths name the same file or folder, or one lies inside the other."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)
