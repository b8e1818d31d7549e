"""The one place that holds configuration: defaults, named presets, files and the command line.

Precedence, lowest first: ``configs/default.yaml`` (shipped), the ``--fast`` preset, a
``--config FILE`` (a path or a shipped preset name such as ``slurm``), a ``--plugin-config
FILE`` (Nipype plugin and its arguments), then command-line values.

The resolved configuration is a :class:`Config`: frozen dataclasses whose field names are the
YAML keys, so code reads ``cfg.registration.session.transform``. Each field's type and its
:class:`Accepts` (choices, bounds) are the one statement of what a setting accepts: a wrong
value is refused with its dotted key and what was expected, generated from them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_args, get_origin, get_type_hints

from smoulder.devices import DEVICES, available_cpus
from smoulder.errors import ConfigError
from smoulder.registration import ENGINES

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

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
#: Modalities that can be co-registered onto the session reference.
SESSION_MODALITIES = ("T1w", "UNIT1", "MEGRE")

_Section = TypeVar("_Section", bound="DataclassInstance")


# ------------------------------------------------------------------------------ what is accepted


@dataclass(frozen=True)
class Accepts:
    """What a setting accepts beyond its type: one of ``choices``, or a number within bounds.

    Attributes:
        choices: the accepted values (of a list setting: of each item).
        minimum: the value must be ``>= minimum``.
        above: the value must be ``> above``.
        most: the value must be ``<= most``.

    Examples:
        >>> Accepts(above=0, most=20).bounds()
        ' in (0, 20]'
        >>> Accepts(minimum=1).within(0)
        False
    """

    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    above: float | None = None
    most: float | None = None

    def bounds(self) -> str:
        """Return the bounds as text appended to a noun (``' >= 1'``, ``' in (0, 20]'``)."""
        if self.above is not None and self.most is not None:
            return f" in ({self.above:g}, {self.most:g}]"
        if self.above is not None:
            return f" > {self.above:g}"
        if self.minimum is not None:
            return f" >= {self.minimum:g}"
        return ""

    def within(self, value: float) -> bool:
        """Return whether a number lies within the bounds."""
        return (
            (self.minimum is None or value >= self.minimum)
            and (self.above is None or value > self.above)
            and (self.most is None or value <= self.most)
        )


def _accepts(**accepts: Any) -> dict[str, Accepts]:
    """Return a dataclass field's metadata: its value must also satisfy ``Accepts(**accepts)``.

    A field without it accepts any value of its type.
    """
    return {"accepts": Accepts(**accepts)}


#: How each type of setting is named in error messages.
_NOUNS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "a mapping",
}


def _is_a(kind: Any, value: Any) -> bool:
    """Return whether ``value`` is of the plain type ``kind`` (an int is a number, a bool not).

    Examples:
        >>> _is_a(float, 3), _is_a(int, True), _is_a(bool, False)
        (True, False, True)
    """
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _admits(kind: Any, value: Any, accepts: Accepts) -> bool:
    """Return whether ``value`` is a ``kind`` (a type hint, not optional) that ``accepts`` takes."""
    if get_origin(kind) is tuple:  # a list in YAML; every item is checked against the choices
        item = get_args(kind)[0]
        return isinstance(value, list | tuple) and all(_admits(item, v, accepts) for v in value)
    if not _is_a(get_origin(kind) or kind, value):
        return False
    if accepts.choices:
        return value in accepts.choices
    return not isinstance(value, int | float) or accepts.within(value)


def _expected(kind: Any, accepts: Accepts) -> str:
    """Return what a setting of type hint ``kind`` expects, in words.

    Examples:
        >>> _expected(tuple[str, ...], Accepts(choices=("T1w", "UNIT1")))
        'a list drawn from T1w, UNIT1'
        >>> _expected(float, Accepts(minimum=0))
        'a number >= 0'
    """
    if get_origin(kind) is tuple:
        if accepts.choices:
            return f"a list drawn from {', '.join(accepts.choices)}"
        return f"a list of {_NOUNS[get_args(kind)[0]].split(' ', 1)[1]}s"
    if accepts.choices:
        return f"one of {', '.join(accepts.choices)}"
    return _NOUNS[get_origin(kind) or kind] + accepts.bounds()


def _checked(hint: Any, value: Any, accepts: Accepts, dotted: str) -> Any:
    """Return a setting's value (lists as tuples, sections built) once its type admits it.

    Raises:
        ConfigError: naming ``dotted``, what was expected and what was found.
    """
    if isinstance(hint, type) and is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"'{dotted}' must be a mapping, found {value!r}")
        return _build(hint, value, where=f"{dotted}.")
    args = get_args(hint)
    optional = type(None) in args
    kind = next(a for a in args if a is not type(None)) if optional else hint
    if optional and value is None:
        return None
    if not _admits(kind, value, accepts):
        expected = ("null or " if optional else "") + _expected(kind, accepts)
        raise ConfigError(f"{dotted}: expected {expected}, found {value!r}")
    return tuple(value) if get_origin(kind) is tuple else value


def _build(section: type[_Section], data: Mapping[str, Any], *, where: str = "") -> _Section:
    """Return the settings dataclass ``section`` made from the mapping ``data``, checked.

    Raises:
        ConfigError: an unknown or missing key, or a value the field does not accept.
    """
    known = [f.name for f in fields(section)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown configuration key '{where}{unknown[0]}' (known: {', '.join(sorted(known))})"
        )
    hints = get_type_hints(section)
    values = {}
    for f in fields(section):
        if f.name not in data:
            raise ConfigError(f"{where}{f.name}: expected a value, found none")
        accepts = f.metadata.get("accepts", Accepts())
        values[f.name] = _checked(hints[f.name], data[f.name], accepts, f"{where}{f.name}")
    return section(**values)


# ------------------------------------------------------------------------------------ sections


@dataclass(frozen=True)
class ExecutionSettings:
    """How the workflow runs: processes, threads, memory, device and the Nipype plugin."""

    nprocs: int | None = field(metadata=_accepts(minimum=1))
    omp_nthreads: int | None = field(metadata=_accepts(minimum=1))
    mem_gb: float | None = field(metadata=_accepts(above=0))
    device: str = field(metadata=_accepts(choices=DEVICES))
    gpu_slots: int | None = field(metadata=_accepts(minimum=1))
    plugin: str = field(metadata=_accepts(choices=PLUGINS))
    #: read-only by convention: the plugin's own keyword arguments
    plugin_args: dict[str, Any]
    stop_on_first_crash: bool
    resource_monitor: bool


@dataclass(frozen=True)
class InputSettings:
    """How inputs are checked before running."""

    read_data: bool


@dataclass(frozen=True)
class SessionRegistration:
    """Co-registration of a session's other images onto its reference (FLAIR)."""

    modalities: tuple[str, ...] = field(metadata=_accepts(choices=SESSION_MODALITIES))
    transform: str = field(metadata=_accepts(choices=("rigid", "affine")))
    metric: str = field(metadata=_accepts(choices=("mi", "ncc")))
    resolution_mm: float | None = field(metadata=_accepts(above=0, most=20))


@dataclass(frozen=True)
class LongitudinalRegistration:
    """Registration of a subject's sessions to each other through a halfway space."""

    transform: str = field(metadata=_accepts(choices=("deformable", "affine", "rigid")))
    pairs: str = field(metadata=_accepts(choices=("baseline", "consecutive")))
    resolution_mm: float | None = field(metadata=_accepts(above=0, most=20))
    finest: bool


@dataclass(frozen=True)
class RegistrationSettings:
    """The registration engine, its seed, and the session and longitudinal registrations."""

    engine: str = field(metadata=_accepts(choices=ENGINES))
    seed: int = field(metadata=_accepts(minimum=0))
    session: SessionRegistration
    longitudinal: LongitudinalRegistration


@dataclass(frozen=True)
class SegmentationSettings:
    """Brain mask, tissue classes and lesions: whether, with which model, and how."""

    enabled: bool
    model: str | None
    min_lesion_ul: float = field(metadata=_accepts(minimum=0))
    min_lesion_voxels: int = field(metadata=_accepts(minimum=1))
    refine: bool


@dataclass(frozen=True)
class QSMSettings:
    """Susceptibility mapping from the multi-echo GRE: whether, how, and its zero."""

    enabled: bool
    method: str = field(metadata=_accepts(choices=("tv", "tkd")))
    reference: str = field(metadata=_accepts(choices=("csf", "mask")))


@dataclass(frozen=True)
class RimsSettings:
    """Paramagnetic rim lesions: whether, with which classifier, and on which image."""

    enabled: bool
    model: str | None
    input: str = field(metadata=_accepts(choices=("auto", "qsm", "phase")))


@dataclass(frozen=True)
class SELThresholds:
    """Slowly expanding lesion thresholds (:class:`smoulder.longitudinal.sel.SELSettings`)."""

    seed_pct_per_year: float = field(metadata=_accepts(above=0))
    grow_pct_per_year: float = field(metadata=_accepts(above=0))
    min_voxels: int = field(metadata=_accepts(minimum=1))
    min_mean_pct_per_year: float = field(metadata=_accepts(minimum=0))
    min_concentricity: float = field(metadata=_accepts(minimum=0, most=1))
    min_constancy: float = field(metadata=_accepts(minimum=0, most=1))


@dataclass(frozen=True)
class LongitudinalSettings:
    """Lesion activity over a subject's sessions: tracking, fates and SEL
    (:class:`smoulder.longitudinal.activity.ActivitySettings`)."""

    enabled: bool
    change_pct_per_year: float = field(metadata=_accepts(above=0))
    new_min_z: float = field(metadata=_accepts(minimum=0))
    growth_min_z: float = field(metadata=_accepts(minimum=0))
    min_new_voxels: int = field(metadata=_accepts(minimum=1))
    sel: SELThresholds


@dataclass(frozen=True)
class AtrophySettings:
    """Brain, grey-matter and cord volumes per session and their change within the subject
    (:mod:`smoulder.atrophy`, :mod:`smoulder.cord`)."""

    enabled: bool
    registration_mm: float | None = field(metadata=_accepts(above=0, most=20))
    pbvc_method: str = field(metadata=_accepts(choices=("jacobian", "boundary_shift")))
    boundary_shift: bool
    standard_icv_ml: float = field(metadata=_accepts(above=0))
    cord_level_below_anchor_mm: float = field(metadata=_accepts(minimum=0))
    cord_length_mm: float = field(metadata=_accepts(above=0))


@dataclass(frozen=True)
class PhantomSettings:
    """The dataset ``smoulder phantom`` writes (PhantomConfig keys; it checks their ranges)."""

    subjects: int
    sessions: int
    interval_years: float
    seed: int
    resolution_mm: float
    flair_slice_mm: float | None
    gre_voxel_mm: float | None
    gre_tilt_deg: float
    gre_slab_mm: float | None
    echo_times_ms: tuple[float, ...]
    lesions: int
    new_lesions_per_session: int
    pbvc_per_year: float
    gm_extra_change_per_year: float
    cord_loss_per_year_pct: float
    snr: float


@dataclass(frozen=True)
class Config:
    """The resolved configuration: one section per top-level key of ``configs/default.yaml``.

    Examples:
        >>> cfg = resolve(overrides={"registration": {"session": {"modalities": ["T1w"]}}})
        >>> cfg.registration.session.modalities, cfg.registration.session.transform
        (('T1w',), 'rigid')
    """

    execution: ExecutionSettings
    inputs: InputSettings
    registration: RegistrationSettings
    segmentation: SegmentationSettings
    qsm: QSMSettings
    rims: RimsSettings
    longitudinal: LongitudinalSettings
    atrophy: AtrophySettings
    phantom: PhantomSettings


# ------------------------------------------------------------------------------------ loading


def preset_names() -> list[str]:
    """Return the names of the presets shipped in ``smoulder.configs``.

    Examples:
        >>> {"default", "fast", "cpu", "slurm"} <= set(preset_names())
        True
    """
    folder = resources.files("smoulder.configs")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_yaml(source: str | Path) -> dict[str, Any]:
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


def merge(base: dict[str, Any], override: Mapping[str, Any], *, where: str = "") -> dict[str, Any]:
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
    *,
    config_file: str | Path | None = None,
    fast: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Return the resolved configuration (defaults ← fast ← file ← overrides), checked.

    Args:
        config_file: a YAML file, or the name of a shipped preset.
        fast: apply the ``fast`` preset before ``config_file``.
        overrides: nested sections as the command line gives them (a section set to ``None``
            is left out).

    Raises:
        ConfigError: an unknown key or an invalid value, named by its dotted key.
    """
    data = load_yaml("default")
    if fast:
        data = merge(data, load_yaml("fast"))
    if config_file is not None:
        data = merge(data, load_yaml(config_file))
    if overrides:
        data = merge(data, {k: v for k, v in overrides.items() if v is not None})
    return _build(Config, data)


def load_plugin_config(source: str | Path) -> dict[str, Any]:
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


def omp_threads(cfg: Config) -> int:
    """Return the threads one step may use: ``omp_nthreads``, else half of the processes.

    Half (at most 8) lets two steps, e.g. two sessions' registrations, run side by side, which
    on small images uses the cores better than one step with every thread.

    Examples:
        >>> omp_threads(resolve(overrides={"execution": {"nprocs": 6}}))
        3
    """
    ex = cfg.execution
    nprocs = ex.nprocs or available_cpus()
    if ex.omp_nthreads:
        return min(int(ex.omp_nthreads), nprocs)
    return max(1, min(8, nprocs // 2))


def as_dict(settings: Any) -> dict[str, Any]:
    """Return a :class:`Config` (or one of its sections) as plain YAML data: dicts and lists.

    Examples:
        >>> as_dict(resolve().registration.session)["modalities"]
        ['T1w', 'UNIT1', 'MEGRE']
    """
    return {f.name: _plain(getattr(settings, f.name)) for f in fields(settings)}


def _plain(value: Any) -> Any:
    """Return a setting's value as plain data (sections as dicts, tuples as lists)."""
    if is_dataclass(value):
        return as_dict(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


def dump(cfg: Config | Mapping[str, Any]) -> str:
    """Return a configuration (a :class:`Config` or its :func:`as_dict` form) as YAML text."""
    import yaml

    data = as_dict(cfg) if isinstance(cfg, Config) else dict(cfg)
    return yaml.safe_dump(data, sort_keys=False)
