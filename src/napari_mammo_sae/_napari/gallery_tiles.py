"""The neuron gallery's data and drawing, Qt-free: the crops of a neuron's top-activating images.

``napari-mammo-sae probe`` stores each top neuron's top-activating images with the feature cell of
its maximum (:class:`pipeline.probe.TopActivation`). :func:`gallery_tiles` (the gallery dock's
worker body) reads those images from the dataset folder (VinDr layout) and cuts a crop around that
cell; the neuron's map comes from the feature store the probe was made from (the SAE encodes the
stored map: no backbone run) or, without a store, from the explorer's Analyzer (one cached backbone
run per image). :func:`draw_tiles` draws them on a matplotlib figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = 4
CONTEXT_CELLS = 2  # feature cells of context around the strongest cell
THUMB_PIXELS = 256  # crops are subsampled to at most this many pixels a side


def find_image(data_dir: Path, image_id: str) -> Path | None:
    """images/<study>/<image_id>.dicom (or .dcm) under a VinDr-layout folder."""
    for suffix in (".dicom", ".dcm", ""):
        hits = list((Path(data_dir) / "images").glob(f"*/{image_id}{suffix}"))
        if hits:
            return hits[0]
    return None


@dataclass
class Tile:
    """One gallery crop: the image region, the neuron's map on the feature grid, where it sits."""

    path: Path
    image_id: str
    sop_instance_uid: str
    split: str
    activation: float  # the probe's maximum activation in this image
    cell: tuple[int, int]  # the probe's strongest cell (i, j)
    crop: np.ndarray  # display pixels of the crop (subsampled by `step`)
    crop_box: tuple[int, int, int, int]  # (row0, col0, row1, col1) of the crop, original pixels
    step: int  # subsampling of `crop`
    limits: tuple[float, float]  # display window
    heat: np.ndarray | None  # (h, w) latent map of the neuron, None without an SAE
    geometry: Any  # geometry.Geometry of the model input
    grid: tuple[int, int]  # feature grid (h, w)
    cell_box: tuple[float, float, float, float]  # (row0, col0, row1, col1) of `cell`, original


def _store_maps(store_path: Path, sae: Any, neuron: int) -> Any:
    """A function image_id -> (heat (h, w) or None without an SAE, geometry) reading the store."""
    import torch

    from ..pipeline.probe import encode_latents
    from ..pipeline.store import open as open_store

    store = open_store(store_path)
    rows = {str(image_id): i for i, image_id in enumerate(store.index.image_id)}

    def heat(image_id: str) -> tuple[np.ndarray | None, Any, tuple[int, int]] | None:
        row = rows.get(image_id)
        if row is None:
            return None
        if sae is None:
            return None, store.geometry(row), store.grid
        tokens = torch.as_tensor(store.tokens(row))
        device = next(iter(sae.parameters())).device
        with torch.inference_mode():
            z = encode_latents(sae, tokens.to(device), [int(neuron)])
        heat_map = z.float().cpu().numpy()[:, 0].reshape(store.grid)
        return heat_map, store.geometry(row), store.grid

    heat.close = store.close  # type: ignore[attr-defined]
    return heat


def gallery_tiles(
    neuron: int,
    probe: Any,
    data_dir: str | Path,
    n: int,
    *,
    analyzer: Any = None,
    store_path: str | Path | None = None,
    progress: Any = None,
) -> list[Tile]:
    """Worker body (no Qt): crops of the neuron's top images with its heatmap (up to ``n``)."""
    from ..dicom import read_mammogram
    from ..errors import MammoSAEError
    from ..progress import check_cancelled

    tops = probe.top_images.get(int(neuron), [])[:n]
    from_store = None
    if store_path:
        sae = analyzer.sae if analyzer is not None else None
        from_store = _store_maps(Path(store_path), sae, neuron)
    if progress is not None:
        progress.set_total(len(tops))
    tiles: list[Tile] = []
    try:
        for top in tops:
            check_cancelled(progress)
            path = find_image(Path(data_dir), top.image_id)
            if path is None:
                continue
            try:
                record = read_mammogram(path)
                got = from_store(top.image_id) if from_store is not None else None
                if (got is None or got[0] is None) and analyzer is not None:
                    analysis = analyzer.analyse(record)
                    got = (analysis.latent_maps([int(neuron)])[0], analysis.geometry,
                           tuple(analysis.grid))  # fmt: skip
            except MammoSAEError:  # an unreadable file is skipped, the others still show
                continue
            if got is None:
                continue
            tiles.append(_tile(record, path, top, *got))
            if progress is not None:
                progress.update(1)
    finally:
        if from_store is not None:
            from_store.close()
    return tiles


def _tile(
    record: Any, path: Path, top: Any, heat: np.ndarray | None, geometry: Any, grid: tuple
) -> Tile:
    """Cut the crop around the probe's cell (no full-resolution heatmap is ever made)."""
    i, j = top.cell
    heat = None if heat is None else np.asarray(heat, dtype=np.float32)
    r0, c0, r1, c1 = geometry.feature_cell_box(grid, i, j)
    h, w = r1 - r0, c1 - c0
    rows, cols = record.shape
    y0 = int(max(0, np.floor(r0 - CONTEXT_CELLS * h)))
    y1 = int(min(rows, np.ceil(r1 + CONTEXT_CELLS * h)))
    x0 = int(max(0, np.floor(c0 - CONTEXT_CELLS * w)))
    x1 = int(min(cols, np.ceil(c1 + CONTEXT_CELLS * w)))
    step = max(1, int(np.ceil(max(y1 - y0, x1 - x0) / THUMB_PIXELS)))
    pixels = record.display_pixels()
    crop = np.ascontiguousarray(pixels[y0:y1:step, x0:x1:step], dtype=np.float32)
    return Tile(
        path=path, image_id=top.image_id, sop_instance_uid=top.sop_instance_uid, split=top.split,
        activation=float(top.activation), cell=(int(i), int(j)), crop=crop,
        crop_box=(y0, x0, y1, x1), step=step, limits=tuple(record.display_limits()), heat=heat,
        geometry=geometry, grid=(int(grid[0]), int(grid[1])), cell_box=(float(r0), float(c0), float(r1), float(c1)),
    )  # fmt: skip


def draw_tiles(figure: Any, neuron: int, tiles: list[Tile]) -> list[Any]:
    """Draw the tiles on a matplotlib figure (grid of crops + heatmap); returns the axes."""
    import matplotlib.patches as patches

    figure.clear()
    if not tiles:
        return []
    cols = min(COLUMNS, len(tiles))
    rows = int(np.ceil(len(tiles) / cols))
    vmax = max([float(np.max(t.heat)) for t in tiles if t.heat is not None] + [0.0]) or 1.0
    axes = []
    for k, t in enumerate(tiles):
        ax = figure.add_subplot(rows, cols, k + 1)
        y0, x0, y1, x1 = t.crop_box
        lo, hi = t.limits
        ax.imshow(t.crop, cmap="gray", vmin=lo, vmax=hi, extent=(x0, x1, y1, y0),
                  interpolation="nearest")  # fmt: skip
        if t.heat is not None:
            # the feature grid spans exactly the crop box of the model input (edge coordinates)
            cr0, cc0, cr1, cc1 = t.geometry.crop_box
            # light enough to read the tissue under it: a neuron that fires over the whole crop
            # must not hide what it fires on. Below a third of this image's peak stays clear; the
            # strongest cells get an outline
            peak = float(np.max(t.heat)) or 1.0
            extent = (cc0, cc1, cr1, cr0)
            ax.imshow(np.ma.masked_less_equal(t.heat, peak / 3), cmap="inferno", alpha=0.3, vmin=0,
                      vmax=vmax, extent=extent, interpolation="nearest")  # fmt: skip
            h, w = t.heat.shape
            ys = cr0 + (np.arange(h) + 0.5) * (cr1 - cr0) / h
            xs = cc0 + (np.arange(w) + 0.5) * (cc1 - cc0) / w
            if h > 1 and w > 1:
                ax.contour(xs, ys, t.heat, levels=[0.6 * peak], colors="#ffb000", linewidths=0.7)
        r0, c0, r1, c1 = t.cell_box
        ax.add_patch(patches.Rectangle((c0, r0), c1 - c0, r1 - r0, fill=False, ec="#00e5ff",
                                       lw=0.9))  # fmt: skip
        ax.set_xlim(x0, x1)
        ax.set_ylim(y1, y0)
        ax.set_title(f"{t.activation:.3g} · {t.split or '?'}", color="white", fontsize=7, pad=2)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color("#555")
        ax._gallery_index = k
        axes.append(ax)
    figure.suptitle(f"neuron {neuron}: top-activating images (max activation · split)",
                    color="white", fontsize=8)  # fmt: skip
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.9, wspace=0.08, hspace=0.25)
    return axes
