"""Nipype interfaces: each runs one library function on files and writes its outputs.

Every interface here is thin: load the inputs, call a function of the smoulder library, save
the result in the node's working directory. Inputs that change a result are hashed (changing
them reruns the node); ``num_threads`` is not (the result does not depend on it).

GPU steps: Nipype's MultiProc counts a node against ``n_gpu_procs`` when its interface has a
true ``use_gpu`` (or ``use_cuda``) input — ``Node.is_gpu_node()`` in nipype ≥ 1.9. The
device steps (registrations, segmentation, QSM) carry ``use_gpu``; the workflows set it when
the step runs on CUDA.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from smoulder.registration import ENGINES


def _stem(path: str | os.PathLike[str]) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".mat", ".txt"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _load_coarse(paths: list[str], resolution_mm: float) -> tuple[list[Any], list[Any]]:
    """Return the images at ``paths`` and their copies coarsened to ``resolution_mm`` (0: as is).

    The registrations estimate on the coarse copies (:func:`smoulder.images.coarsen`); the
    transforms map world points, so they apply to the originals unchanged.
    """
    from smoulder.images import coarsen, load_image

    images = [load_image(path) for path in paths]
    return images, [coarsen(img, resolution_mm) if resolution_mm > 0 else img for img in images]


def _engine_options(inputs: Any) -> dict[str, Any]:
    """Return the engine keywords of a registration's inputs (engine, device, seed, threads)."""
    return {
        "engine": inputs.engine,
        "device": inputs.device,
        "seed": inputs.seed,
        "threads": inputs.num_threads,
    }


# ------------------------------------------------------------------------------------- conform


class _ConformInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="3D NIfTI image, any orientation and type")


class _ConformOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the image with RAS+ voxel axes, float32")


class Conform(SimpleInterface):
    """Check an image and reorient it to RAS+ float32 (:func:`smoulder.images.conform`)."""

    input_spec = _ConformInputSpec
    output_spec = _ConformOutputSpec

    def _run_interface(self, runtime: Any) -> Any:
        import numpy as np

        from smoulder.images import conform, load_image, save_nifti

        img = conform(load_image(self.inputs.in_file))
        out = Path(runtime.cwd) / f"{_stem(self.inputs.in_file)}_conform.nii.gz"
        save_nifti(np.asarray(img.dataobj, dtype=np.float32), img.affine, out)
        self._results["out_file"] = str(out)
        return runtime


# -------------------------------------------------------------------------------- registration


class _DeviceInputSpec(BaseInterfaceInputSpec):
    """Inputs of a step that may run on the GPU (the workflows' ``device_inputs``)."""

    device = traits.Enum("cpu", "cuda", usedefault=True, desc="where the torch code runs")
    use_gpu = traits.Bool(
        False, usedefault=True, desc="the step runs on the GPU (MultiProc counts it in n_gpu_procs)"
    )
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="CPU threads")


class _RegistrationInputSpec(_DeviceInputSpec):
    engine = traits.Enum(
        *(e for e in ENGINES if e != "auto"), usedefault=True, desc="registration engine, resolved"
    )
    seed = traits.Int(0, usedefault=True, desc="random seed")
    resolution_mm = traits.Float(
        0.0, usedefault=True, desc="estimate on images coarsened to this voxel size; 0: native"
    )


class _CoRegisterInputSpec(_RegistrationInputSpec):
    fixed_file = File(exists=True, mandatory=True, desc="the session reference (FLAIR)")
    moving_file = File(exists=True, mandatory=True, desc="the image to align to it")
    transform = traits.Enum("rigid", "affine", usedefault=True, desc="transform model")
    metric = traits.Enum("mi", "ncc", usedefault=True, desc="similarity metric")


class _CoRegisterOutputSpec(TraitedSpec):
    out_xfm = File(
        exists=True,
        desc="ITK affine (.mat) mapping fixed points to moving points: "
        "resamples the moving image onto the fixed grid",
    )
    out_file = File(exists=True, desc="the moving image resampled onto the fixed grid (linear)")


class CoRegister(SimpleInterface):
    """Align an image to the session reference (:func:`smoulder.registration.engines.register`).

    Writes the fixed → moving transform as an ITK ``.mat`` and the moving image resampled on
    the fixed grid through it (:func:`smoulder.registration.transforms.resample`). With
    ``resolution_mm`` the transform is estimated on coarsened copies of both images; it maps
    world points, so it applies to the originals unchanged.
    """

    input_spec = _CoRegisterInputSpec
    output_spec = _CoRegisterOutputSpec

    def _run_interface(self, runtime: Any) -> Any:
        import numpy as np

        from smoulder.errors import RegistrationError
        from smoulder.images import save_nifti
        from smoulder.registration.engines import register
        from smoulder.registration.transforms import AffineTransform, resample

        files = [self.inputs.fixed_file, self.inputs.moving_file]
        (fixed, moving), coarse = _load_coarse(files, self.inputs.resolution_mm)
        reg = register(
            *coarse,
            transform=self.inputs.transform,
            metric=self.inputs.metric,
            **_engine_options(self.inputs),
        )
        steps = reg.forward.steps
        if len(steps) != 1 or not isinstance(steps[0], AffineTransform):
            raise RegistrationError(
                f"{self.inputs.transform} registration of {Path(self.inputs.moving_file).name}",
                expected="one affine transform",
                found=repr(reg.forward),
            )
        stem = _stem(self.inputs.moving_file)
        xfm = steps[0].save(Path(runtime.cwd) / f"{stem}_to_fixed.mat")
        moved = resample(moving, fixed, reg.forward, interpolation="linear")
        out = save_nifti(
            np.asarray(moved.dataobj), moved.affine, Path(runtime.cwd) / f"{stem}_fixed.nii.gz"
        )
        self._results["out_xfm"] = str(xfm)
        self._results["out_file"] = str(out)
        return runtime


class _HalfwayInputSpec(_RegistrationInputSpec):
    in_a = File(exists=True, mandatory=True, desc="earlier session's reference image (A)")
    in_b = File(exists=True, mandatory=True, desc="later session's reference image (B)")
    region_a = File(
        exists=True,
        desc="A's brain mask: the halfway grid covers its box and a margin (deformable part "
        "estimated there, identity outside); unset: the whole field of view",
    )
    transform = traits.Enum(
        "deformable", "affine", "rigid", usedefault=True, desc="transform model"
    )
    labels = traits.List(
        traits.Str, ["a", "b"], usedefault=True, desc="session labels of A and B (the space's)"
    )
    finest = traits.Bool(
        False, usedefault=True, desc="optimise at the full resolution too (lesion growth)"
    )


class _HalfwayOutputSpec(TraitedSpec):
    xfm_a_to_b = File(
        exists=True,
        desc="ITK displacement field on A's grid mapping A points to B points: resamples B onto A",
    )
    xfm_b_to_a = File(
        exists=True,
        desc="ITK displacement field on B's grid mapping B points to A points: resamples A onto B",
    )
    space_files = traits.List(
        File(exists=True),
        desc="the two sessions' within-subject space: every file SubjectSpace.save wrote (the "
        "halfway grid, the grid → A and grid → B maps, space.json)",
    )
    session_maps = traits.List(File(exists=True), desc="its grid → A and grid → B maps")


class HalfwayRegister(SimpleInterface):
    """Register two sessions symmetrically (:func:`smoulder.registration.engines.halfway`).

    Neither session is privileged: both are resampled once onto a halfway grid and the two
    directions are inverse by construction. Each direction is written as one displacement
    field (:meth:`TransformChain.to_displacement`) on the grid of the image it resamples onto.
    """

    input_spec = _HalfwayInputSpec
    output_spec = _HalfwayOutputSpec

    def _run_interface(self, runtime: Any) -> Any:
        from smoulder.images import load_image
        from smoulder.longitudinal.space import FINEST_ITERATIONS, SubjectSpace, region_on
        from smoulder.registration.engines import default_settings, halfway, resolve_engine

        (a, b), coarse = _load_coarse(
            [self.inputs.in_a, self.inputs.in_b], self.inputs.resolution_mm
        )
        engine = resolve_engine(self.inputs.engine, self.inputs.device)[0]
        settings = None
        if self.inputs.finest:
            settings = default_settings(
                engine, coarse[0], finest=True, finest_iterations=FINEST_ITERATIONS
            )
        region = None
        if isdefined(self.inputs.region_a):
            region = region_on(load_image(self.inputs.region_a), coarse[0])
        result = halfway(
            *coarse,
            transform=self.inputs.transform,
            settings=settings,
            region_a=region,
            **_engine_options(self.inputs),
        )
        cwd = Path(runtime.cwd)
        for direction, chain, grid in (("a_to_b", result.a_to_b, a), ("b_to_a", result.b_to_a, b)):
            field = chain.to_displacement(grid).save(cwd / f"{direction}.nii.gz")
            self._results[f"xfm_{direction}"] = str(field)
        label_a, label_b = self.inputs.labels
        space = SubjectSpace(
            result.reference, {label_a: result.to_a, label_b: result.to_b}, "halfway"
        )
        self._results.update(_space_outputs(space, space.save(cwd / "space")))
        return runtime


class _JacobianInputSpec(BaseInterfaceInputSpec):
    in_xfm = File(exists=True, mandatory=True, desc="ITK displacement field (points map)")
    reference = File(exists=True, mandatory=True, desc="the image whose grid the maps take")


class _JacobianOutputSpec(TraitedSpec):
    det_file = File(exists=True, desc="Jacobian determinant of the points map")
    logdet_file = File(exists=True, desc="its natural logarithm (determinants clipped at 1e-6)")


class JacobianMaps(SimpleInterface):
    """Write the Jacobian determinant of a transform and its logarithm on a reference grid.

    :func:`smoulder.registration.transforms.jacobian_determinant_map` and
    :func:`~smoulder.registration.transforms.log_jacobian_map`: for the A → B points map on
    A's grid, a value above 1 means the tissue around that voxel is larger at B.
    """

    input_spec = _JacobianInputSpec
    output_spec = _JacobianOutputSpec

    def _run_interface(self, runtime: Any) -> Any:
        import numpy as np

        from smoulder.images import load_image, save_nifti
        from smoulder.registration.transforms import (
            DisplacementTransform,
            jacobian_determinant_map,
            log_jacobian_map,
        )

        transform = DisplacementTransform.load(self.inputs.in_xfm)
        reference = load_image(self.inputs.reference, read_data=False)
        cwd = Path(runtime.cwd)
        det = jacobian_determinant_map(transform, reference)
        logdet = log_jacobian_map(transform, reference, det=det)
        for key, img in (("det_file", det), ("logdet_file", logdet)):
            path = cwd / f"{key[: -len('_file')]}.nii.gz"
            self._results[key] = str(save_nifti(np.asarray(img.dataobj), img.affine, path))
        return runtime


class _TemplateInputSpec(_RegistrationInputSpec):
    in_files = traits.List(File(exists=True), mandatory=True, desc="session references, time order")
    labels = traits.List(traits.Str, mandatory=True, desc="their session labels")
    transform = traits.Enum(
        "deformable", "affine", "rigid", usedefault=True, desc="transform model"
    )
    finest = traits.Bool(
        True, usedefault=True, desc="optimise at the full resolution too (lesion growth)"
    )
    region = File(
        exists=True,
        desc="the first session's brain mask: the template grid covers its box and a margin; "
        "unset: the whole field of view",
    )


class _TemplateOutputSpec(TraitedSpec):
    space_files = traits.List(File(exists=True), desc="every file of the saved template space")
    session_maps = traits.List(File(exists=True), desc="its grid → session maps, in order")


class SubjectTemplate(SimpleInterface):
    """Build the unbiased within-subject template of three or more sessions
    (:func:`smoulder.longitudinal.space.subject_space`)."""

    input_spec = _TemplateInputSpec
    output_spec = _TemplateOutputSpec

    def _run_interface(self, runtime: Any) -> Any:
        from smoulder.images import load_image
        from smoulder.longitudinal.space import subject_space

        _, coarse = _load_coarse(list(self.inputs.in_files), self.inputs.resolution_mm)
        region = load_image(self.inputs.region) if isdefined(self.inputs.region) else None
        space = subject_space(
            dict(zip(self.inputs.labels, coarse, strict=True)),
            transform=self.inputs.transform,
            finest=self.inputs.finest,
            region=region,
            **_engine_options(self.inputs),
        )
        self._results.update(_space_outputs(space, space.save(Path(runtime.cwd) / "space")))
        return runtime


def _space_outputs(space: Any, folder: Path) -> dict[str, list[str]]:
    """Return the ``space_files`` (every file of the saved space: listed, so that Nipype keeps
    them and reruns what reads them when they change) and ``session_maps`` outputs."""
    return {
        "space_files": sorted(str(p) for p in folder.iterdir()),
        "session_maps": [str(folder / f"to-{s}.nii.gz") for s in space.sessions],
    }


class _ActivityInputSpec(BaseInterfaceInputSpec):
    space_files = traits.List(
        File(exists=True),
        mandatory=True,
        desc="the within-subject space's maps (a folder written by SubjectSpace.save); files, "
        "not the folder, so that a new registration reruns this step",
    )
    labels = traits.List(traits.Str, mandatory=True, desc="session labels, time order")
    flair_files = traits.List(File(exists=True), mandatory=True, desc="session references")
    lesion_files = traits.List(File(exists=True), mandatory=True, desc="lesion instances")
    lesion_probseg_files = traits.List(File(exists=True), desc="lesion probability")
    wm_probseg_files = traits.List(File(exists=True), desc="white-matter probability")
    brain_mask_files = traits.List(File(exists=True), desc="brain masks")
    t1_files = traits.List(File(exists=True), desc="T1w (or UNIT1) on the FLAIR grids")
    lesion_stats_files = traits.List(File(exists=True), desc="the sessions' lesion tables")
    bids_dir = traits.Str(mandatory=True, desc="the raw BIDS dataset (session dates)")
    subject = traits.Str(mandatory=True, desc="subject label")
    settings = traits.Dict(desc="the configuration's longitudinal section")


class _ActivityOutputSpec(TraitedSpec):
    lesions_table = File(exists=True, desc="lesion x session table")
    lesions_metadata = traits.Dict(desc="its column dictionary")
    intervals_table = File(exists=True, desc="per-interval activity table")
    intervals_metadata = traits.Dict(desc="its column dictionary")
    label_files = traits.List(File(exists=True), desc="persistent lesion IDs per session (grid)")
    change_files = traits.List(File(exists=True), desc="new and enlarging voxels per interval")
    expansion_files = traits.List(File(exists=True), desc="expansion per interval (%/yr)")
    sel_files = traits.List(File(exists=True), desc="SEL candidates since the first session")


class LesionActivity(SimpleInterface):
    """Track lesions, decide their fates and call slowly expanding lesions
    (:func:`smoulder.longitudinal.activity.lesion_activity`) on the within-subject space."""

    input_spec = _ActivityInputSpec
    output_spec = _ActivityOutputSpec

    def _run_interface(self, runtime: Any) -> Any:
        import nibabel as nib
        import numpy as np

        from smoulder.images import read_tsv, save_tsv, write_nifti
        from smoulder.longitudinal import activity as act
        from smoulder.longitudinal.intervals import missing_dates, session_times, years_since_first
        from smoulder.longitudinal.space import SubjectSpace

        labels = list(self.inputs.labels)

        def per_session(name: str) -> list[Any]:
            files = getattr(self.inputs, name)
            if not isdefined(files) or len(files) != len(labels):
                return [None] * len(labels)
            return list(files)

        def load(path: Any) -> Any:
            return nib.load(path) if path else None

        extra = {k: per_session(f"{k}_files") for k in
                 ("lesion_probseg", "wm_probseg", "brain_mask", "t1", "lesion_stats")}  # fmt: skip
        sessions = [
            act.SessionImages(
                label=label,
                flair=nib.load(self.inputs.flair_files[k]),
                lesions=nib.load(self.inputs.lesion_files[k]),
                lesion_probability=load(extra["lesion_probseg"][k]),
                wm=load(extra["wm_probseg"][k]),
                brain=load(extra["brain_mask"][k]),
                t1=load(extra["t1"][k]),
                rim_rows=read_tsv(extra["lesion_stats"][k]) if extra["lesion_stats"][k] else None,
            )
            for k, label in enumerate(labels)
        ]
        times, sources = session_times(self.inputs.bids_dir, self.inputs.subject, labels)
        space = SubjectSpace.load(Path(self.inputs.space_files[0]).parent)  # one folder
        settings = act.ActivitySettings.from_mapping(
            self.inputs.settings if isdefined(self.inputs.settings) else {}
        )
        result = act.lesion_activity(space, sessions, years_since_first(times), settings)
        cwd = Path(runtime.cwd)
        dates = {s: (t.isoformat() if t else "missing") for s, t in zip(labels, times, strict=True)}
        common = {
            "SessionDates": dates,
            "SessionDateSources": sources,
            "Messages": result.messages + missing_dates(sources),
        }  # fmt: skip
        for key, rows, columns in (
            ("lesions", result.rows, act.COLUMNS),
            ("intervals", result.intervals, act.INTERVAL_COLUMNS),
        ):
            path = save_tsv(rows, cwd / f"{key}.tsv", columns=list(columns))
            self._results[f"{key}_table"] = str(path)
            self._results[f"{key}_metadata"] = {**act.column_dictionary(columns), **common}
        grid = space.grid.affine
        maps = {
            "label_files": [(f"labels-{s}", result.labels[s], np.int16) for s in labels],
            "change_files": [(f"change-{i}", m, np.uint8) for i, m in result.change.items()],
            "expansion_files": [
                (f"expansion-{i}", m, np.float32) for i, m in result.expansion.items()
            ],
            "sel_files": [(f"sel-{s}", m, np.uint8) for s, m in result.sel.items()],
        }
        for key, items in maps.items():
            self._results[key] = [
                str(write_nifti(nib.Nifti1Image(data.astype(dtype), grid), cwd / f"{name}.nii.gz"))
                for name, data, dtype in items
            ]
        return runtime


# -------------------------------------------------------------------------------- segmentation


class _SegmentInputSpec(_DeviceInputSpec):
    flair_file = File(exists=True, mandatory=True, desc="the session's FLAIR (reference grid)")
    t1_file = File(exists=True, desc="T1w or UNIT1 resampled onto the FLAIR grid")
    model = traits.Str("", usedefault=True, desc="MONAI bundle folder; empty: the shipped one")
    min_lesion_ul = traits.Float(10.0, usedefault=True, desc="smallest lesion kept (µl)")
    min_lesion_voxels = traits.Int(3, usedefault=True, desc="smallest lesion kept (voxels)")
    refine = traits.Bool(
        True, usedefault=True, desc="fit the subject's intensities with the network as prior"
    )


class _SegmentOutputSpec(TraitedSpec):
    # one trait per key of smoulder.segmentation.outputs.OUTPUTS
    brain_mask = File(exists=True, desc="brain (parenchyma) mask")
    dseg = File(exists=True, desc="tissue classes")
    dseg_tsv = File(exists=True, desc="index → class name of dseg")
    probseg_csf = File(exists=True, desc="CSF probability")
    probseg_gm = File(exists=True, desc="GM (cortical + deep) probability")
    probseg_wm = File(exists=True, desc="WM probability")
    probseg_lesion = File(exists=True, desc="lesion probability")
    lesions = File(exists=True, desc="lesion instances, one index per lesion")
    lesions_tsv = File(exists=True, desc="index → lesion name of the instances")
    lesion_stats = File(exists=True, desc="per-lesion table")
    used_t1 = traits.Bool(desc="a T1-weighted channel was used")
    model_version = traits.Str(desc="version of the bundle")


class Segment(SimpleInterface):
    """Brain, tissue and lesion segmentation (:func:`smoulder.segmentation.inference.segment`)."""

    input_spec = _SegmentInputSpec
    output_spec = _SegmentOutputSpec

    def _run_interface(self, runtime: Any) -> Any:
        from smoulder.devices import torch_threads
        from smoulder.images import load_image
        from smoulder.segmentation.inference import segment
        from smoulder.segmentation.outputs import OUTPUTS, file_name, write_outputs

        with torch_threads(self.inputs.num_threads):
            flair = load_image(self.inputs.flair_file)
            t1 = load_image(self.inputs.t1_file) if isdefined(self.inputs.t1_file) else None
            result = segment(
                flair,
                t1,
                device=self.inputs.device,
                model=self.inputs.model or None,
                min_lesion_ul=self.inputs.min_lesion_ul,
                min_lesion_voxels=self.inputs.min_lesion_voxels,
                refine=self.inputs.refine,
            )
            sources = [self.inputs.flair_file] + ([self.inputs.t1_file] if t1 is not None else [])
            write_outputs(result, Path(runtime.cwd), "seg_", sources)
        for out in OUTPUTS:
            self._results[out.key] = str(Path(runtime.cwd) / file_name(out.key, "seg_"))
        self._results["used_t1"] = result.used_t1
        self._results["model_version"] = result.model_version
        return runtime


class _QSMInputSpec(_DeviceInputSpec):
    magnitude_files = traits.List(File(exists=True), mandatory=True, desc="GRE magnitude, per echo")
    phase_files = traits.List(File(exists=True), mandatory=True, desc="GRE phase, per echo")
    brain_mask = File(exists=True, mandatory=True, desc="the session's brain mask (FLAIR grid)")
    flair_file = File(exists=True, mandatory=True, desc="the session reference (FLAIR grid)")
    xfm = File(
        exists=True, mandatory=True, desc="GRE → FLAIR transform (FLAIR points to GRE points)"
    )
    method = traits.Enum("tv", "tkd", usedefault=True, desc="dipole inversion")
    csf_probseg = File(exists=True, desc="CSF probability (FLAIR grid): reference χ to the CSF")


class _QSMOutputSpec(TraitedSpec):
    chimap = File(exists=True, desc="χ (ppm) on the GRE's own grid")
    chimap_flair = File(exists=True, desc="χ (ppm) resampled onto the FLAIR grid")
    local_field = File(exists=True, desc="local field (ppm) after V-SHARP, GRE grid")
    qsm_mask = File(exists=True, desc="voxels of the QSM, GRE grid")
    parameters = traits.Dict(desc="method, parameters, TEs, B0, referencing")


class QSM(SimpleInterface):
    """QSM of the session's multi-echo GRE (:func:`smoulder.qsm.reconstruct.reconstruct`),
    inside the session's brain mask mapped into GRE space (and the magnitude's head mask)."""

    input_spec = _QSMInputSpec
    output_spec = _QSMOutputSpec

    def _run_interface(self, runtime: Any) -> Any:
        import nibabel as nib
        import numpy as np

        from smoulder.devices import torch_threads
        from smoulder.images import write_nifti
        from smoulder.qsm.masks import session_masks
        from smoulder.qsm.reconstruct import load_echoes, reconstruct
        from smoulder.registration.transforms import AffineTransform, resample

        mags = [Path(p) for p in self.inputs.magnitude_files]
        to_gre = AffineTransform.load(self.inputs.xfm)  # FLAIR points → GRE points
        csf = self.inputs.csf_probseg
        with torch_threads(self.inputs.num_threads):
            echoes = load_echoes(mags, [Path(p) for p in self.inputs.phase_files])
            mask, reference = session_masks(
                echoes.magnitude,
                nib.load(mags[0]),
                nib.load(self.inputs.brain_mask),
                to_gre,
                csf_probseg=nib.load(csf) if isdefined(csf) else None,
            )
            result = reconstruct(
                echoes,
                mask,
                method=self.inputs.method,
                device=self.inputs.device,
                reference_mask=reference,
            )
        cwd = Path(runtime.cwd)
        outputs = {
            "chimap": result.chi_ppm,
            "local_field": result.local_field_ppm,
            "qsm_mask": result.mask.astype(np.uint8),
        }
        for key, data in outputs.items():
            path = cwd / f"{key}.nii.gz"
            write_nifti(nib.Nifti1Image(np.asarray(data), echoes.affine), path)
            self._results[key] = str(path)
        chi_img = nib.load(cwd / "chimap.nii.gz")
        on_flair = resample(chi_img, nib.load(self.inputs.flair_file), to_gre)
        write_nifti(on_flair, cwd / "chimap_flair.nii.gz")
        self._results["chimap_flair"] = str(cwd / "chimap_flair.nii.gz")
        self._results["parameters"] = {
            "Units": "ppm",
            "Method": result.method,
            **{k: v for k, v in result.parameters.items() if k != "reference"},
            "EchoTimes": [t / 1000 for t in echoes.echo_times_ms],
            "MagneticFieldStrength": echoes.b0_tesla,
            "Reference": result.parameters["reference"],
        }
        return runtime


class _MapChimapInputSpec(BaseInterfaceInputSpec):
    chimap = File(exists=True, mandatory=True, desc="a ready susceptibility map (ppm)")
    flair_file = File(exists=True, mandatory=True, desc="the session reference (FLAIR grid)")
    xfm = File(exists=True, desc="GRE → FLAIR transform; without it, world space (same session)")


class _MapChimapOutputSpec(TraitedSpec):
    chimap_flair = File(exists=True, desc="the map resampled onto the FLAIR grid")
    parameters = traits.Dict(desc="sidecar fields of the mapped copy")


class MapChimap(SimpleInterface):
    """Use a ready ``_Chimap`` as is: only resample it onto the session's FLAIR.

    Through the GRE → FLAIR transform when the session has a GRE magnitude (the map shares the
    GRE's world frame), else in world space: images of one session share scanner coordinates.
    """

    input_spec = _MapChimapInputSpec
    output_spec = _MapChimapOutputSpec

    def _run_interface(self, runtime: Any) -> Any:
        import nibabel as nib

        from smoulder.images import write_nifti
        from smoulder.inputs import read_sidecar
        from smoulder.registration.transforms import AffineTransform, resample

        through = isdefined(self.inputs.xfm)
        transform = AffineTransform.load(self.inputs.xfm) if through else AffineTransform.identity()
        chi = nib.load(self.inputs.chimap)
        out = Path(runtime.cwd) / "chimap_flair.nii.gz"
        write_nifti(resample(chi, nib.load(self.inputs.flair_file), transform), out)
        self._results["chimap_flair"] = str(out)
        given = read_sidecar(self.inputs.chimap)
        self._results["parameters"] = {
            **{k: given[k] for k in ("Method", "Reference") if k in given},
            "Units": given.get("Units", "ppm"),
            "Description": "the input Chimap, used as is, resampled (linear) onto the FLAIR "
            + ("through the GRE magnitude's transform" if through else "in world space"),
        }
        return runtime


class _AssessLesionsInputSpec(_DeviceInputSpec):
    lesions = File(exists=True, mandatory=True, desc="lesion instances (FLAIR grid)")
    lesion_stats = File(exists=True, mandatory=True, desc="the segmentation's lesion table")
    flair_file = File(exists=True, mandatory=True, desc="the session reference (FLAIR grid)")
    brain_mask = File(exists=True, mandatory=True, desc="brain mask (FLAIR grid)")
    wm_probseg = File(exists=True, mandatory=True, desc="white-matter probability (FLAIR grid)")
    gm_probseg = File(exists=True, desc="grey-matter probability (FLAIR grid)")
    t1_file = File(exists=True, desc="T1w (else UNIT1) on the FLAIR grid: T1 black holes")
    unit1_file = File(exists=True, desc="MP2RAGE UNIT1 on the FLAIR grid: quantitative T1")
    mp2rage_files = traits.List(File(exists=True), desc="MP2RAGE INV1 and INV2 (their sidecars)")
    rims = traits.Bool(True, usedefault=True, desc="assess paramagnetic rims")
    model = traits.Str("", usedefault=True, desc="rim bundle folder; empty: the shipped one")
    input_kind = traits.Enum("auto", "qsm", "phase", usedefault=True, desc="image to assess")
    magnitude_files = traits.List(File(exists=True), desc="GRE magnitude, per echo")
    phase_files = traits.List(File(exists=True), desc="GRE phase, per echo")
    chimap = File(exists=True, desc="χ (ppm) on the GRE grid: the QSM or the user's Chimap")
    chimap_sidecar = File(exists=True, desc="the file whose sidecar states the map's sign")
    qsm_mask = File(exists=True, desc="where the QSM is defined (GRE grid)")
    xfm = File(exists=True, desc="GRE → FLAIR transform (FLAIR points to GRE points)")
    subject = traits.Str("", usedefault=True, desc="participant label (of the patches)")
    session = traits.Str("", usedefault=True, desc="session label (of the patches)")


class _AssessLesionsOutputSpec(TraitedSpec):
    lesion_stats = File(exists=True, desc="the lesion table with the rim and tissue columns")
    metadata = traits.Dict(desc="the table's sidecar: column dictionary and the rim summary")
    rims_input = File(desc="the assessed susceptibility image, paramagnetic positive (GRE grid)")
    patches = File(desc="the classified lesions' patches and measures (a rim shard)")


class AssessLesions(SimpleInterface):
    """Rims (:func:`smoulder.rims.assess.assess_rims`) and lesion tissue
    (:func:`smoulder.rims.assess.lesion_tissue`) of every lesion, added to the lesion table."""

    input_spec = _AssessLesionsInputSpec
    output_spec = _AssessLesionsOutputSpec

    def _run_interface(self, runtime: Any) -> Any:
        import nibabel as nib
        import numpy as np

        from smoulder.devices import torch_threads
        from smoulder.images import read_tsv, write_nifti
        from smoulder.rims import assess
        from smoulder.rims.train import write_shard
        from smoulder.segmentation.lesions import LESION_COLUMNS, write_lesion_stats

        def opt(name: str) -> Any:
            value = getattr(self.inputs, name)
            return nib.load(value) if isdefined(value) else None

        instances, wm = nib.load(self.inputs.lesions), nib.load(self.inputs.wm_probseg)
        with torch_threads(self.inputs.num_threads):
            loaded = self._gre(instances, wm) if self.inputs.rims else None
            bundle = self._bundle() if loaded is not None else None
            result = assess.assess_rims(
                instances,
                *(loaded or (None, None)),
                bundle,
                device=self.inputs.device,
                unassessed=assess.NO_SUSCEPTIBILITY if self.inputs.rims else assess.RIMS_OFF,
            )
        mp2rage = self.inputs.mp2rage_files if isdefined(self.inputs.mp2rage_files) else []
        tissue = assess.lesion_tissue(
            instances,
            t1w=opt("t1_file"),
            wm=wm,
            gm=opt("gm_probseg"),
            unit1=opt("unit1_file"),
            mp2rage=(Path(mp2rage[0]), Path(mp2rage[1])) if len(mp2rage) == 2 else None,
        )
        table = read_tsv(self.inputs.lesion_stats)
        rows = assess.merge_lesion_rows(table, result.rows, tissue)
        columns = {**LESION_COLUMNS, **assess.RIM_COLUMNS, **assess.TISSUE_COLUMNS}
        out = Path(runtime.cwd) / "lesion_stats.tsv"
        write_lesion_stats(rows, out, columns)
        self._results["lesion_stats"] = str(out)
        self._results["metadata"] = {**columns, **result.summary.sidecar()}
        if loaded is not None:
            grid, source = loaded[0], loaded[1]
            path = Path(runtime.cwd) / "rims_input.nii.gz"
            data = np.asarray(source.data, np.float32)
            write_nifti(nib.Nifti1Image(data, grid.affine), path)
            self._results["rims_input"] = str(path)
            labels = (self.inputs.subject, self.inputs.session)
            shard = assess.patch_shard(result, source.kind, *labels)
            self._results["patches"] = str(write_shard(shard, Path(runtime.cwd) / "patches.npz"))
        return runtime

    def _gre(self, instances: Any, wm: Any) -> Any:
        import nibabel as nib

        from smoulder.registration.transforms import AffineTransform
        from smoulder.rims import assess

        def path(name: str) -> Path | None:
            value = getattr(self.inputs, name)
            return Path(value) if isdefined(value) and value else None

        def paths(name: str) -> tuple[Path, ...]:
            value = getattr(self.inputs, name)
            return tuple(Path(p) for p in value) if isdefined(value) else ()

        files = assess.GreInputs(
            magnitudes=paths("magnitude_files"),
            phases=paths("phase_files"),
            chimap=path("chimap"),
            chimap_sidecar=path("chimap_sidecar"),
            qsm_mask=path("qsm_mask"),
        )
        xfm = path("xfm")
        return assess.load_gre_session(
            files,
            self.inputs.input_kind,
            instances=instances,
            flair=nib.load(self.inputs.flair_file),
            brain_mask=nib.load(self.inputs.brain_mask),
            flair_to_gre=AffineTransform.load(xfm) if xfm else AffineTransform.identity(),
            wm_flair=wm,
        )

    def _bundle(self) -> Any:
        from smoulder.rims.network import load_bundle

        return load_bundle(self.inputs.model or None, device=self.inputs.device)


class _FillLesionsInputSpec(BaseInterfaceInputSpec):
    t1_file = File(exists=True, mandatory=True, desc="T1-weighted image on the FLAIR grid")
    lesions = File(exists=True, mandatory=True, desc="lesion instances on the same grid")
    dseg = File(exists=True, mandatory=True, desc="tissue classes on the same grid")


class _FillLesionsOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the T1-weighted image with lesions filled")


class FillLesions(SimpleInterface):
    """Fill T1w lesions with white matter (:func:`smoulder.segmentation.lesions.fill_lesions`).

    Lesions bias tissue volumes towards grey matter; the filled image is for those measures.
    """

    input_spec = _FillLesionsInputSpec
    output_spec = _FillLesionsOutputSpec

    def _run_interface(self, runtime: Any) -> Any:
        import numpy as np

        from smoulder.images import load_image, save_nifti
        from smoulder.segmentation.classes import CLASSES
        from smoulder.segmentation.lesions import fill_lesions

        t1 = load_image(self.inputs.t1_file)
        lesions = np.asarray(load_image(self.inputs.lesions).dataobj) > 0
        wm = np.asarray(load_image(self.inputs.dseg).dataobj) == CLASSES.index("WM")
        data = np.asarray(t1.dataobj, np.float32)
        if lesions.any() and wm.any():
            data = fill_lesions(data, lesions, wm)
        out = Path(runtime.cwd) / f"{_stem(self.inputs.t1_file)}_filled.nii.gz"
        save_nifti(data, t1.affine, out)
        self._results["out_file"] = str(out)
        return runtime


# ------------------------------------------------------------------------------------ atrophy


class _SessionAtrophyInputSpec(BaseInterfaceInputSpec):
    flair_file = File(exists=True, mandatory=True, desc="the session's FLAIR (reference grid)")
    t1_file = File(exists=True, desc="T1w (or UNIT1) on the FLAIR grid: the cord image")
    t1_name = traits.Str("T1w", usedefault=True, desc="which image t1_file is (T1w or UNIT1)")
    dseg = File(exists=True, mandatory=True, desc="tissue classes")
    dseg_tsv = File(exists=True, mandatory=True, desc="index and name of each class")
    brain_mask = File(exists=True, mandatory=True, desc="brain (parenchyma) mask")
    settings = traits.Dict(desc="the configuration's atrophy section")


class _SessionAtrophyOutputSpec(TraitedSpec):
    stats = File(exists=True, desc="one-row table: volumes, fractions, cord area")
    metadata = traits.Dict(desc="its column dictionary")
    cord_probseg = File(exists=True, desc="cord fraction on the cord image's grid")
    cord_mask = File(exists=True, desc="cord mask (fraction >= 0.5)")
    centreline = File(exists=True, desc="the cord's centreline, per slice")


class SessionAtrophy(SimpleInterface):
    """A session's volumes and cord area (:mod:`smoulder.atrophy.session`)."""

    input_spec = _SessionAtrophyInputSpec
    output_spec = _SessionAtrophyOutputSpec

    def _run_interface(self, runtime: Any) -> Any:
        from smoulder.atrophy.columns import SESSION_COLUMNS, column_dictionary
        from smoulder.atrophy.session import cord_measure, session_row
        from smoulder.cord.measure import save_cord_outputs
        from smoulder.images import load_image, read_tsv, save_tsv

        settings = self.inputs.settings if isdefined(self.inputs.settings) else {}
        with_t1 = isdefined(self.inputs.t1_file)
        image = load_image(self.inputs.t1_file if with_t1 else self.inputs.flair_file)
        cord = cord_measure(
            image,
            brain_mask=load_image(self.inputs.brain_mask),
            level_below_anchor_mm=float(settings.get("cord_level_below_anchor_mm", 15.0)),
            length_mm=float(settings.get("cord_length_mm", 15.0)),
        )
        names = {r["name"]: int(r["index"]) for r in read_tsv(self.inputs.dseg_tsv)}
        row = session_row(
            load_image(self.inputs.dseg),
            names,
            cord,
            cord_image=self.inputs.t1_name if with_t1 else "FLAIR",
            standard_icv_ml=float(settings.get("standard_icv_ml", 1500.0)),
        )
        cwd = Path(runtime.cwd)
        self._results["stats"] = str(
            save_tsv([row], cwd / "atrophy.tsv", columns=[c for c in SESSION_COLUMNS if c in row])
        )
        self._results["metadata"] = column_dictionary(SESSION_COLUMNS)
        paths = save_cord_outputs(cord, image.affine, cwd, "cord")
        self._results.update(
            cord_probseg=str(paths["probseg"]),
            cord_mask=str(paths["mask"]),
            centreline=str(paths["centreline"]),
        )
        return runtime


class _SubjectAtrophyInputSpec(_RegistrationInputSpec):
    space_files = traits.List(
        File(exists=True), desc="the lesion-activity space (used when registration_mm is null)"
    )
    labels = traits.List(traits.Str, mandatory=True, desc="session labels, time order")
    flair_files = traits.List(File(exists=True), mandatory=True, desc="session references")
    t1_files = traits.List(File(exists=True), desc="T1w (or UNIT1) on the FLAIR grids")
    gm_probseg_files = traits.List(File(exists=True), mandatory=True, desc="GM probability")
    wm_probseg_files = traits.List(File(exists=True), mandatory=True, desc="WM probability")
    lesion_probseg_files = traits.List(File(exists=True), mandatory=True, desc="lesion prob.")
    stats_files = traits.List(File(exists=True), mandatory=True, desc="the sessions' rows")
    bids_dir = traits.Str(mandatory=True, desc="the raw BIDS dataset (session dates)")
    subject = traits.Str(mandatory=True, desc="subject label")
    settings = traits.Dict(desc="the configuration's atrophy section")


class _SubjectAtrophyOutputSpec(TraitedSpec):
    stats = File(exists=True, desc="per session: volumes; per interval: changes and rates")
    metadata = traits.Dict(desc="its column dictionary")


class SubjectAtrophy(SimpleInterface):
    """PBVC, grey-matter and cord change within the subject
    (:func:`smoulder.atrophy.subject.subject_atrophy`)."""

    input_spec = _SubjectAtrophyInputSpec
    output_spec = _SubjectAtrophyOutputSpec

    def _run_interface(self, runtime: Any) -> Any:
        import nibabel as nib
        import numpy as np

        from smoulder.atrophy.columns import SUBJECT_COLUMNS, column_dictionary
        from smoulder.atrophy.subject import AtrophySession, atrophy_space, subject_atrophy
        from smoulder.images import load_image, read_tsv, save_tsv
        from smoulder.longitudinal.intervals import missing_dates, session_times, years_since_first
        from smoulder.longitudinal.space import SubjectSpace

        settings = self.inputs.settings if isdefined(self.inputs.settings) else {}
        labels = list(self.inputs.labels)
        t1s = list(self.inputs.t1_files) if isdefined(self.inputs.t1_files) else []
        sessions = []
        for k, label in enumerate(labels):
            parts = [
                np.asarray(load_image(getattr(self.inputs, f"{t}_probseg_files")[k]).dataobj)
                for t in ("gm", "wm", "lesion")
            ]
            gm = load_image(self.inputs.gm_probseg_files[k])
            brain = nib.Nifti1Image(np.clip(sum(parts), 0, 1).astype(np.float32), gm.affine)
            row = read_tsv(self.inputs.stats_files[k])[0]
            flair = load_image(self.inputs.flair_files[k])
            t1 = load_image(t1s[k]) if len(t1s) == len(labels) else None
            sessions.append(
                AtrophySession(
                    label, flair, brain, gm, t1,
                    row={c: v for c, v in row.items() if not c.startswith("cord_")},
                    cord_image=t1 if t1 is not None else flair,
                    cord_image_name=str(row.get("cord_image", "T1w" if t1 else "FLAIR")),
                )
            )  # fmt: skip
        times, sources = session_times(self.inputs.bids_dir, self.inputs.subject, labels)
        registration_mm = settings.get("registration_mm")
        if registration_mm or not isdefined(self.inputs.space_files):
            space = atrophy_space(
                {s.label: s.reference for s in sessions},
                registration_mm,
                **_engine_options(self.inputs),
            )
        else:
            space = SubjectSpace.load(Path(self.inputs.space_files[0]).parent)
        rows, _ = subject_atrophy(
            space,
            sessions,
            years_since_first(times),
            pbvc_method=str(settings.get("pbvc_method", "jacobian")),
            boundary_shift=bool(settings.get("boundary_shift", True)),
            cord_level_below_anchor_mm=float(settings.get("cord_level_below_anchor_mm", 15.0)),
            cord_length_mm=float(settings.get("cord_length_mm", 15.0)),
        )
        path = save_tsv(rows, Path(runtime.cwd) / "atrophy.tsv", columns=list(SUBJECT_COLUMNS))
        self._results["stats"] = str(path)
        self._results["metadata"] = {
            **column_dictionary(SUBJECT_COLUMNS),
            "SessionDates": {
                s: (t.isoformat() if t else "missing") for s, t in zip(labels, times, strict=True)
            },
            "Messages": [
                f"{m}: changes are per interval, no yearly rates" for m in missing_dates(sources)
            ],
        }
        return runtime


# --------------------------------------------------------------------------------- derivatives


class _DerivativesSinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the file to publish")
    output_dir = traits.Str(mandatory=True, desc="BIDS-App output folder (files go to smoulder/)")
    raw_dir = traits.Str(desc="the input BIDS dataset (for bids:raw: URIs)")
    entities = traits.Dict(mandatory=True, desc="BIDS entities by short key (sub, ses, from...)")
    suffix = traits.Str(mandatory=True, desc="BIDS suffix")
    source_files = traits.List(traits.Str, desc="files the output was made from")
    spatial_reference = traits.Str(desc="the file whose grid the output is on")
    metadata = traits.Dict(desc="more sidecar fields")
    write_sidecar = traits.Bool(True, usedefault=True, desc="write the JSON sidecar")


class _DerivativesSinkOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the published file")


class DerivativesSink(SimpleInterface):
    """Publish a file as a BIDS derivative (:meth:`DerivativesWriter.save_derivative`).

    Always runs (a copy is cheap), so deleting an output and rerunning with the same work
    directory writes it again.
    """

    input_spec = _DerivativesSinkInputSpec
    output_spec = _DerivativesSinkOutputSpec
    _always_run = True

    def _run_interface(self, runtime: Any) -> Any:
        from smoulder.derivatives import DerivativesWriter

        def given(value: Any) -> Any:
            return value if isdefined(value) and value else None

        writer = DerivativesWriter(self.inputs.output_dir, raw_dir=given(self.inputs.raw_dir))
        out = writer.save_derivative(
            self.inputs.in_file,
            self.inputs.entities,
            suffix=self.inputs.suffix,
            sources=given(self.inputs.source_files) or [],
            spatial_reference=given(self.inputs.spatial_reference),
            metadata=given(self.inputs.metadata),
            sidecar=self.inputs.write_sidecar,
        )
        self._results["out_file"] = str(out)
        return runtime


def derivatives_node(
    name: str,
    *,
    output_dir: str | os.PathLike[str],
    raw_dir: str | os.PathLike[str],
    entities: dict[str, Any],
    suffix: str,
    sources: list[str | os.PathLike[str]],
    spatial_reference: str | os.PathLike[str] | None = None,
    metadata: dict[str, Any] | None = None,
    sidecar: bool = True,
) -> Any:
    """Return a node publishing its ``in_file`` as a derivative (run in the main process);
    ``sidecar=False`` for a file whose JSON sidecar another output writes."""
    from nipype.pipeline import engine as pe

    sink = DerivativesSink(
        output_dir=str(output_dir),
        raw_dir=str(raw_dir),
        entities=dict(entities),
        suffix=suffix,
        source_files=[str(p) for p in sources],
        write_sidecar=sidecar,
    )
    if spatial_reference is not None:
        sink.inputs.spatial_reference = str(spatial_reference)
    if metadata:
        sink.inputs.metadata = dict(metadata)
    return pe.Node(sink, name=name, run_without_submitting=True, mem_gb=0.1)
