"""Architecture files: a JSON/YAML of config fields, or a CoreNet training YAML naming a released size."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import ConfigError, OptionError
from ..model.config import OpenELMConfig
from .fs import require_regular_file

MAX_ARCH_FILE_BYTES = 1 << 20


def read_arch_config(path: str | Path) -> OpenELMConfig:
    """An architecture from a JSON or YAML file.

    Accepts a flat dict with CoreNet's GPTConfig / Apple's config.json field names, or a CoreNet
    training YAML naming a released size (`model.language_modeling.general_gpt.model_name`).

    Raises:
        ConfigError: naming the file, when it cannot be read or is not a valid config.
    """
    import yaml

    path = require_regular_file(Path(path))
    if path.stat().st_size > MAX_ARCH_FILE_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes is too large for an architecture file")
    try:
        data = yaml.safe_load(path.read_bytes())  # JSON is YAML
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid JSON/YAML ({str(e)[:120]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields")
    data = _yaml_floats(data)
    gpt = data.get("model", {})
    for key in ("language_modeling", "general_gpt"):
        gpt = gpt.get(key, {}) if isinstance(gpt, dict) else {}
    try:
        if isinstance(gpt, dict) and "model_name" in gpt:
            # Next to model_name CoreNet keeps vocab_size (padded), max_context_length and training-only
            # entries such as padding_index; only architecture fields are taken.
            fields = {f.name for f in dataclasses.fields(OpenELMConfig) if f.init}
            overrides = {k: v for k, v in gpt.items() if k in fields}
            return OpenELMConfig.from_preset(str(gpt["model_name"]), **overrides)
        return OpenELMConfig.from_dict(data)
    except (ValueError, TypeError, KeyError) as e:  # a field of the wrong type fails in the arithmetic
        raise ConfigError(f"{path}: {e}") from None


def _yaml_floats(data: dict) -> dict:
    """PyYAML (YAML 1.1) reads `1e-06` as a string: take such strings as numbers in float fields."""
    floats = {f.name for f in dataclasses.fields(OpenELMConfig) if str(f.type) == "float"}
    out = dict(data)
    for k in floats & set(out):
        if isinstance(out[k], str):
            try:
                out[k] = float(out[k])
            except ValueError:
                pass  # reported by the config's own type check
    return out


def resolve_arch(arch: str | None, arch_config: str | Path | None) -> OpenELMConfig | None:
    """The architecture named by `arch` (a released size) or `arch_config` (a file), or None."""
    if arch and arch_config:
        raise OptionError("arch", "and arch_config cannot both be given")
    if arch:
        try:
            return OpenELMConfig.from_preset(arch)
        except ValueError as e:
            raise OptionError("arch", str(e)) from None
    return read_arch_config(arch_config) if arch_config else None
