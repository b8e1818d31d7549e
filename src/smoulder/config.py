"""The one place that holds configuration: defaults, named presets, files and the command line.

Precedence, lowest first: ``configs/default.yaml`` (shipped), the ``--fast`` preset, a
``--config FILE`` (a path or a shipped preset name such as ``slurm``), a ``--plugin-config
FILE`` (Nipype plugin and its arguments), then command-line values.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

from smoulder.devices import available_cpus
from smoulder.errors import ConfigError

Config = dict[str, Any]

#: Nipype execution plugins (``<name>Plugin`` in ``nipype.pipeline.plugins``).
PLUGINS = (
    "Linear",
    "MultiProc",
    "LegacyMultiProc",
    "SLURM",
    "SLURMGraph",
    "SGE",
    "SGEGraph",
    "PBS",
    "PBSGraph",
    "LSF",
    "Condor",
    "DAGMan",
    "OAR",
    "IPython",
)
_CHOICES = {
    "registration.engine": ("auto", "greedy", "torch", "ants"),
    "registration.session.transform": ("rigid", "affine"),
    "registration.session.metric": ("mi", "ncc"),
    "registration.longitudinal.transform": ("deformable", "affine", "rigid"),
    "registration.longitudinal.pairs": ("baseline", "consecutive"),
}
#: Modalities that can be co-registered onto the session reference.
SESSION_MODALITIES = ("T1w", "UNIT1", "MEGRE")


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


def load_plugin_config(source: str | Path) -> Config:
    """Return ``{"plugin": name, "plugin_args": {...}}`` read from a YAML or JSON file.

    The file names a Nipype plugin and its arguments, e.g.::

        plugin: SLURM
        plugin_args:
          sbatch_args: "--time=01:00:00 --mem=8G"

    Raises:
        ConfigError: the file is missing or unreadable, names an unknown plugin, or holds keys
            other than ``plugin`` and ``plugin_args``.
    """
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{path}: expected a YAML/JSON plugin file, found no such file")
    data = load_yaml(path)  # JSON is YAML
    unknown = sorted(set(data) - {"plugin", "plugin_args"})
    if unknown:
        raise ConfigError(f"{path}: expected only 'plugin' and 'plugin_args', found {unknown}")
    if "plugin" not in data:
        raise ConfigError(f"{path}: expected a 'plugin' key (one of {', '.join(PLUGINS)})")
    args = data.get("plugin_args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"{path}: plugin_args must be a mapping, found {args!r}")
    out = {"plugin": data["plugin"], "plugin_args": args}
    _check_plugin(out["plugin"], where=f"{path}: plugin")
    return out


def _check_plugin(name: Any, *, where: str) -> None:
    if name not in PLUGINS:
        raise ConfigError(f"{where}: expected one of {', '.join(PLUGINS)}, found {name!r}")


def _get(cfg: Config, dotted: str) -> Any:
    value: Any = cfg
    for key in dotted.split("."):
        value = value[key]
    return value


def validate(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming the first invalid value in ``cfg``."""
    ex = cfg["execution"]
    if ex["device"] not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"execution.device: expected auto, cpu or cuda, found {ex['device']!r}")
    for key in ("nprocs", "omp_nthreads", "gpu_slots"):
        if ex[key] is not None and (not _is_int(ex[key]) or ex[key] < 1):
            raise ConfigError(f"execution.{key}: expected a positive integer, found {ex[key]!r}")
    if ex["mem_gb"] is not None and not (
        isinstance(ex["mem_gb"], int | float) and ex["mem_gb"] > 0
    ):
        raise ConfigError(f"execution.mem_gb: expected a positive number, found {ex['mem_gb']!r}")
    _check_plugin(ex["plugin"], where="execution.plugin")
    if not isinstance(ex["plugin_args"], dict):
        raise ConfigError(f"execution.plugin_args: expected a mapping, found {ex['plugin_args']!r}")
    for key in ("stop_on_first_crash", "resource_monitor"):
        if not isinstance(ex[key], bool):
            raise ConfigError(f"execution.{key}: expected true or false, found {ex[key]!r}")
    for dotted, choices in _CHOICES.items():
        value = _get(cfg, dotted)
        if value not in choices:
            raise ConfigError(f"{dotted}: expected one of {', '.join(choices)}, found {value!r}")
    seed = cfg["registration"]["seed"]
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"registration.seed: expected an integer >= 0, found {seed!r}")
    for part in ("session", "longitudinal"):
        value = cfg["registration"][part]["resolution_mm"]
        if value is not None and not (isinstance(value, int | float) and 0 < value <= 20):
            raise ConfigError(
                f"registration.{part}.resolution_mm: expected null or a voxel size in mm "
                f"(0, 20], found {value!r}"
            )
    qsm = cfg["qsm"]
    if not isinstance(qsm["enabled"], bool):
        raise ConfigError(f"qsm.enabled: expected true or false, found {qsm['enabled']!r}")
    if qsm["method"] not in ("tv", "tkd"):
        raise ConfigError(f"qsm.method: expected tv or tkd, found {qsm['method']!r}")
    if qsm.get("reference", "csf") not in ("csf", "mask"):
        raise ConfigError(f"qsm.reference: expected csf or mask, found {qsm['reference']!r}")
    seg = cfg["segmentation"]
    if not isinstance(seg["enabled"], bool):
        raise ConfigError(f"segmentation.enabled: expected true or false, found {seg['enabled']!r}")
    if seg["model"] is not None and not isinstance(seg["model"], str):
        raise ConfigError(f"segmentation.model: expected null or a folder, found {seg['model']!r}")
    if not isinstance(seg.get("refine", True), bool):
        raise ConfigError(f"segmentation.refine: expected true or false, found {seg['refine']!r}")
    value = seg["min_lesion_ul"]
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"segmentation.min_lesion_ul: expected a number >= 0, found {value!r}")
    modalities = cfg["registration"]["session"]["modalities"]
    if not isinstance(modalities, list) or not set(modalities) <= set(SESSION_MODALITIES):
        raise ConfigError(
            "registration.session.modalities: expected a list drawn from "
            f"{', '.join(SESSION_MODALITIES)}, found {modalities!r}"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def omp_threads(cfg: Config) -> int:
    """Return the threads one step may use: ``omp_nthreads``, else half of the processes.

    Half (at most 8) lets two steps, e.g. two sessions' registrations, run side by side, which
    on small images uses the cores better than one step with every thread.
    """
    ex = cfg["execution"]
    nprocs = ex["nprocs"] or available_cpus()
    if ex["omp_nthreads"]:
        return min(int(ex["omp_nthreads"]), nprocs)
    return max(1, min(8, nprocs // 2))


def dump(cfg: Config) -> str:
    """Return ``cfg`` as YAML text."""
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False)
