"""The rim classifier and its MONAI bundle: build, save, load, predict with flip TTA.

The network reads one lesion patch, ``float32 (4, 24, 24, 24)`` in the channel order of
:data:`smoulder.rims.patches.CHANNELS` (susceptibility, magnitude, FLAIR, mask; the patch
contract of :mod:`smoulder.rims.patches`), and returns one logit: how likely the lesion carries
a paramagnetic rim. It is MONAI's ``Classifier`` (strided residual units, then one linear
layer), small enough for a 2-core CPU. :func:`predict` averages the logits over the 8 flips of
the three patch axes (test-time augmentation) and maps the mean logit through the bundle's
:class:`~smoulder.rims.calibration.Calibration` to a probability.

A bundle is a folder in the MONAI bundle layout (as ``models/smoulder_seg``):

- ``configs/metadata.json``: version, inputs (channels, patch shape, normalisation), output,
  ``network_def`` (MONAI ``Classifier`` arguments), how it was trained;
- ``configs/inference.json``: test-time augmentation, the calibration and the three operating
  points (``balanced``, ``high_specificity``, ``high_sensitivity``: call a rim where the
  calibrated probability is ``>=`` the threshold);
- ``models/model.pt``: the weights (a ``state_dict`` in half precision);
- ``docs/README.md``: the model card (written from the metadata; edit it for a shipped model).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smoulder.errors import InputError
from smoulder.rims.calibration import (
    OPERATING_POINTS,
    Calibration,
    Fusion,
    StratifiedCalibration,
)
from smoulder.rims.patches import CHANNELS, PATCH_SHAPE

if TYPE_CHECKING:
    import torch

#: The rim bundle shipped with the package (``smoulder.models``), once trained.
DEFAULT_BUNDLE = "smoulder_prl"

#: The flips of test-time augmentation: every subset of the three spatial axes (8).
FLIPS: tuple[tuple[int, ...], ...] = tuple(
    axes for n in range(4) for axes in itertools.combinations((2, 3, 4), n)
)


@dataclass(frozen=True)
class RimNetworkDef:
    """Arguments of MONAI's ``Classifier`` (3D residual units, one logit out).

    The default has 0.59 M parameters: four stride-2 levels take the 24³ patch to 2³, then one
    linear layer. 8-flip TTA on 100 lesions took 1.1 s on one CPU thread and 3.0-3.9 s on two
    (2-core machine shared with other jobs, 2026-12-06); a 3-level 16-32-64 network (0.14 M)
    was no faster, MONAI's ``ResNet`` with one basic block per level (8-16-32-64, 0.23 M)
    took 13 s.
    """

    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 1

    def build(self) -> torch.nn.Module:
        """Return the network with random weights."""
        from monai.networks.nets import Classifier

        return Classifier(
            in_shape=(len(CHANNELS), *PATCH_SHAPE),
            classes=1,
            channels=self.channels,
            strides=self.strides,
            num_res_units=self.num_res_units,
        )

    def to_json(self) -> dict[str, Any]:
        """Return the ``network_def`` entry of ``metadata.json``."""
        return {
            "_target_": "Classifier",
            "in_shape": [len(CHANNELS), *PATCH_SHAPE],
            "classes": 1,
            "channels": list(self.channels),
            "strides": list(self.strides),
            "num_res_units": self.num_res_units,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RimNetworkDef:
        """Return the definition that :meth:`to_json` wrote (raises on another network)."""
        if data.get("_target_") != "Classifier" or list(data.get("in_shape", [])) != [
            len(CHANNELS),
            *PATCH_SHAPE,
        ]:
            raise KeyError(
                f"a Classifier on {[len(CHANNELS), *PATCH_SHAPE]} patches, found "
                f"{data.get('_target_')} on {data.get('in_shape')}"
            )
        return cls(tuple(data["channels"]), tuple(data["strides"]), int(data["num_res_units"]))


@dataclass
class RimBundle:
    """A loaded rim bundle: the network in evaluation mode, its calibration and thresholds."""

    path: Path
    network: torch.nn.Module
    network_def: RimNetworkDef
    #: the pooled map and those of the acquisition strata that have their own
    calibration: StratifiedCalibration
    operating_points: dict[str, float]
    metadata: dict[str, Any] = field(default_factory=dict)
    #: the logistic regression of logit and rule-based measures (``None``: the logit alone)
    fusion: Fusion | None = None

    @property
    def version(self) -> str:
        """The bundle's version (``metadata.json``)."""
        return str(self.metadata.get("version", "unknown"))


def count_parameters(network: torch.nn.Module) -> int:
    """Return the number of trainable parameters of ``network``.

    Examples:
        >>> count_parameters(RimNetworkDef().build())
        585572
    """
    return int(sum(p.numel() for p in network.parameters() if p.requires_grad))


def _metadata(
    network_def: RimNetworkDef,
    calibration: Calibration | StratifiedCalibration,
    extra: dict[str, Any],
) -> dict[str, Any]:
    import monai
    import torch

    extra = dict(extra)
    return {
        "version": extra.pop("version", "0.1.0"),
        "monai_version": str(monai.__version__),
        "pytorch_version": torch.__version__.split("+")[0],
        "name": "smoulder paramagnetic rim lesion classifier",
        "task": "probability that a white-matter lesion carries a paramagnetic rim, "
        "from a patch of susceptibility (QSM or filtered phase), GRE magnitude, FLAIR and mask",
        "network_def": network_def.to_json(),
        "network_data_format": {
            "inputs": {
                "patch": {
                    "type": "image",
                    "format": "magnitude",
                    "num_channels": len(CHANNELS),
                    "channel_def": dict(enumerate(CHANNELS)),
                    "spatial_shape": list(PATCH_SHAPE),
                    "dtype": "float32",
                    "value_range": "susceptibility: chi (ppm) or filtered phase (rad), "
                    "paramagnetic positive, divided by the MAD of the perilesional white-matter "
                    "shell; magnitude and FLAIR divided by their median in the box; mask in "
                    "[0, 1] (smoulder.rims.patches)",
                    "spacing": "the lesion's box plus >= 3 mm, resampled to the patch shape, "
                    "in the susceptibility image's native grid",
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classification",
                    "num_channels": 1,
                    "channel_def": {"0": "paramagnetic rim"},
                    "value_range": [0, 1],
                    "calibration": calibration.method,
                }
            },
        },
        **extra,
    }


def _model_card(
    meta: dict[str, Any],
    calibration: Calibration | StratifiedCalibration,
    points: dict[str, float],
    fusion: Fusion | None = None,
) -> str:
    net = meta["network_def"]
    training = meta.get("training", {})
    lines = [
        f"# Model card: rim classifier {meta['version']}",
        "",
        f"- task: {meta['task']}",
        f"- architecture: MONAI `Classifier`, channels {net['channels']}, strides "
        f"{net['strides']}, {net['num_res_units']} residual unit(s) per level",
        f"- inputs: {', '.join(CHANNELS)} ({'x'.join(map(str, PATCH_SHAPE))} voxels)",
        "- output: calibrated probability of a paramagnetic rim (mean logit over 8 flips, "
        + (
            f"fused with the rule-based measures {', '.join(fusion.features)} by logistic "
            "regression, "
            if fusion is not None
            else ""
        )
        + f"then `{calibration.method}` calibration)",
        "- operating points (call a rim where probability >= threshold): "
        + ", ".join(f"{k} {points[k]:.3f}" for k in OPERATING_POINTS if k in points),
        "",
        "## Training and validation",
        "",
        "```json",
        json.dumps(training, indent=1, default=str),
        "```",
    ]
    for key, title in (("recalibrated", "Recalibration"), ("fine_tuned", "Fine-tuning")):
        if key in meta:
            text = json.dumps(meta[key], indent=1, default=str)
            lines += ["", f"## {title}", "", "```json", text, "```"]
    return "\n".join(lines) + "\n"


def save_bundle(
    folder: str | Path,
    network: torch.nn.Module,
    calibration: Calibration | StratifiedCalibration,
    operating_points: dict[str, float],
    metadata: dict[str, Any],
    *,
    network_def: RimNetworkDef = RimNetworkDef(),
    fusion: Fusion | None = None,
) -> Path:
    """Write a rim bundle (configs, half-precision weights, model card); return ``folder``.

    Args:
        folder: the bundle folder (created).
        network: the trained network, built by ``network_def``.
        calibration: the map from mean logit to probability.
        operating_points: thresholds named by :data:`~smoulder.rims.calibration.OPERATING_POINTS`.
        metadata: extra ``metadata.json`` entries (``version``, ``training``, ``changelog``...).
        network_def: the network's definition.
        fusion: the logistic regression of the logit and the rule-based measures that the
            calibration follows; ``None``: the calibration reads the logit alone.
    """
    import torch

    from smoulder.images import atomic_path, save_json, save_text

    missing = [k for k in OPERATING_POINTS if k not in operating_points]
    if missing:
        raise ValueError(f"operating points: expected {OPERATING_POINTS}, missing {missing}")
    root = Path(folder)
    meta = _metadata(network_def, calibration, metadata)
    save_json(meta, root / "configs" / "metadata.json")
    save_json(
        {
            "tta": {"flips": [list(f) for f in FLIPS], "combine": "mean logit"},
            "batch_size": 64,
            "calibration": calibration.to_json(),
            "operating_points": {k: float(operating_points[k]) for k in OPERATING_POINTS},
            **({"fusion": fusion.to_json()} if fusion is not None else {}),
        },
        root / "configs" / "inference.json",
    )
    state = network.state_dict()
    half = {k: (v.detach().cpu().half() if v.is_floating_point() else v) for k, v in state.items()}
    with atomic_path(root / "models" / "model.pt") as tmp:
        torch.save(half, tmp)
    save_text(_model_card(meta, calibration, operating_points, fusion), root / "docs" / "README.md")
    return root


def load_bundle(folder: str | Path | None = None, device: str = "cpu") -> RimBundle:
    """Return the rim bundle ``folder`` (a path or a shipped name) on ``device``.

    Raises:
        InputError: a missing or unreadable file of the bundle, metadata of another network,
            or weights that do not fit the network its metadata describes.
    """

    from smoulder.segmentation.network import bundle_dir, load_weights

    root = bundle_dir(folder if folder is not None else DEFAULT_BUNDLE)
    meta_file, inf_file = root / "configs" / "metadata.json", root / "configs" / "inference.json"
    weights = root / "models" / "model.pt"
    for f in (meta_file, inf_file, weights):
        if not f.is_file():
            raise InputError(str(f), expected="a file of the rim bundle", found="no such file")
    try:
        meta = json.loads(meta_file.read_text())
        network_def = RimNetworkDef.from_json(meta["network_def"])
        inference = json.loads(inf_file.read_text())
        calibration = StratifiedCalibration.from_json(inference["calibration"])
        points = {k: float(inference["operating_points"][k]) for k in OPERATING_POINTS}
        fusion = Fusion.from_json(inference["fusion"]) if "fusion" in inference else None
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(
            str(root / "configs"),
            expected="rim-bundle configs (a Classifier network_def, calibration, operating points)",
            found=f"{type(exc).__name__}: {exc}",
        ) from exc
    network = network_def.build()
    load_weights(
        network,
        weights,
        expected=f"weights of the Classifier in {meta_file.name} "
        f"(channels {list(network_def.channels)})",
    )
    network.to(device).eval()
    return RimBundle(root, network, network_def, calibration, points, meta, fusion)


def check_patches(patches: np.ndarray, where: str = "patches") -> np.ndarray:
    """Return ``patches`` as float32 ``(N, 4, 24, 24, 24)``, or raise naming the shape found.

    Examples:
        >>> check_patches(np.zeros((2, 4, 24, 24, 24), np.float16)).dtype
        dtype('float32')
        >>> check_patches(np.zeros((4, 24, 24, 24)))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        smoulder.errors.InputError: patches: expected (N, 4, 24, 24, 24) ..., found (4, 24, 24, 24)
    """
    arr = np.asarray(patches)
    if arr.ndim != 5 or arr.shape[1:] != (len(CHANNELS), *PATCH_SHAPE):
        raise InputError(
            where,
            expected=f"(N, {len(CHANNELS)}, {', '.join(map(str, PATCH_SHAPE))}) lesion patches "
            f"(channels {', '.join(CHANNELS)})",
            found=str(tuple(arr.shape)),
        )
    return arr.astype(np.float32, copy=False)


def predict_logits(
    network: torch.nn.Module,
    patches: np.ndarray,
    device: str = "cpu",
    *,
    tta: bool = True,
    batch_size: int = 64,
) -> np.ndarray:
    """Return the network's logit per patch (N,), averaged over the 8 flips when ``tta``.

    The network's training/evaluation mode is restored afterwards.
    """
    import torch

    x_all = check_patches(patches)
    flips = FLIPS if tta else ((),)
    was_training = network.training
    network.eval()
    out = np.empty(len(x_all), dtype=np.float64)
    try:
        with torch.inference_mode():
            for start in range(0, len(x_all), batch_size):
                x = torch.from_numpy(x_all[start : start + batch_size]).to(device)
                total = torch.zeros(len(x), device=device)
                for axes in flips:
                    total += network(torch.flip(x, axes) if axes else x).reshape(-1).float()
                out[start : start + len(x)] = (total / len(flips)).cpu().numpy()
    finally:
        network.train(was_training)
    return out


def predict(
    bundle: RimBundle,
    patches: np.ndarray,
    device: str = "cpu",
    tta: bool = True,
    batch_size: int = 64,
    *,
    features: np.ndarray | None = None,
    input_kind: str | None = None,
    b0_tesla: float | Sequence[float | None] | None = None,
) -> np.ndarray:
    """Return the calibrated rim probability of each patch (N,) under ``bundle``.

    Args:
        bundle: a loaded rim bundle (:func:`load_bundle`), on ``device``.
        patches: ``(N, 4, 24, 24, 24)`` lesion patches (:mod:`smoulder.rims.patches`).
        features: ``(N, F)`` rule-based measures of the same lesions
            (:meth:`smoulder.rims.rules.RimMeasures.features`); required by a bundle with a
            fusion, ignored otherwise.
        input_kind: ``qsm`` or ``phase``, the patches' susceptibility channel, and
        b0_tesla: the acquisition's field (one, or one per patch): the calibration stratum
            (:func:`smoulder.rims.calibration.stratum_keys`; ``None``: unknown, the pooled map).
        device: where the network runs (``cpu`` or ``cuda``).
        tta: average the logits over the 8 flips of the three axes.
        batch_size: patches per forward pass.

    Returns:
        Probabilities in [0, 1], float64; compare them with ``bundle.operating_points``.
    """
    logits = predict_logits(bundle.network, patches, device, tta=tta, batch_size=batch_size)
    if bundle.fusion is not None:
        if features is None:
            raise ValueError(
                f"{bundle.path}: this bundle fuses the rule-based measures "
                f"({', '.join(bundle.fusion.features)}): pass features="
            )
        logits = bundle.fusion(logits, features)
    return bundle.calibration(logits, input_kind, b0_tesla)
