"""Synthetic screening mammograms with known truth (lesions, planted confounder).

``napari-mammo-sae phantom --out DIR --studies N --seed S`` writes a VinDr-Mammo-layout dataset;
the Python entry points are :func:`napari_mammo_sae.phantom.dataset.write_dataset`,
:func:`~napari_mammo_sae.phantom.dataset.plan_dataset` and
:func:`~napari_mammo_sae.phantom.dataset.render_image` (one image and its truth, in memory).
Modules: ``anatomy`` (breast outline, tissue), ``lesions`` (masses, calcifications, distractors,
marker), ``cues`` (optional shortcuts: lead marker, biopsy clip, site effect), ``writer`` (MG DICOM),
``dataset`` (plan, render, CSVs, ``phantom.json``), ``cli``. Importing this package is
cheap: numpy and pydicom load with the modules.
"""

#: named image sizes: name -> (rows, columns, pixel spacing in mm)
SIZES = {
    "small": (448, 368, 0.6),
    "medium": (1400, 1150, 0.2),
    "full": (2800, 2300, 0.1),
}
