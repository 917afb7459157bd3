"""An analysis exported as standard DICOM objects, in new series of the source study (highdicom).

Three objects per analysed image, each referencing the source image and carrying its Patient and
Study modules (so the PACS files them with the right patient; nothing else identifying is copied):

* a FRACTIONAL **Segmentation** on the source pixel grid, one segment per top neuron ("neuron N
  rank R"): fraction = activation / the neuron's maximum in this image, quantised to 1/255; the
  maximum (the scale) is written in the segment's description and in the SR. A float Parametric
  Map is not used: highdicom 0.28 refuses 2-D projection sources without a frame of reference.
* a **Comprehensive SR** (TID 1500 measurement report): model and SAE identity (names, sha256),
  the concept, P(original), P(SAE reconstruction), per neuron its score, logit contribution, box
  agreement, maximum activation and clinician verdicts, and the intervention result when one was
  applied.
* an RGB **Secondary Capture** of the overlay (the top neuron over the windowed image) with a
  burned-in caption "NOT FOR DIAGNOSIS", for PACS viewers that show nothing else.

Qt-free: the command line (``napari-mammo-sae export``) and the napari dock call the same code.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExportError, StowRejectedError

log = logging.getLogger(__name__)

MAX_FRACTIONAL_VALUE = 255  # segment fractions are stored as round(f * 255) / 255
SC_MAX_SIDE = 2048  # the Secondary Capture's long side, pixels (the overlay is for viewing)
SCHEME = "99MSAE"  # private coding scheme of this package's concepts
SERIES_NUMBERS = {"SEG": 9101, "SR": 9102, "SC": 9103}
#: Type 2 attributes of the Patient and General Study modules (empty when the source lacks them)
TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip
CAPTION = "NOT FOR DIAGNOSIS - research overlay (Mammo-SAE)"


@dataclass(frozen=True)
class ModelIdentity:
    """Which classifier and SAE made the analysis (names and sha256 of their weights)."""

    classifier: str
    classifier_sha256: str
    sae: str
    sae_sha256: str
    concept: str
    preprocess: str = "mammoclip"


@dataclass(frozen=True)
class InterventionSummary:
    """An intervention that was applied: which neurons, how, and the head's answer after it."""

    mode: str  # "keep" | "remove" | "region" (every latent off under the boxes; no neuron set)
    neurons: tuple[int, ...]
    probability: float
    logit: float
    # "region": the reader's boxes, (x0, y0, x1, y1) in the source image's pixels, and the feature
    # cells they switched off
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    cells: int = 0


@dataclass
class ExportInput:
    """Everything one image's export needs (the analysis plus what the reviewer added)."""

    source: Path  # the source DICOM file (its header is re-read)
    analysis: Any  # models.inference.Analysis
    identity: ModelIdentity
    neurons: Sequence[int] | None = None  # top neurons, best first (default: top by contribution)
    scores: Sequence[float] | None = None  # their ranking scores (default: logit contributions)
    box_iou: Mapping[int, float] = field(default_factory=dict)
    verdicts: Mapping[int, Sequence[str]] = field(default_factory=dict)
    intervention: InterventionSummary | None = None
    record: Any = None  # dicom.MammogramRecord (read from ``source`` when None)
    k: int = 5


@dataclass(frozen=True)
class ExportResult:
    """Where the three objects went, and what they refer to (UIDs only)."""

    folder: Path
    segmentation: Path
    report: Path
    capture: Path
    source_sop_instance_uid: str
    study_instance_uid: str
    neurons: tuple[int, ...]
    scales: tuple[float, ...]  # per neuron: the activation that fraction 1.0 stands for
    seconds: float = 0.0

    @property
    def paths(self) -> list[Path]:
        return [self.segmentation, self.report, self.capture]


def _code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, SCHEME, meaning)


# --- maps on the source grid -----------------------------------------------------------------------
def _cell_index(analysis: Any, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Feature-grid row/col of each source pixel row/col (-1 outside the model's crop)."""
    grid = tuple(analysis.grid)
    r_edges, c_edges = analysis.geometry.feature_grid_edges(grid)
    ri = np.searchsorted(r_edges, np.arange(shape[0]) + 0.5, side="right") - 1
    ci = np.searchsorted(c_edges, np.arange(shape[1]) + 0.5, side="right") - 1
    ri[(ri < 0) | (ri >= grid[0])] = -1
    ci[(ci < 0) | (ci >= grid[1])] = -1
    return ri, ci


def _expand(cells: np.ndarray, ri: np.ndarray, ci: np.ndarray) -> np.ndarray:
    """(h, w, ...) cell values -> (rows, cols, ...) pixel values; 0 outside the crop."""
    out = np.zeros((ri.size, ci.size, *cells.shape[2:]), cells.dtype)
    rsel, csel = np.flatnonzero(ri >= 0), np.flatnonzero(ci >= 0)
    if rsel.size and csel.size:  # the crop is one contiguous block of rows and columns
        out[rsel[0] : rsel[-1] + 1, csel[0] : csel[-1] + 1] = cells[ri[rsel]][:, ci[csel]]
    return out


def maps_on_source_grid(
    analysis: Any, neurons: Sequence[int], shape: tuple[int, int]
) -> np.ndarray:
    """The neurons' latent maps on the source image's pixel grid, (k, rows, cols) float32.

    Each source pixel takes the value of the feature cell its centre lies in (cell edges from
    ``geometry.feature_grid_edges``); pixels outside the model's crop are 0.
    """
    maps = analysis.latent_maps([int(n) for n in neurons]).astype(np.float32)  # (k, h, w)
    ri, ci = _cell_index(analysis, shape)
    return np.moveaxis(_expand(np.moveaxis(maps, 0, -1), ri, ci), -1, 0)


def quantised_fractions(
    analysis: Any, neurons: Sequence[int], shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols, k) float32 fractions round(map / max * 255) / 255 on the source grid; the maxima.

    Computed on the feature grid and then spread to pixels (every pixel of a cell has its value),
    so the maximum over the image is the maximum over the cells. An all-zero map stays 0.
    """
    maps = analysis.latent_maps([int(n) for n in neurons]).astype(np.float64)  # (k, h, w)
    scales = np.maximum(maps.reshape(len(maps), -1).max(axis=1), 0.0)
    safe = np.where(scales > 0, scales, 1.0)
    q = np.round(np.clip(maps / safe[:, None, None], 0, 1) * MAX_FRACTIONAL_VALUE)
    cells = np.ascontiguousarray(np.moveaxis(q / MAX_FRACTIONAL_VALUE, 0, -1), np.float32)
    ri, ci = _cell_index(analysis, shape)
    frac = _expand(cells, ri, ci)  # (rows, cols, k) float32, exactly the quantised values
    return frac, scales


# --- source header -------------------------------------------------------------------------------
def read_source_header(path: str | Path):
    """The source file's header (no pixels): patient/study modules and UIDs for the derived objects."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise ExportError(
            f"{Path(path).name}: the source image is needed to export (its header is copied into "
            f"the exported objects) but could not be read ({type(exc).__name__})"
        ) from None
    for keyword in TYPE2_COPIED:  # required, may be empty: a source without them still exports
        if keyword not in ds:
            setattr(ds, keyword, "")
    if (
        str(ds.get("PatientIdentityRemoved", "")).upper() == "YES"
        and not (ds.get("DeidentificationMethod") or ds.get("DeidentificationMethodCodeSequence"))
    ):  # the Patient module then requires a method: say it is unknown (the source file is untouched)
        ds.DeidentificationMethod = "not recorded in the source image"
    return ds


def patient_orientation(header: Any, record: Any) -> tuple[str, str] | None:
    """The source's Patient Orientation, else one derived from laterality, view and chest wall."""
    from .dicom import chest_wall_side

    value = header.get("PatientOrientation")
    if value and not isinstance(value, str) and len(value) == 2:
        parts = tuple(str(v).strip().upper() for v in value)
        if all(p and set(p) <= set("APRLHF") for p in parts):
            return parts  # type: ignore[return-value]
    if record is None or record.laterality not in ("L", "R"):
        return None
    side, _ = chest_wall_side(record)
    if side not in ("left", "right"):
        return None
    row = "A" if side == "left" else "P"  # moving right away from the chest wall is anterior
    view = (record.view or "").upper()
    if "CC" in view:
        column = "R" if record.laterality == "L" else "L"
    elif view in ("MLO", "ML", "LM", "LMO"):
        column = "F"
    else:
        return None
    return (row, column)


def _laterality(header: Any, record: Any) -> str | None:
    for key in ("ImageLaterality", "Laterality"):
        v = str(header.get(key, "") or "").strip().upper()
        if v in ("L", "R"):
            return v
    if record is not None and record.laterality in ("L", "R"):
        return record.laterality
    return None


def _equipment() -> dict:
    from . import __version__

    return {"manufacturer": "napari-mammo-sae", "software_versions": str(__version__)}


def _algorithm_name(identity: ModelIdentity) -> str:
    return f"Mammo-SAE {identity.concept} ({identity.classifier} + {identity.sae})"[:64]


# --- the three objects -----------------------------------------------------------------------------
def build_segmentation(header: Any, frac: np.ndarray, neurons: Sequence[int], scales, inp):
    """FRACTIONAL Segmentation: one segment per neuron, on the source grid."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algo = hd.AlgorithmIdentificationSequence(
        name=_algorithm_name(inp.identity),
        family=codes.cid7162.ArtificialIntelligence,
        version=_equipment()["software_versions"],
    )
    descriptions = []
    for i, (n, s) in enumerate(zip(neurons, scales, strict=True)):
        d = hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=f"neuron {int(n)} rank {i + 1}",
            segmented_property_category=_code("ACT", "Model activation"),
            segmented_property_type=_code("NEURON", "SAE neuron activation"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
        )
        d.SegmentDescription = f"fraction 1.0 = activation {float(s):.6g}"[:64]
        descriptions.append(d)
    seg = hd.seg.Segmentation(
        source_images=[header],
        pixel_array=frac[None],  # (1, rows, cols, k)
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBERS["SEG"],
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer_model_name=inp.identity.classifier[:64] or "classifier",
        device_serial_number="none",
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=MAX_FRACTIONAL_VALUE,
        content_description="SAE neuron activation / its maximum in the image",
        content_label="NEURONMAPS",
        omit_empty_frames=False,
        **_equipment(),
    )
    seg.SeriesDescription = "Mammo-SAE neuron maps (research, not for diagnosis)"
    return seg


def _measurement(value: str, meaning: str, number: float, unit: str = "1", unit_meaning="no units"):
    import highdicom as hd

    return hd.sr.Measurement(
        name=_code(value, meaning),
        value=float(number),
        unit=hd.sr.CodedConcept(unit, "UCUM", unit_meaning),
    )


def _intervention_measurements(iv: InterventionSummary, extent: Any) -> list:
    """The head's answer after an intervention, and its extent (neurons or feature cells)."""
    return [
        _measurement("P-INTERV", "Concept probability after intervention", iv.probability),
        _measurement("LOGIT-INTERV", "Concept logit after intervention", iv.logit),
        extent,
    ]


def _region_groups(header: Any, iv: InterventionSummary, concept: Any, algorithm: Any) -> list:
    """A region intervention: one planar-ROI group per box (its rectangle on the source image),
    each with the probability and logit after switching off everything under *all* the boxes."""
    import highdicom as hd

    if not iv.boxes:
        raise ExportError("a region intervention needs the boxes it switched off")
    out = []
    for i, (x0, y0, x1, y1) in enumerate(iv.boxes, start=1):
        corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=float)
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=corners,
            source_image=hd.sr.SourceImageForRegion.from_source_image(header),
        )
        out.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(),
                    identifier=f"intervention region box {i} of {len(iv.boxes)}"[:64],
                ),
                referenced_region=region,
                finding_type=concept,
                algorithm_id=algorithm,
                measurements=_intervention_measurements(
                    iv, _measurement("CELLS-INTERV", "Feature cells switched off", iv.cells)
                ),
            )
        )
    return out


def build_report(header: Any, inp: ExportInput, neurons, scores, scales, seg=None):
    """Comprehensive SR with a TID 1500 measurement report of the analysis."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    ident = inp.identity
    a = inp.analysis
    algorithm = hd.sr.AlgorithmIdentification(
        name=_algorithm_name(ident),
        version=_equipment()["software_versions"],
        parameters=[
            f"classifier={ident.classifier}",
            f"classifier_sha256={ident.classifier_sha256}",
            f"sae={ident.sae}",
            f"sae_sha256={ident.sae_sha256}",
            f"concept={ident.concept}",
            f"preprocess={ident.preprocess}",
        ],
    )
    source = [hd.sr.SourceImageForMeasurementGroup.from_source_image(header)]
    concept = _code(ident.concept.upper()[:16], f"Concept: {ident.concept}")
    groups = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="model output"),
            finding_type=concept,
            algorithm_id=algorithm,
            source_images=source,
            measurements=[
                _measurement("P-ORIG", "Concept probability, original features", a.probability),
                _measurement(
                    "P-SAE", "Concept probability, SAE reconstruction", a.reconstruction_probability
                ),
                _measurement("LOGIT-ORIG", "Concept logit, original features", a.logit),
                _measurement(
                    "LOGIT-SAE", "Concept logit, SAE reconstruction", a.reconstruction_logit
                ),
            ],
        )
    ]
    contributions = np.asarray(a.logit_contributions)
    for rank, (n, s, scale) in enumerate(zip(neurons, scores, scales, strict=True), start=1):
        n = int(n)
        ms = [
            _measurement("RANK", "Neuron rank", rank),
            _measurement("SCORE", "Neuron ranking score", s),
            _measurement("CONTRIB", "Neuron logit contribution", contributions[n]),
            _measurement("ACT-MAX", "Neuron maximum activation (segment scale)", scale),
        ]
        iou = inp.box_iou.get(n)
        if iou is not None and np.isfinite(iou):  # NaN: the image had no boxes to agree with
            ms.append(_measurement("BOX-IOU", "Neuron box agreement (IoU)", iou))
        evaluations = [
            hd.sr.QualitativeEvaluation(
                name=_code("VERDICT", "Clinician verdict"),
                value=_code(str(v).upper()[:16], f"Neuron judged {v}"),
            )
            for v in inp.verdicts.get(n, ())
        ]
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(), identifier=f"neuron {n} rank {rank}"
                ),
                finding_type=_code("NEURON", "SAE neuron activation"),
                algorithm_id=algorithm,
                source_images=source,
                measurements=ms,
                qualitative_evaluations=evaluations or None,
            )
        )
    if inp.intervention is not None and inp.intervention.mode == "region":
        groups.extend(_region_groups(header, inp.intervention, concept, algorithm))
    elif inp.intervention is not None:
        iv = inp.intervention
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(),
                    identifier=f"intervention {iv.mode} {len(iv.neurons)} neurons"[:64],
                ),
                finding_type=concept,
                algorithm_id=algorithm,
                source_images=source,
                measurements=_intervention_measurements(
                    iv, _measurement("N-INTERV", "Neurons in the intervention", len(iv.neurons))
                ),
            )
        )
    observer = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=hd.UID(), name="napari-mammo-sae", model_name=ident.classifier[:64]
            ),
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=observer,
        procedure_reported=hd.sr.CodedConcept("71651007", "SCT", "Mammography"),
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[header] + ([seg] if seg is not None else []),
        content=report,
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBERS["SR"],
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="napari-mammo-sae",
    )
    sr.SeriesDescription = "Mammo-SAE analysis report (research, not for diagnosis)"
    return sr


def overlay_rgb(record: Any, frac0: np.ndarray | None, caption: str) -> np.ndarray:
    """The windowed image with one neuron's fraction map over it and a caption band; uint8 RGB."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    display = record.display_pixels()
    step = max(1, int(np.ceil(max(display.shape) / SC_MAX_SIDE)))
    lo, hi = record.display_limits()
    grey = np.clip(
        (display[::step, ::step].astype(np.float32) - lo) / max(float(hi - lo), 1e-6), 0, 1
    )
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if frac0 is not None:
        f = frac0[::step, ::step]
        colour = colormaps["inferno"](f)[..., :3]
        alpha = (0.6 * f)[..., None]
        rgb = rgb * (1 - alpha) + colour * alpha
    img = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")
    band = max(24, img.height // 30)
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, img.width, band], fill=(0, 0, 0))
    font = ImageFont.load_default(size=max(12, int(band * 0.6)))
    draw.text((6, band * 0.15), caption, fill=(255, 255, 0), font=font)
    return np.asarray(img)


def build_capture(header: Any, rgb: np.ndarray, orientation, laterality):
    """RGB Secondary Capture of the overlay, burned-in caption included."""
    import highdicom as hd
    from pydicom.dataset import Dataset

    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBERS["SC"],
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="napari-mammo-sae",
        patient_orientation=orientation,
        laterality=laterality,
    )
    sc.BurnedInAnnotation = "YES"
    ref = Dataset()  # General Image module: the image this overlay was derived from
    ref.ReferencedSOPClassUID = header.SOPClassUID
    ref.ReferencedSOPInstanceUID = header.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    sc.DerivationDescription = "SAE neuron activation overlay on the windowed source image"
    sc.SeriesDescription = "Mammo-SAE overlay (NOT FOR DIAGNOSIS)"
    sc.ImageComments = CAPTION
    return sc


def _redact(text: str, header: Any) -> str:
    """``text`` with the source's patient-identifying values cut out."""
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
        value = str(header.get(keyword, "") or "")
        if len(value) > 1:
            text = text.replace(value, "<hidden>")
    return text[:300]


# --- one image -------------------------------------------------------------------------------------
def export_analysis(inp: ExportInput, out_dir: str | Path) -> ExportResult:
    """Write the Segmentation, SR and Secondary Capture of one analysed image into ``out_dir``."""
    t0 = time.perf_counter()
    source = Path(inp.source)
    header = read_source_header(source)
    record = inp.record
    if record is None:
        from .dicom import read_mammogram

        record = read_mammogram(source)
    a = inp.analysis
    if str(header.SOPInstanceUID) != str(record.sop_instance_uid) or (
        a.sop_instance_uid and a.sop_instance_uid != str(header.SOPInstanceUID)
    ):
        raise ExportError(f"{source.name}: the analysis is of another image than this file")
    neurons = [int(n) for n in (inp.neurons if inp.neurons is not None else a.top_neurons(inp.k))]
    neurons = neurons[: max(1, int(inp.k))] if inp.neurons is None else neurons
    if not neurons:
        raise ExportError("no neurons to export: analyse the image first")
    scores = (
        [float(s) for s in inp.scores][: len(neurons)]
        if inp.scores is not None
        else [float(np.asarray(a.logit_contributions)[n]) for n in neurons]
    )
    shape = (int(header.Rows), int(header.Columns))
    frac, scales = quantised_fractions(a, neurons, shape)
    orientation = patient_orientation(header, record)
    laterality = _laterality(header, record)

    caption = f"{CAPTION} | neuron {neurons[0]} (rank 1) | P={a.probability:.2f}"
    # highdicom warns about odd values by quoting them - patient names included: keep them quiet.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            # the capture does not need the segmentation: build it on the other core meanwhile
            with ThreadPoolExecutor(max_workers=1) as pool:
                capture = pool.submit(
                    lambda: build_capture(
                        header, overlay_rgb(record, frac[..., 0], caption), orientation, laterality
                    )
                )
                seg = build_segmentation(header, frac, neurons, scales, inp)
                if orientation is not None:
                    seg.PatientOrientation = list(orientation)
                sr = build_report(header, inp, neurons, scores, scales, seg)
                sc = capture.result()
        except (AttributeError, ValueError, TypeError) as exc:
            raise ExportError(
                f"{source.name}: highdicom refused to build the objects from this source "
                f"({type(exc).__name__}: {_redact(str(exc), header)})"
            ) from None

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    uid = str(header.SOPInstanceUID)
    paths = []
    for kind, ds in (("SEG", seg), ("SR", sr), ("SC", sc)):
        path = folder / f"{uid}.{kind}.dcm"
        tmp = path.with_name(path.name + ".part")
        ds.save_as(tmp, enforce_file_format=True)
        tmp.replace(path)
        paths.append(path)
    seconds = time.perf_counter() - t0
    log.info("exported %s (%s) to %s in %.2f s", uid, record.name, folder, seconds)
    return ExportResult(
        folder, paths[0], paths[1], paths[2], uid, str(header.StudyInstanceUID),
        tuple(neurons), tuple(float(s) for s in scales), seconds,
    )  # fmt: skip


def verdicts_from_store(database: Any, sae_hash: str, neurons: Sequence[int]) -> dict:
    """Each neuron's newest verdict per rater from a verdict database (path or URL), {n: [...]}."""
    from .labels.store import LabelStore

    with LabelStore(database) as store:
        return {int(n): [v.verdict for v in store.latest(sae_hash, int(n))] for n in neurons}


def stow(results: Sequence[ExportResult], client: Any) -> int:
    """Send exported objects to a PACS (STOW-RS), study by study; the number of objects stored.

    Any failure raises StowRejectedError naming the folder where the export stays.
    """
    from .errors import PacsError

    n = 0
    for res in results:
        try:
            client.store(res.paths, study_instance_uid=res.study_instance_uid)
        except PacsError as exc:
            raise StowRejectedError(
                f"{exc} - the exported objects are kept in {res.folder}", res.folder
            ) from None
        n += len(res.paths)
    return n
