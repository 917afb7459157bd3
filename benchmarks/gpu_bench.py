"""Every GPU figure of BENCHMARKS.md in one run, as ratios (``benchmarks/gpu.sh`` runs this).

Usage::

    python benchmarks/gpu_bench.py [--device cuda] [--out gpu.json]    # the figures (< 8 min)
    python benchmarks/gpu_bench.py --dry-run                          # CPU, tiny sizes: checks it would work

Figures, each as a ratio measured in this run on this GPU:

1. backbone: Mammo-CLIP's B5 (static padding) ``forward_features`` at 1520 x 912, batch 1 and 8: eager
   fp32, bf16 autocast + channels_last (the ``torch`` runtime on CUDA) and ``torch.compile`` of
   the bf16 runtime, with each one's max relative difference to fp32;
2. analysis latency per view: ``Analyzer`` (B5 + a 16,384-latent SAE, bf16) on a full-size DICOM,
   end to end, against the same run's bare backbone + SAE encode (target: <= 0.3 s per view on an
   H100-class GPU, <= 1.15x the bare compute); and a four-view exam at once (``analyse_many``:
   one batched backbone pass, one SAE encode) per view;
3. SAE training at the paper's size (d 2048, 16,384 latents, batch 4096, Adam, unit-norm decoder):
   tokens/s in bf16 autocast and fp32, 12*d*m FLOPs per token against the same run's bf16 matmul
   peak (4096x2048 @ 2048x16384), and both losses after the same steps (bf16 quality check);
4. ``extract`` images/s (DICOM decode + preprocess in loader workers, pinned memory, bf16 forward,
   fp16 store) against the bare bf16 forward rate at the same batch size.

``--dry-run`` runs every code path on the CPU at tiny sizes (timm's ``test_efficientnet`` at 64 x 64
without the static padding, a 256-latent SAE, ``torch.compile`` with the ``eager`` backend, bf16
autocast on the CPU, two phantom studies) and checks the figures are finite; it measures nothing
worth recording.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FULL = {
    "arch": "tf_efficientnet_b5",
    "size": (1520, 912),
    "batches": (1, 8),
    "latents": 16384,
    "sae_d": 2048,
    "sae_batch": 4096,
    "sae_steps": 30,
    "extract_images": 96,
    "extract_batch": 8,
    "workers": 8,
    "runs": 10,
    "dicom": (3000, 2400),
    "phantom_size": "full",
    "compile_backend": "inductor",
}
TINY = {
    "arch": "test_efficientnet",
    "size": (64, 64),
    "batches": (1, 2),
    "latents": 256,
    "sae_d": 64,
    "sae_batch": 128,
    "sae_steps": 3,
    "extract_images": 8,
    "extract_batch": 2,
    "workers": 0,
    "runs": 1,
    "dicom": (300, 200),
    "phantom_size": "small",
    "compile_backend": "eager",
}


def _static(cfg: dict):
    """Mammo-CLIP's lukemelas padding for tf_efficientnet_* (as converted checkpoints load)."""
    return cfg["size"] if cfg["arch"].startswith("tf_efficientnet") else None


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device, runs: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def _backbone_at(cfg: dict, device, batch: int, compile_it: bool) -> dict:
    import torch

    from napari_mammo_sae.models.backbone import create_backbone
    from napari_mammo_sae.models.runtime import TorchRuntime

    torch.manual_seed(0)
    model = create_backbone(cfg["arch"], static_padding=_static(cfg)).eval().to(device)
    x = torch.randn(batch, 3, *cfg["size"], device=device)
    eager = TorchRuntime(model, device=device, channels_last=False)
    ref = eager(x)
    t_eager = _median_time(lambda: eager(x), device, cfg["runs"])
    fast = TorchRuntime(model, device=device, dtype="bfloat16", channels_last=True)
    t_bf16 = _median_time(lambda: fast(x), device, cfg["runs"])
    d_bf16 = _rel(fast(x), ref)
    t_comp, compile_s, d_comp = math.nan, 0.0, math.nan
    if compile_it:  # compiling costs a minute or more per shape
        fast.forward = torch.compile(model.forward_features, backend=cfg["compile_backend"])
        t0 = time.perf_counter()
        d_comp = _rel(fast(x), ref)  # compiles
        _sync(device)
        compile_s = time.perf_counter() - t0
        t_comp = _median_time(lambda: fast(x), device, cfg["runs"])
    return {
        "eager_fp32_s": t_eager,
        "bf16_channels_last_s": t_bf16,
        "compiled_bf16_s": t_comp,
        "compile_s": compile_s,
        "bf16_speedup": t_eager / t_bf16,
        "compiled_speedup": t_eager / t_comp,
        "images_per_s_compiled": batch / t_comp,
        "bf16_max_rel_diff": d_bf16,
        "compiled_max_rel_diff": d_comp,
    }


def backbone_figures(cfg: dict, device) -> dict:
    """Eager fp32 vs bf16 + channels_last (vs compiled: first batch size only), per batch size."""
    batches = cfg["batches"]
    return {b: _backbone_at(cfg, device, b, compile_it=b == batches[0]) for b in batches}


def analysis_figures(cfg: dict, device, tmp: Path) -> dict:
    """Analyzer end to end per view vs the same run's bare backbone + SAE encode."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from data_helpers import breast_image, write_mammogram
    from napari_mammo_sae.dicom import read_mammogram
    from napari_mammo_sae.models.backbone import create_backbone
    from napari_mammo_sae.models.classifier import ConceptClassifier
    from napari_mammo_sae.models.inference import Analyzer
    from napari_mammo_sae.models.sae import SparseAutoencoder
    from napari_mammo_sae.preprocess import preprocess_mammoclip

    rows, cols = cfg["dicom"]
    path = write_mammogram(tmp / "view.dcm", pixels=breast_image(rows, cols, seed=1))
    torch.manual_seed(0)
    clf = ConceptClassifier(create_backbone(cfg["arch"], static_padding=_static(cfg))).eval()
    sae = SparseAutoencoder(clf.feature_dim, cfg["latents"]).eval()
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    an = Analyzer(clf, sae, size=cfg["size"], device=device, dtype=dtype, runtime="torch")
    runtime = an.prepare_runtime()
    x = preprocess_mammoclip(read_mammogram(path), cfg["size"]).tensor().to(device)

    def bare():
        f = runtime(x)[0]
        with torch.inference_mode(), an._autocast():
            sae.encode(f.reshape(f.shape[0], -1).T).float().sum().item()

    def full():
        an.clear_cache()
        a = an.analyse_path(path)
        a.latent_maps(a.top_neurons(10))
        return a

    exam_paths = [path] + [
        write_mammogram(tmp / f"view{i}.dcm", pixels=breast_image(rows, cols, seed=2 + i))
        for i in range(3)
    ]

    def exam():  # four views at once: batched backbone, one SAE encode (Analyzer.analyse_many)
        an.clear_cache()
        for a in an.analyse_many([read_mammogram(p) for p in exam_paths]):
            a.latent_maps(a.top_neurons(10))

    t_bare = _median_time(bare, device, cfg["runs"])
    t_full = _median_time(full, device, cfg["runs"])
    t_exam = _median_time(exam, device, max(1, cfg["runs"] // 2))
    res = full()
    return {
        "per_view_s": t_full,
        "bare_backbone_sae_s": t_bare,
        "ratio": t_full / t_bare,
        "exam_per_view_s": t_exam / len(exam_paths),
        "exam_vs_single_views": t_exam / (len(exam_paths) * t_full),
        "runtime": an.prepare_runtime().describe(),
        "stages_s": {k: round(v, 4) for k, v in res.timings.items()},
        "probability_finite": math.isfinite(res.probability),
    }


def sae_figures(cfg: dict, device) -> dict:
    """bf16 matmul peak; SAE training tokens/s (bf16 autocast and fp32) and their losses."""
    import torch

    from napari_mammo_sae.models.sae import SparseAutoencoder

    d, m, b = cfg["sae_d"], cfg["latents"], cfg["sae_batch"]
    peak_dtype = torch.bfloat16
    a = torch.randn(b, d, device=device, dtype=peak_dtype)
    w = torch.randn(d, m, device=device, dtype=peak_dtype)
    t_mm = _median_time(lambda: a @ w, device, max(cfg["runs"], 5))
    peak = 2 * b * d * m / t_mm
    g = torch.Generator(device="cpu").manual_seed(0)
    batches = [torch.randn(b, d, generator=g).to(device) for _ in range(4)]

    def train(dtype: str) -> tuple[float, float]:
        torch.manual_seed(0)
        sae = SparseAutoencoder(d, m).to(device).train()
        opt = torch.optim.Adam(sae.parameters(), lr=5e-4)
        ctx = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if dtype == "bfloat16"
            else torch.autocast(device.type, enabled=False)
        )

        def step(i: int) -> float:
            x = batches[i % len(batches)]
            with ctx:
                loss = sae.loss(x)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sae.project_decoder_grad_()
            opt.step()
            sae.normalise_decoder_()
            return loss

        step(0)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for i in range(cfg["sae_steps"]):
            loss = step(i)
        _sync(device)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            held = float(sae.loss(batches[0])["loss"])
        del loss
        return cfg["sae_steps"] * b / seconds, held

    bf_rate, bf_loss = train("bfloat16")
    fp_rate, fp_loss = train("float32")
    flops = 12 * d * m
    return {
        "matmul_peak_tflops": peak / 1e12,
        "peak_dtype": str(peak_dtype).replace("torch.", ""),
        "tokens_per_s_bf16": bf_rate,
        "tokens_per_s_fp32": fp_rate,
        "bf16_vs_peak": bf_rate * flops / peak,
        "fp32_vs_peak": fp_rate * flops / peak,
        "loss_bf16": bf_loss,
        "loss_fp32": fp_loss,
    }


def extract_figures(cfg: dict, device, tmp: Path) -> dict:
    """extract images/s vs the bare bf16 forward at the same batch size."""
    import torch

    from napari_mammo_sae.cli import main as cli
    from napari_mammo_sae.models.runtime import TorchRuntime
    from napari_mammo_sae.pipeline.extract import extract_features
    from napari_mammo_sae.pipeline.head_training import build_classifier

    data = tmp / "phantom"
    studies = max(1, math.ceil(cfg["extract_images"] / 4))
    argv = ["phantom", "--out", str(data), "--studies", str(studies), "--seed", "0",
            "--size", cfg["phantom_size"], "--workers", str(max(1, cfg["workers"]))]  # fmt: skip
    t0 = time.perf_counter()
    if cli(argv) != 0:
        raise SystemExit("phantom generation failed")
    phantom_s = time.perf_counter() - t0
    torch.manual_seed(0)
    model = build_classifier(cfg["arch"]).eval()
    model.backbone = model.backbone.to(device)
    amp = "bfloat16" if device.type == "cuda" else "float32"
    bb = cfg["extract_batch"]
    x = torch.randn(bb, 3, *cfg["size"])
    forward = TorchRuntime(model.backbone, device=device, dtype=amp)
    t = _median_time(lambda: forward(x.pin_memory() if device.type == "cuda" else x), device, 3)
    bare = bb / t
    result = extract_features(
        data,
        model,
        tmp / "store.h5",
        limit=cfg["extract_images"],
        workers=cfg["workers"],
        input_size=cfg["size"],
        batch_size=bb,
        device=device.type,
        runtime="torch",
        amp=amp,
    )
    return {
        "images": result.stored,
        "images_per_s": result.images_per_second,
        "steady_images_per_s": result.steady_images_per_second,
        "bare_images_per_s": bare,
        "ratio": result.images_per_second / bare,
        "steady_ratio": result.steady_images_per_second / bare,
        "phantom_s": phantom_s,
    }


def _finite(obj, key: str = "") -> bool:
    if isinstance(obj, dict):
        return all(_finite(v, str(k)) for k, v in obj.items())
    if isinstance(obj, float) and "compiled" not in key:  # compiled: first batch size only
        return math.isfinite(obj)
    return True


def main(argv: list[str] | None = None) -> int:
    """Run every figure and print them; exit 1 if a figure is not finite."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the code paths")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    ap.add_argument("--only", nargs="*", choices=("backbone", "analysis", "sae", "extract"))
    args = ap.parse_args(argv)

    import torch

    cfg = TINY if args.dry_run else FULL
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: run `benchmarks/gpu.sh --dry-run` on a CPU", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the comparisons
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({os.cpu_count()} cores)"
    parts = args.only or ["backbone", "analysis", "sae", "extract"]
    print(f"# GPU figures{' (DRY RUN: tiny sizes, nothing to record)' if args.dry_run else ''}")
    print(
        f"device {name}, torch {torch.__version__}, {cfg['arch']} at {cfg['size'][0]}x{cfg['size'][1]}"
    )
    figures: dict = {"device": name, "torch": torch.__version__, "dry_run": args.dry_run}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts:
            t0 = time.perf_counter()
            if part == "backbone":
                figures[part] = backbone_figures(cfg, device)
                for batch, f in figures[part].items():
                    text = (
                        f"backbone batch {batch}: eager fp32 {f['eager_fp32_s'] * 1e3:.1f} ms, bf16 + "
                        f"channels_last {f['bf16_channels_last_s'] * 1e3:.1f} ms "
                        f"(**{f['bf16_speedup']:.2f}x**, rel. diff {f['bf16_max_rel_diff']:.1e})"
                    )
                    if math.isfinite(f["compiled_bf16_s"]):
                        text += (
                            f", compiled {f['compiled_bf16_s'] * 1e3:.1f} ms "
                            f"(**{f['compiled_speedup']:.2f}x**, rel. diff "
                            f"{f['compiled_max_rel_diff']:.1e}, compile {f['compile_s']:.0f} s)"
                        )
                    print(text)
            elif part == "analysis":
                figures[part] = f = analysis_figures(cfg, device, Path(tmp))
                print(
                    f"analysis per view ({f['runtime']}): {f['per_view_s'] * 1e3:.0f} ms end to end vs "
                    f"bare backbone + SAE encode {f['bare_backbone_sae_s'] * 1e3:.0f} ms: "
                    f"**{f['ratio']:.2f}x**; four views at once (analyse_many) "
                    f"{f['exam_per_view_s'] * 1e3:.0f} ms per view "
                    f"({f['exam_vs_single_views']:.2f}x one at a time); stages {f['stages_s']}"
                )
            elif part == "sae":
                figures[part] = f = sae_figures(cfg, device)
                print(
                    f"SAE training: {f['peak_dtype']} matmul peak {f['matmul_peak_tflops']:.1f} TFLOP/s; "
                    f"bf16 {f['tokens_per_s_bf16']:,.0f} tokens/s = **{f['bf16_vs_peak']:.2f}** of "
                    f"peak (12*d*m FLOP/token), fp32 {f['tokens_per_s_fp32']:,.0f} tokens/s = "
                    f"{f['fp32_vs_peak']:.2f}; loss after {cfg['sae_steps']} steps bf16 "
                    f"{f['loss_bf16']:.6f} vs fp32 {f['loss_fp32']:.6f}"
                )
            elif part == "extract":
                figures[part] = f = extract_figures(cfg, device, Path(tmp))
                print(
                    f"extract: {f['images_per_s']:.1f} images/s ({f['images']} images; after the "
                    f"first batch {f['steady_images_per_s']:.1f}) vs bare bf16 forward "
                    f"{f['bare_images_per_s']:.1f} images/s: **{f['ratio']:.2f}x** "
                    f"(steady {f['steady_ratio']:.2f}x)"
                )
            print(f"  ({part}: {time.perf_counter() - t0:.0f} s)", flush=True)
    figures["seconds"] = time.perf_counter() - t_start
    print(f"total {figures['seconds']:.0f} s")
    if args.out is not None:
        args.out.write_text(json.dumps(figures, indent=1, default=str))
    ok = _finite(figures)
    if not ok:
        print("a figure is not finite: something is broken", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
