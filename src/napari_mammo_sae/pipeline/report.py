"""Write an evaluation's results as a report folder: results.json, CSVs, PNG plots and index.html.

The HTML is static (no JavaScript) and links its files relatively, so the folder can be copied,
zipped or opened from any browser. Plots use matplotlib's Agg backend (no display needed).

Expected ``results`` keys (all optional except ``meta``), as :mod:`.evaluate` produces them:

- ``table1``: rows ``{variant, concept, head, without: metrics, with: metrics}``
- ``figure2``: rows ``{variant, concept, mode ("activated"|"deactivated"), k: [...],
  union_size: [...], auroc: [...], auroc_ci: [[lo, hi], ...]}``
- ``table2``: rows ``{variant, concept, neurons: [...], ap_finding_images: [...],
  mean_ap_finding_images, ap_whole_split: [...], mean_ap_whole_split}`` (the two AP protocols of
  ``analysis.localisation.AP_PROTOCOLS``)
- ``figure4``: rows ``{variant, concept, top_neurons: [...], mean_positive: str (npz key),
  mean_negative: ...}`` with the vectors passed separately in ``arrays``
- ``confounder``: rows ``{variant, concept, neurons: [{neuron, iou_cue, iou_lesion, ...}],
  cue_negatives: {...}}``; the verdicts are drawn with ``analysis.confounder``'s one rule, which the
  report states
- ``shortcuts``: ``analysis.shortcuts.ShortcutRow.as_dict()`` rows (``evaluate --run``; the rule in
  ``meta["shortcut_rule"]``), the full table in ``shortcuts.csv``
- ``localisation``: ``pipeline.layer_localisation.LocalisationRow.as_dict()`` rows (``evaluate
  --run``), the full table in ``localisation.csv``
"""

from __future__ import annotations

import csv
import html
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis.confounder import RULE as CONFOUNDER_RULE
from ..analysis.confounder import on_cue, on_lesion

# Table 2's two AP protocols: results key -> label (analysis.localisation.AP_PROTOCOLS)
AP_COLUMNS = {
    "finding_images": "AP, images with a finding (paper protocol)",
    "whole_split": "AP, whole test split",
}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _ci(ci: Any) -> str:
    if not ci or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in ci):
        return ""
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def _slug(*parts: str) -> str:
    return "_".join(str(p).replace(" ", "-").replace("/", "-") for p in parts)


# (f) and (g): results key -> column title
SHORTCUT_COLUMNS = {
    "cue": "cue", "concept": "concept", "layer": "layer", "reliance": "reliance",
    "cue_neurons": "cue neurons", "best_cue_share": "best cue share", "gap_closed": "gap closed",
    "auroc_clean_before": "clean AUROC before", "auroc_clean_after": "after",
    "isolated": "isolated",
}  # fmt: skip
LOCALISATION_COLUMNS = {
    "layer": "layer", "concept": "concept", "grid": "grid", "cell_mm_row": "cell mm (row)",
    "cell_mm_col": "cell mm (col)", "finding_span_cells_row": "finding span, cells (row)",
    "finding_span_cells_col": "(col)", "method": "box rule",
    "mean_ap_finding_images": "AP, images with a finding (paper)",
    "mean_ap_whole_split": "AP, whole test split", "n_finding_images": "n finding images",
    "n_whole_split": "n images", "recall_ceiling": "recall ceiling",
    "median_best_iou": "median best IoU", "pred_span_cells_row": "box span, cells (row)",
    "pred_span_cells_col": "(col)",
}  # fmt: skip


def _table(rows: list[Mapping[str, Any]], columns: Mapping[str, str]) -> str:
    """A plain HTML table of the given keys of each row (text left, numbers right)."""
    esc = html.escape

    def cell(value: Any) -> str:
        if isinstance(value, bool):
            return "<td class=l>yes</td>" if value else "<td class=l>no</td>"
        if isinstance(value, list):
            return f"<td class=l>{esc(', '.join(str(v) for v in value)) or '-'}</td>"
        if isinstance(value, str):
            return f"<td class=l>{esc(value)}</td>"
        return f"<td>{_fmt(value)}</td>"

    head = "".join(f"<th>{esc(title)}</th>" for title in columns.values())
    body = "".join("<tr>" + "".join(cell(r.get(k)) for k in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# --- plots -------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_figure2(rows: list[Mapping[str, Any]], path: Path, title: str) -> None:
    """AUROC versus k for top-k activated and top-k deactivated (the paper's Figure 2)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    xmax = 1.0
    for row in rows:
        ks = np.asarray(row["union_size"], dtype=float)
        au = np.asarray(row["auroc"], dtype=float)
        style = "o-" if row["mode"] == "activated" else "s--"
        (line,) = ax.plot(ks, au, style, label=f"top-k {row['mode']}")
        cis = row.get("auroc_ci")
        if cis:
            lo = np.array([c[0] if c else np.nan for c in cis], dtype=float)
            hi = np.array([c[1] if c else np.nan for c in cis], dtype=float)
            ax.fill_between(ks, lo, hi, alpha=0.12, color=line.get_color(), lw=0)
        xmax = max(xmax, float(np.nanmax(ks)) if ks.size else 1.0)
    if rows and rows[0].get("baseline") is not None:
        ax.axhline(rows[0]["baseline"], color="grey", lw=1, ls=":", label="with SAE, all latents")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, xmax * 1.5)
    ax.set_xlabel("neurons in the top-k union (class 0 and class 1)")
    ax.set_ylabel("AUROC (test)")
    ax.set_ylim(0.0, 1.02)
    ax.axhline(0.5, color="k", lw=0.5)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_figure4(
    mean_pos: np.ndarray, mean_neg: np.ndarray, top: list[int], path: Path, title: str
) -> None:
    """Class-wise mean latent activations, positive vs negative, top neurons labelled (Figure 4)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.0, 3.6), dpi=100)
    x = np.arange(mean_pos.size)
    ax.plot(x, mean_neg, color="tab:blue", lw=0.8, label="class 0 (negative)")
    ax.plot(x, mean_pos, color="tab:red", lw=0.8, alpha=0.8, label="class 1 (positive)")
    for n in top:
        ax.annotate(
            str(n),
            (n, mean_pos[n]),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            fontsize=7,
            color="tab:red",
        )
        ax.plot([n], [mean_pos[n]], "v", color="tab:red", ms=4)
    ax.set_xlabel("latent neuron")
    ax.set_ylabel("mean activation (train)")
    ax.margins(y=0.12)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_table2(row: Mapping[str, Any], path: Path, title: str) -> None:
    """AP@0.25 per top-10 class-1 neuron under both protocols, as bars (Table 2 as a picture)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    x = np.arange(len(row["neurons"]))
    for j, ((key, label), colour) in enumerate(
        zip(AP_COLUMNS.items(), ("tab:green", "tab:purple"), strict=True)
    ):
        ap = np.nan_to_num(np.asarray(row.get(f"ap_{key}", [np.nan] * x.size), dtype=float))
        mean_ap = row.get(f"mean_ap_{key}")
        if mean_ap is not None and not math.isnan(mean_ap):
            label = f"{label} (mean {mean_ap:.3f})"
        ax.bar(x + (j - 0.5) * 0.4, ap, width=0.4, color=colour, label=label)
    ax.set_xticks(x, [str(n) for n in row["neurons"]], fontsize=8)
    ax.set_xlabel("top class-1 neuron (rank order)")
    ax.set_ylabel("AP @ IoU 0.25")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_localisation(panels: list[Mapping[str, Any]], path: Path, title: str) -> None:
    """Heatmaps of top neurons over test images, annotation boxes red, predicted boxes yellow.

    Each panel: ``image`` (2-D display pixels), ``limits`` (lo, hi), ``heatmap`` (2-D, over the crop
    box), ``crop_box`` (row0, col0, row1, col1), ``gt`` and ``pred`` boxes (xmin, ymin, xmax, ymax)
    in original pixels, ``shape`` (original rows, cols; the image may be downsampled), ``label``.
    """
    plt = _plt()
    from matplotlib.patches import Rectangle

    n = len(panels)
    cols = min(n, 5)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 3.2 * rows), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, p in zip(axes.ravel(), panels, strict=False):
        img = np.asarray(p["image"], dtype=float)
        h, w = p.get("shape") or img.shape
        lo, hi = p.get("limits") or (float(img.min()), float(img.max()))
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, extent=(0, w, h, 0))
        r0, c0, r1, c1 = p["crop_box"]
        heat = np.asarray(p["heatmap"], dtype=float)
        if heat.max() > 0:
            ax.imshow(heat / heat.max(), cmap="inferno", alpha=0.45, extent=(c0, c1, r1, r0),
                      vmin=0, vmax=1)  # fmt: skip
        for colour, key in (("red", "gt"), ("yellow", "pred")):
            for x0, y0, x1, y1 in p.get(key, []):
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=1.2))
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_title(str(p.get("label", "")), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- the report --------------------------------------------------------------------------------
_CSS = """body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}
td.l,th.l{text-align:left}img{max-width:100%;border:1px solid #ddd;margin:4px 0}
.warn{color:#a40}"""


def write_report(
    results: Mapping[str, Any],
    out_dir: str | Path,
    arrays: Mapping[str, Any] | None = None,
) -> Path:
    """Write results.json, CSVs, PNGs and index.html into ``out_dir``; return index.html's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = dict(arrays or {})
    body: list[str] = []
    esc = html.escape
    meta = results.get("meta", {})

    body.append("<h1>Mammo-SAE evaluation report</h1>")
    body.append("<table>")
    for key, value in meta.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=_json_default)
        body.append(f"<tr><th class=l>{esc(str(key))}</th><td class=l>{esc(str(value))}</td></tr>")
    body.append("</table>")
    for note in results.get("notes", []):
        body.append(f"<p class=warn>{esc(note)}</p>")

    # (a) Table 1
    rows = results.get("table1", [])
    body.append("<h2>(a) Table 1: AUROC without vs with SAE reconstruction</h2>")
    if rows:
        csv_rows = []
        body.append(
            "<table><tr><th class=l>variant</th><th class=l>concept</th><th>n (pos)</th>"
            "<th>AUROC without SAE [95% CI]</th><th>AUROC with SAE [95% CI]</th>"
            "<th>AUPRC without / with</th><th>F1@0.5 without / with</th></tr>"
        )
        for r in rows:
            wo, wi = r["without"], r["with"]
            body.append(
                f"<tr><td class=l>{esc(r['variant'])}</td><td class=l>{esc(r['concept'])}</td>"
                f"<td>{wo['n']} ({wo['positives']})</td>"
                f"<td>{_fmt(wo['auroc'])}{_ci(wo.get('auroc_ci'))}</td>"
                f"<td>{_fmt(wi['auroc'])}{_ci(wi.get('auroc_ci'))}</td>"
                f"<td>{_fmt(wo['auprc'])} / {_fmt(wi['auprc'])}</td>"
                f"<td>{_fmt(wo['f1'])} / {_fmt(wi['f1'])}</td></tr>"
            )
            csv_rows.append(
                [r["variant"], r["concept"], wo["n"], wo["positives"]]
                + [wo["auroc"], *(wo.get("auroc_ci") or [None, None])]
                + [wi["auroc"], *(wi.get("auroc_ci") or [None, None])]
                + [wo["auprc"], wi["auprc"], wo["precision"], wo["recall"], wo["f1"]]
                + [wi["precision"], wi["recall"], wi["f1"]]
            )
        body.append("</table>")
        _write_csv(
            out / "table1_auroc.csv",
            ["variant", "concept", "n", "positives", "auroc_without", "ci_lo_without"]
            + ["ci_hi_without", "auroc_with", "ci_lo_with", "ci_hi_with", "auprc_without"]
            + ["auprc_with", "precision_without", "recall_without", "f1_without"]
            + ["precision_with", "recall_with", "f1_with"],
            csv_rows,
        )
        body.append('<p><a href="table1_auroc.csv">table1_auroc.csv</a></p>')
    else:
        body.append("<p>No heads evaluated.</p>")

    # (b) Figure 2
    rows = results.get("figure2", [])
    body.append("<h2>(b) Figure 2: AUROC vs k, top-k activated and deactivated</h2>")
    if rows:
        groups: dict[tuple[str, str], list] = {}
        csv_rows = []
        for r in rows:
            groups.setdefault((r["variant"], r["concept"]), []).append(r)
            cis = r.get("auroc_ci") or [None] * len(r["k"])
            for k, u, a, ci in zip(r["k"], r["union_size"], r["auroc"], cis, strict=True):
                csv_rows.append(
                    [r["variant"], r["concept"], r["mode"], k, u, a, *(ci or [None, None])]
                )
        _write_csv(
            out / "figure2_topk.csv",
            ["variant", "concept", "mode", "k", "union_size", "auroc", "ci_lo", "ci_hi"],
            csv_rows,
        )
        for (variant, concept), group in groups.items():
            name = f"figure2_{_slug(variant, concept)}.png"
            plot_figure2(group, out / name, f"{concept}, {variant}")
            body.append(f'<h3>{esc(concept)}, {esc(variant)}</h3><img src="{name}" alt="{name}">')
            body.append("<table><tr><th>k</th><th>union</th>")
            body.extend(f"<th>AUROC {esc(g['mode'])}</th>" for g in group)
            body.append("</tr>")
            for i, k in enumerate(group[0]["k"]):
                body.append(f"<tr><td>{esc(str(k))}</td><td>{group[0]['union_size'][i]}</td>")
                body.extend(f"<td>{_fmt(g['auroc'][i])}</td>" for g in group)
                body.append("</tr>")
            body.append("</table>")
        body.append('<p><a href="figure2_topk.csv">figure2_topk.csv</a></p>')
    else:
        body.append("<p>Not computed.</p>")

    # (c) Table 2
    rows = results.get("table2", [])
    body.append("<h2>(c) Table 2: localisation AP@0.25 of the top-10 class-1 neurons</h2>")
    if rows:
        method = results.get("meta", {}).get("localisation", "")
        if method:
            body.append(f"<p>{esc(str(method))}</p>")
        csv_rows = []
        width = max(len(r["neurons"]) for r in rows)
        body.append(
            "<p>Two protocols: <b>images with a finding</b> scores only the test images with a box "
            "of the concept (the paper's); <b>whole test split</b> scores every test image, so "
            "boxes on images without a finding are false positives.</p>"
        )
        body.append(
            "<table><tr><th class=l>concept</th><th class=l>variant</th><th class=l>protocol</th>"
        )
        body.extend(f"<th>{i + 1}</th>" for i in range(width))
        body.append("<th>mean</th></tr>")
        for r in rows:
            for key, label in AP_COLUMNS.items():
                aps = r.get(f"ap_{key}", [math.nan] * len(r["neurons"]))
                body.append(
                    f"<tr><td class=l>{esc(r['concept'])}</td><td class=l>{esc(r['variant'])}</td>"
                    f"<td class=l>{esc(label)}</td>"
                )
                for i in range(width):
                    if i < len(r["neurons"]):
                        body.append(f"<td>{_fmt(aps[i])}<br><small>#{r['neurons'][i]}</small></td>")
                    else:
                        body.append("<td></td>")
                body.append(f"<td><b>{_fmt(r.get(f'mean_ap_{key}', math.nan))}</b></td></tr>")
            for rank, n in enumerate(r["neurons"], 1):
                csv_rows.append(
                    [r["variant"], r["concept"], rank, n]
                    + [r.get(f"ap_{key}", [math.nan] * rank)[rank - 1] for key in AP_COLUMNS]
                )
            name = f"table2_{_slug(r['variant'], r['concept'])}.png"
            plot_table2(r, out / name, f"{r['concept']}, {r['variant']}")
        body.append("</table>")
        for r in rows:
            name = f"table2_{_slug(r['variant'], r['concept'])}.png"
            body.append(f'<img src="{name}" alt="{name}">')
            panels = arrays.pop(f"panels_{_slug(r['variant'], r['concept'])}", None)
            if panels:
                name = f"localisation_{_slug(r['variant'], r['concept'])}.png"
                plot_localisation(
                    panels, out / name, f"{r['concept']}, {r['variant']}: top neurons"
                )
                body.append(
                    f"<p>Top class-1 neurons on positive test images: annotation boxes red, "
                    f'95th-percentile boxes yellow.</p><img src="{name}" alt="{name}">'
                )
        _write_csv(
            out / "table2_localisation.csv",
            ["variant", "concept", "rank", "neuron"] + [f"ap_{key}" for key in AP_COLUMNS],
            csv_rows,
        )
        body.append('<p><a href="table2_localisation.csv">table2_localisation.csv</a></p>')
    else:
        body.append("<p>Not computed (no annotation boxes).</p>")

    # (d) Figure 4
    rows = results.get("figure4", [])
    body.append("<h2>(d) Figure 4: class-wise mean latent activations</h2>")
    if rows:
        for r in rows:
            pos = np.asarray(arrays[r["mean_positive"]], dtype=float)
            neg = np.asarray(arrays[r["mean_negative"]], dtype=float)
            slug = _slug(r["variant"], r["concept"])
            name = f"figure4_{slug}.png"
            plot_figure4(
                pos, neg, list(r["top_neurons"]), out / name, f"{r['concept']}, {r['variant']}"
            )
            _write_csv(
                out / f"figure4_{slug}.csv",
                ["neuron", "mean_negative", "mean_positive"],
                [[i, float(neg[i]), float(pos[i])] for i in range(pos.size)],
            )
            tops = ", ".join(str(n) for n in r["top_neurons"])
            body.append(
                f'<h3>{esc(r["concept"])}, {esc(r["variant"])}</h3><img src="{name}" alt="{name}">'
                f"<p>top class-1 neurons: {esc(tops)} &middot; "
                f'<a href="figure4_{slug}.csv">figure4_{slug}.csv</a></p>'
            )
    else:
        body.append("<p>Not computed.</p>")

    # (e) confounder check
    rows = results.get("confounder", [])
    if rows:
        body.append("<h2>(e) Confounder check (phantom: planted cue vs lesions)</h2>")
        body.append(f"<p>Rule: {esc(CONFOUNDER_RULE)}.</p>")
        csv_rows = []
        for r in rows:
            body.append(f"<h3>{esc(r['concept'])}, {esc(r['variant'])}</h3>")
            body.append(
                "<table><tr><th>neuron</th><th>mean IoU with cue</th><th>mean IoU with lesion</th>"
                "<th>share of cue images at IoU &ge; 0.25</th><th>share of lesion images at IoU "
                "&ge; 0.25</th><th class=l>verdict</th></tr>"
            )
            for n in r["neurons"]:
                cue_side = on_cue(n["iou_cue"], n["iou_lesion"])
                verdict = (
                    "CUE (confounder)"
                    if cue_side
                    else "lesion"
                    if on_lesion(n["iou_cue"], n["iou_lesion"])
                    else "-"
                )
                body.append(
                    f"<tr><td>{n['neuron']}</td><td>{_fmt(n['iou_cue'])}</td>"
                    f"<td>{_fmt(n['iou_lesion'])}</td><td>{_fmt(n['frac_cue'])}</td>"
                    f"<td>{_fmt(n['frac_lesion'])}</td><td class=l>{verdict}</td></tr>"
                )
                csv_rows.append(
                    [r["variant"], r["concept"], n["neuron"], n["iou_cue"], n["iou_lesion"]]
                    + [n["frac_cue"], n["frac_lesion"], cue_side]
                )
            body.append("</table>")
            eff = r.get("cue_negatives")
            if eff:
                body.append(
                    f"<p>Cue-only negatives (n={eff['n']}): mean probability "
                    f"{_fmt(eff['mean_probability'])} with all latents, "
                    f"{_fmt(eff['mean_probability_without_cue_neurons'])} with the cue neurons "
                    f"{esc(str(eff['neurons']))} deactivated; clean negatives (n={eff['n_clean']}): "
                    f"{_fmt(eff['mean_probability_clean'])}.</p>"
                )
        _write_csv(
            out / "confounder.csv",
            ["variant", "concept", "neuron", "iou_cue", "iou_lesion", "frac_cue", "frac_lesion"]
            + ["on_cue"],
            csv_rows,
        )
        body.append('<p><a href="confounder.csv">confounder.csv</a></p>')

    # (f), (g): evaluate --run; the CSVs are written by their own writers (stated column lists)
    rows = results.get("shortcuts", [])
    if rows:
        body.append("<h2>(f) Shortcut report (every cue x layer)</h2>")
        rule = meta.get("shortcut_rule")
        if rule:
            body.append(f"<p>Rule: {esc(str(rule))}.</p>")
        body.append(_table(rows, SHORTCUT_COLUMNS))
        body.append('<p><a href="shortcuts.csv">shortcuts.csv</a></p>')
    rows = results.get("localisation", [])
    if rows:
        body.append("<h2>(g) Localisation by layer: AP@0.25, both box rules</h2>")
        body.append(
            "<p>Top-10 class-1 neurons (class mean) of each run's SAE; <b>percentile</b>: the "
            "paper's 95th-percentile boxes, <b>contour</b>: the paper code's 0.3 x max contours. "
            "Cell: model-input pixel x stride; span: median finding box in feature cells; recall "
            "ceiling, best IoU and box span: what limits the AP.</p>"
        )
        body.append(_table(rows, LOCALISATION_COLUMNS))
        body.append('<p><a href="localisation.csv">localisation.csv</a></p>')

    body.append(
        '<p><a href="results.json">results.json</a> (all figures above, machine-readable)</p>'
    )
    (out / "results.json").write_text(
        json.dumps(results, indent=1, default=_json_default, allow_nan=True)
    )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Mammo-SAE report</title>"
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
