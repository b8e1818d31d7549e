"""The segmentation network and its MONAI bundle: build, save, load with clear errors.

A bundle is a folder (``models/<name>/``) in the MONAI bundle layout:

- ``configs/metadata.json``: version, inputs (channels, spacing, normalisation), outputs
  (classes), network definition (``network_def``: MONAI ``UNet`` arguments);
- ``configs/inference.json``: sliding-window settings (ROI size, overlap, blending);
- ``models/model.pt``: the weights (a ``state_dict``, half precision to keep the repository light);
- ``docs/README.md``: the model card.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import UNet

from smoulder.errors import InputError
from smoulder.segmentation.candidates import CandidateClassifier
from smoulder.segmentation.classes import CLASSES
from smoulder.segmentation.synth import CHANNELS

#: The bundle shipped with the package (``smoulder.models``).
DEFAULT_BUNDLE = "smoulder_seg"


@dataclass(frozen=True)
class NetworkDef:
    """Arguments of MONAI's ``UNet`` (3D, residual units)."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1

    def build(self) -> torch.nn.Module:
        """Return the network with random weights."""
        return UNet(
            spatial_dims=3,
            in_channels=len(CHANNELS),
            out_channels=len(CLASSES),
            channels=self.channels,
            strides=self.strides,
            num_res_units=self.num_res_units,
        )


@dataclass(frozen=True)
class InferenceSettings:
    """Sliding-window settings (``configs/inference.json``)."""

    roi_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = 0.25
    mode: str = "gaussian"
    sw_batch_size: int = 1
    spacing_mm: float = 1.0


@dataclass
class Bundle:
    """A loaded bundle: the network in evaluation mode and its settings."""

    path: Path
    network: torch.nn.Module
    network_def: NetworkDef
    inference: InferenceSettings
    metadata: dict[str, Any] = field(default_factory=dict)
    #: the lesion-candidate classifier (``configs/candidates.json``), None where it has none
    candidates: CandidateClassifier | None = None

    @property
    def version(self) -> str:
        """The bundle's version (``metadata.json``)."""
        return str(self.metadata.get("version", "unknown"))


def bundle_dir(model: str | Path | None = None) -> Path:
    """Return the folder of bundle ``model``: a path, a shipped bundle name, or the default."""
    if model is not None and Path(model).is_dir():
        return Path(model)
    from importlib.resources import files

    name = DEFAULT_BUNDLE if model is None else str(model)
    path = Path(str(files("smoulder.models"))) / name
    if not path.is_dir():
        raise InputError(
            str(model),
            expected="a MONAI bundle folder or a shipped bundle name",
            found="no such folder",
        )
    return path


def metadata(network_def: NetworkDef, inference: InferenceSettings, **extra: Any) -> dict:
    """Return the ``metadata.json`` content of a bundle with this network."""
    return {
        "version": extra.pop("version", "0.1.0"),
        "monai_version": _monai_version(),
        "pytorch_version": torch.__version__.split("+")[0],
        "name": "smoulder brain, tissue and lesion segmentation",
        "task": "segmentation of brain tissue classes and white-matter lesions on FLAIR (+T1w)",
        "network_def": {
            "_target_": "UNet",
            "spatial_dims": 3,
            "in_channels": len(CHANNELS),
            "out_channels": len(CLASSES),
            "channels": list(network_def.channels),
            "strides": list(network_def.strides),
            "num_res_units": network_def.num_res_units,
        },
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "num_channels": len(CHANNELS),
                    "channel_def": dict(enumerate(CHANNELS)),
                    "spatial_shape": "any (sliding window)",
                    "dtype": "float32",
                    "value_range": "each image divided by the 99th percentile of its foreground "
                    "(smoulder.segmentation.synth.normalise); "
                    "T1w channel zero and flag 0 when absent",
                    "pixdim": [inference.spacing_mm] * 3,
                    "orientation": "RAS+",
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "segmentation",
                    "num_channels": len(CLASSES),
                    "channel_def": dict(enumerate(CLASSES)),
                    "spatial_shape": "as input",
                    "dtype": "float32",
                }
            },
        },
        **extra,
    }


def _monai_version() -> str:
    import monai

    return str(monai.__version__)


def save_bundle(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    network_def: NetworkDef,
    inference: InferenceSettings = InferenceSettings(),
    **extra: Any,
) -> Path:
    """Write a bundle (configs and half-precision weights) to ``path``; return ``path``."""
    from smoulder.images import save_json  # atomic writes

    root = Path(path)
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    save_json(metadata(network_def, inference, **extra), root / "configs" / "metadata.json")
    save_json(
        {
            "sliding_window": {
                "roi_size": list(inference.roi_size),
                "overlap": inference.overlap,
                "mode": inference.mode,
                "sw_batch_size": inference.sw_batch_size,
            },
            "spacing_mm": inference.spacing_mm,
        },
        root / "configs" / "inference.json",
    )
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in state_dict.items()}
    tmp = root / "models" / ".model.pt.tmp"
    torch.save(half, tmp)
    tmp.replace(root / "models" / "model.pt")
    return root


def load_bundle(model: str | Path | None = None, device: str = "cpu") -> Bundle:
    """Return the bundle ``model`` (see :func:`bundle_dir`) on ``device``, ready for inference.

    Raises:
        InputError: a missing or unreadable file of the bundle, or weights that do not fit the
            network its metadata describes (named, with what was expected and found).
    """
    root = bundle_dir(model)
    meta_file = root / "configs" / "metadata.json"
    weights = root / "models" / "model.pt"
    for f in (meta_file, weights):
        if not f.is_file():
            raise InputError(str(f), expected="a file of the MONAI bundle", found="no such file")
    try:
        meta = json.loads(meta_file.read_text())
        net_meta = meta["network_def"]
        network_def = NetworkDef(
            tuple(net_meta["channels"]), tuple(net_meta["strides"]), int(net_meta["num_res_units"])
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(
            str(meta_file),
            expected="bundle metadata with a network_def",
            found=f"{type(exc).__name__}: {exc}",
        ) from exc
    inference = InferenceSettings()
    inf_file = root / "configs" / "inference.json"
    if inf_file.is_file():
        cfg = json.loads(inf_file.read_text())
        sw = cfg.get("sliding_window", {})
        inference = InferenceSettings(
            roi_size=tuple(sw.get("roi_size", inference.roi_size)),
            overlap=float(sw.get("overlap", inference.overlap)),
            mode=str(sw.get("mode", inference.mode)),
            sw_batch_size=int(sw.get("sw_batch_size", inference.sw_batch_size)),
            spacing_mm=float(cfg.get("spacing_mm", inference.spacing_mm)),
        )
    network = network_def.build()
    load_weights(
        network,
        weights,
        expected=f"weights of the network in {meta_file.name} "
        f"(UNet channels {list(network_def.channels)})",
    )
    network.to(device).eval()
    cand_file = root / "configs" / "candidates.json"
    try:
        candidates = CandidateClassifier.load(cand_file)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(
            str(cand_file),
            expected="the lesion-candidate classifier (with_t1, flair_only)",
            found=f"{type(exc).__name__}: {exc}",
        ) from exc
    return Bundle(root, network, network_def, inference, meta, candidates)


def load_weights(network: Any, weights: Path, *, expected: str) -> None:
    """Load a bundle's half- or full-precision ``state_dict`` into ``network`` (as float32).

    Args:
        network: the built ``torch.nn.Module``.
        weights: the bundle's ``models/model.pt``.
        expected: what the weights should be, for the error message.

    Raises:
        InputError: the file is unreadable, or its weights do not fit ``network``.
    """
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise InputError(
            str(weights),
            expected="PyTorch weights (torch.save of a state_dict)",
            found=f"an unreadable file ({type(exc).__name__}: {exc})",
        ) from exc
    try:
        network.load_state_dict({k: v.float() for k, v in state.items()})
    except (RuntimeError, AttributeError) as exc:
        first = " ".join(str(exc).strip().splitlines()[:3])[:300]
        raise InputError(
            str(weights), expected=expected, found=f"weights that do not fit: {first}"
        ) from exc
