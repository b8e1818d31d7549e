"""The one place that holds configuration: defaults, named presets, files and the command line.

Precedence, lowest first: ``configs/default.yaml`` (shipped), the ``--fast`` preset, a
``--config FILE`` (a path or a shipped preset name such as ``slurm``), then command-line values.
"""

from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path
from typing import Any

from smoulder.errors import ConfigError

Config = dict[str, Any]


def preset_names() -> list[str]:
    """Return the names of the presets shipped in ``smoulder.configs``.

    Examples:
        >>> {"default", "fast", "cpu", "slurm"} <= set(preset_names())
        True
    """
    folder = resources.files("smoulder.configs")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_yaml(source: str | Path) -> Config:
    """Return the mapping in a YAML file, or in a shipped preset when ``source`` names one.

    Raises:
        ConfigError: the file does not exist, is not YAML, or does not hold a mapping.
    """
    import yaml

    name = str(source)
    path = Path(name)
    if not path.exists() and name in preset_names():
        text = resources.files("smoulder.configs").joinpath(f"{name}.yaml").read_text()
        origin = f"preset '{name}'"
    elif path.exists():
        text = path.read_text()
        origin = str(path)
    else:
        raise ConfigError(
            f"{name}: expected a YAML file or one of the presets {preset_names()}, found neither"
        )
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: expected YAML, found a syntax error: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections, found {type(data).__name__}")
    return data


def merge(base: Config, override: Config, *, where: str = "") -> Config:
    """Return ``base`` updated by ``override`` recursively; unknown keys are refused.

    Examples:
        >>> merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}})
        {'a': {'b': 1, 'c': 3}}
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in out:
            known = ", ".join(sorted(out))
            raise ConfigError(f"unknown configuration key '{where}{key}' (known: {known})")
        if isinstance(out[key], dict) and key != "plugin_args":
            if not isinstance(value, dict):
                raise ConfigError(f"'{where}{key}' must be a mapping, found {value!r}")
            out[key] = merge(out[key], value, where=f"{where}{key}.")
        else:
            out[key] = value
    return out


def resolve(
    *, config_file: str | Path | None = None, fast: bool = False, overrides: Config | None = None
) -> Config:
    """Return the resolved configuration (defaults ← fast ← file ← overrides), validated."""
    cfg = load_yaml("default")
    if fast:
        cfg = merge(cfg, load_yaml("fast"))
    if config_file is not None:
        cfg = merge(cfg, load_yaml(config_file))
    if overrides:
        cfg = merge(cfg, {k: v for k, v in overrides.items() if v is not None})
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming the first invalid value in ``cfg``."""
    ex = cfg["execution"]
    if ex["device"] not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"execution.device: expected auto, cpu or cuda, found {ex['device']!r}")
    for key in ("nprocs", "omp_nthreads"):
        if ex[key] is not None and (not isinstance(ex[key], int) or ex[key] < 1):
            raise ConfigError(f"execution.{key}: expected a positive integer, found {ex[key]!r}")
    if ex["mem_gb"] is not None and not (
        isinstance(ex["mem_gb"], int | float) and ex["mem_gb"] > 0
    ):
        raise ConfigError(f"execution.mem_gb: expected a positive number, found {ex['mem_gb']!r}")


def available_cpus() -> int:
    """Return the number of CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_device(requested: str) -> str:
    """Return ``cuda`` or ``cpu`` for a requested device (``auto`` picks CUDA when present).

    Raises:
        ConfigError: CUDA was requested but is not available.
    """
    if requested == "cpu":
        return "cpu"
    import torch  # deferred: torch takes seconds to import

    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise ConfigError("--device cuda: expected a CUDA GPU visible to PyTorch, found none")
    return "cuda" if has_cuda else "cpu"


def dump(cfg: Config) -> str:
    """Return ``cfg`` as YAML text."""
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False)
