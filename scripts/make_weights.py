"""`make weights`: train the bundled demo models with the project's own command line, seeded.

The recipe (issue 7), every step a ``napari-mammo-sae`` subcommand run as a subprocess:

1. ``phantom``     - a phantom screening dataset, VinDr-Mammo layout, planted cues in training: the
                     skin marker (calcification) and the realistic shortcuts of issue 12 - a lead
                     marker near masses, a biopsy clip (calcification), a site effect (mass).
2. ``train-head``  - pretext: a ``tf_efficientnet_b0``-class backbone (TinyNet-D) trained end to end
                     as a lesion patch classifier (crops on the findings vs breast tissue; the role
                     Mammo-CLIP's report supervision plays for its backbone).
3. ``train-head``  - 'pretrained' variant: linear probes (mass, calcification) on the frozen pretext
                     backbone.
4. ``train-head``  - 'finetuned' variant: backbone + head end to end, one model per concept.
5. ``extract``     - feature stores of the pretext backbone and of each finetuned backbone.
   ``extract --hook stage3`` - the same finetuned backbones at their stride-16 stage (48 x 30 at
                     768 x 480: a cell of about 6 mm, where a clip or a lead edge is its own object).
6. ``train``       - ONE SAE (the paper's ReLU + L1 recipe) on the finetuned calcification features;
                     and one small SAE per finetuned model at stage3 (64 channels, 512 latents).
7. ``probe``       - class-wise mean latents, rankings and galleries for the bundled SAE (and, without
                     a head, for each stage3 SAE).
8. ``evaluate``    - the paper's analyses on the test split -> docs/evaluation/, and with ``--run``
                     per (store, SAE, model): the shortcut report (every cue x concept x layer,
                     shortcuts.csv) and localisation at each layer under both box rules
                     (localisation.csv).

Weights are stored in float16 to keep ``weights/`` under 40 MB; the pretrained-variant folders hold
only their linear head and name the pretext folder their backbone comes from. Features, probes and
the report are computed from the stored (float16) weights, so they describe exactly what ships.
``weights/MANIFEST.json`` records every file's sha256 and size, the exact commands, the seed, the data
parameters and the metrics.

Each finished step is skipped when the script is run again (delete --work to start over).

    .venv/bin/python scripts/make_weights.py                 # the real recipe (about 56 min on 2 CPU cores)
    .venv/bin/python scripts/make_weights.py --quick --out /tmp/w --work /tmp/r   # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: issue 12's realistic shortcuts besides the skin marker, at the marker's rates (POS,NEG in
#: training, TEST in every test image); the site is decided per study
CUES = [
    arg
    for cue in (
        "lead@mass:0.6,0.05,0.3",
        "clip@calcification:0.6,0.05,0.3",
        "site@mass:0.6,0.15,0.3",
    )
    for arg in ("--cue", cue)
]

#: the recipe; --quick swaps in the small values
RECIPE = {
    "seed": 20261124,
    "phantom": {
        "studies": 160,
        "extra": ["--mass-rate", "0.3", "--calc-rate", "0.3", "--size", "medium", *CUES],
    },
    "backbone": "tinynet_d",  # EfficientNet-B0 rescaled (TinyNet): B0 blocks, width 0.54, depth 0.695
    "input_size": "768x480",
    "preprocess": "mammoclip",
    # a patch classifier learns what findings look like in minutes; whole-image training from
    # scratch barely did in an hour (density pretext: finetuned mass test AUROC 0.55)
    "pretext": {"task": "lesion", "epochs": 12, "lr": 1e-3, "batch_size": 32, "patch_size": 128},
    "probe_head": {"epochs": 60, "lr": 1e-2, "batch_size": 64},
    "finetune": {"epochs": 3, "lr": 5e-4, "batch_size": 8},
    "sae": {
        "d_latent": 2560,
        # the paper's 3e-5 left half the latents on for every token of these features (L0 1356 of
        # 2560, neurons firing over the whole breast) and 2e-4 still about 450: a neuron that is on
        # over 5% of the breast has a 95th-percentile box as large as the breast, so localisation
        # needs a sparser code
        "l1_coefficient": 8e-4,
        "lr": 5e-4,
        "batch_size": 4096,
        "epochs": 10,
        "fraction": 1.0,
        "resample_every_epochs": 3,
    },
    # SAEs beyond the last layer (issue 12): one per finetuned model at each hook point; small
    # inputs (64 channels at tinynet_d's stage3), so expansion 8 and a few epochs cost minutes.
    # TopK (k = 8 of 512): ReLU + L1 left 326 of 512 latents on per token at 8e-4 and 121 at 1e-2
    # (no neuron with more than 8% of its mass on any cue); TopK 8 gives neurons that fire only on
    # a cue (clip: share 1.0). docs/EVALUATION.md has the sweep.
    "hooks": ["stage3"],
    "sae_hook": {
        "kind": "topk",
        "k": 8,
        "d_latent": 512,
        "l1_coefficient": 8e-4,
        "lr": 5e-4,
        "batch_size": 4096,
        "epochs": 5,
        "fraction": 1.0,
        "resample_every_epochs": 2,
    },
    "shortcut_k": 10,  # the report's top-k, the same for every cue and layer
    "probe_top_k": 50,
    "bootstrap": 1000,
}

QUICK = {
    "phantom": {
        "studies": 10,
        "extra": ["--mass-rate", "0.4", "--calc-rate", "0.4", "--size", "small", *CUES],
    },
    "backbone": "test_efficientnet",
    "input_size": "128x96",
    "pretext": {"task": "lesion", "epochs": 1, "lr": 1e-3, "batch_size": 8, "patch_size": 32},
    "probe_head": {"epochs": 5, "lr": 1e-2, "batch_size": 16},
    "finetune": {"epochs": 1, "lr": 5e-4, "batch_size": 8},
    "sae": {
        "d_latent": 64,
        "l1_coefficient": 3e-5,
        "lr": 5e-4,
        "batch_size": 256,
        "epochs": 2,
        "fraction": 1.0,
        "resample_every_epochs": 1,
    },
    "sae_hook": {
        "d_latent": 64,
        "l1_coefficient": 3e-5,
        "lr": 5e-4,
        "batch_size": 256,
        "epochs": 1,
        "fraction": 1.0,
        "resample_every_epochs": 1,
    },
    "shortcut_k": 5,
    "probe_top_k": 5,
    "bootstrap": 50,
}

CONCEPTS = ("mass", "calcification")


def sha256_file(path: Path) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Recipe:
    """Runs the steps, logs the exact commands, skips finished ones."""

    def __init__(self, work: Path, out: Path, recipe: dict, device: str, workers: int) -> None:
        self.work, self.out, self.r, self.device, self.workers = work, out, recipe, device, workers
        self.commands: list[dict] = []
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.data = self.work / "phantom"

    # --- running ------------------------------------------------------------------------------
    def cli(self, *args: str, done: Path | None = None, name: str) -> None:
        """Run one ``napari-mammo-sae`` subcommand unless ``done`` exists already."""
        argv = [sys.executable, "-m", "napari_mammo_sae", *map(str, args)]
        shown = "napari-mammo-sae " + " ".join(shlex.quote(str(a)) for a in args)
        shown = shown.replace(str(self.work), "$WORK").replace(str(self.out), "weights")
        shown = shown.replace(str(ROOT) + "/", "")
        entry = {"step": name, "command": shown}
        if done is not None and done.exists():
            print(f"[skip] {name}: {done} exists", flush=True)
            entry["skipped"] = True
            self.commands.append(entry)
            return
        print(f"[run ] {name}: {shown}", flush=True)
        t0 = time.perf_counter()
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        proc = subprocess.run(argv, env=env)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        self.commands.append(entry)
        if proc.returncode != 0:
            raise SystemExit(f"step {name!r} failed with exit status {proc.returncode}")
        print(f"[done] {name} in {entry['seconds']} s", flush=True)

    # --- the steps ----------------------------------------------------------------------------
    def phantom(self) -> None:
        p = self.r["phantom"]
        self.cli(
            "phantom", "--out", self.data, "--studies", p["studies"], "--seed", self.r["seed"],
            *p["extra"], "--workers", self.workers,
            done=self.data / "finding_annotations.csv", name="phantom",
        )  # fmt: skip

    def head(self, name: str, out: Path, *, task: str, variant: str, hp: dict,
             concept: str | None = None, init: Path | None = None) -> None:  # fmt: skip
        args = [
            "train-head", "--data", self.data, "--task", task, "--variant", variant,
            "--backbone", self.r["backbone"], "--input-size", self.r["input_size"],
            "--preprocess", self.r["preprocess"], "--out", out, "--epochs", hp["epochs"],
            "--lr", hp["lr"], "--batch-size", hp["batch_size"], "--seed", self.r["seed"],
            "--device", self.device, "--workers", self.workers,
        ]  # fmt: skip
        if concept:
            args += ["--concept", concept]
        if init is not None:
            args += ["--init-weights", init]
        if "patch_size" in hp:
            args += ["--patch-size", hp["patch_size"]]
        if (out / "checkpoint.pt").exists() and not (out / "model.safetensors").exists():
            args.append("--resume")
        self.cli(*args, done=out / "model.safetensors", name=name)

    def extract(self, name: str, weights: Path, store: Path, hook: str = "head") -> None:
        self.cli(
            "extract", "--data", self.data, "--weights", weights, "--out", store,
            "--workers", self.workers, "--device", self.device, "--dtype", "fp16",
            "--preprocess", self.r["preprocess"], "--input-size", self.r["input_size"],
            *(["--hook", hook] if hook != "head" else []),
            done=store, name=name,
        )  # fmt: skip

    def sae(self, store: Path, run_dir: Path, *, key: str = "sae", name: str = "train SAE") -> None:
        s = self.r[key]
        args = [
            "train", "--store", store, "--out", run_dir, "--split", "training",
            "--kind", s.get("kind", "relu"), "--d-latent", s["d_latent"],
            "--l1-coefficient", s["l1_coefficient"], *(["--k", s["k"]] if s.get("k") else []),
            "--lr", s["lr"], "--batch-size", s["batch_size"], "--epochs", s["epochs"],
            "--fraction", s["fraction"], "--resample-every-epochs", s["resample_every_epochs"],
            "--seed", self.r["seed"], "--device", self.device, "--quiet",
        ]  # fmt: skip
        if (run_dir / "checkpoint").exists() and not (run_dir / "model.safetensors").exists():
            args.append("--resume")
        self.cli(*args, done=run_dir / "model.safetensors", name=name)


def find_sae_weights(run_dir: Path) -> Path:
    """The weights folder a 'train' run wrote (config.json + model.safetensors)."""
    for cand in [run_dir, run_dir / "weights"]:
        if (cand / "model.safetensors").exists():
            return cand
    hits = sorted(run_dir.rglob("model.safetensors"))
    if not hits:
        raise SystemExit(f"no SAE weights under {run_dir}")
    return hits[0].parent


def store_fp16(
    src: Path, dst: Path, *, drop_prefix: str | None = None, extra: dict | None = None
) -> None:
    """Copy a weights folder with floating tensors in float16 (optionally without a prefix's keys)."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(src / "model.safetensors"))
    out = {}
    for key, value in state.items():
        if drop_prefix and key.startswith(drop_prefix):
            continue
        out[key] = value.to(torch.float16) if value.is_floating_point() else value
    config = relative_provenance(json.loads((src / "config.json").read_text()), dst)
    config["stored_dtype"] = "float16"
    config.update(extra or {})
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))


def relative_provenance(config: Any, dst: Path) -> Any:
    """``config`` with every ``init_weights`` path that names a sibling of ``dst`` made relative.

    train-head records the ``--init-weights`` path it was given, which is absolute here; a shipped
    folder says ``../backbone-pretext`` instead, so the files do not depend on where they were built.
    """
    if isinstance(config, list):
        return [relative_provenance(v, dst) for v in config]
    if not isinstance(config, dict):
        return config
    out = {}
    for key, value in config.items():
        if key == "init_weights" and isinstance(value, str) and Path(value).is_absolute():
            if Path(value).resolve().parent == dst.resolve().parent:
                value = f"../{Path(value).name}"
        out[key] = relative_provenance(value, dst)
    return out


def folder_metrics(folder: Path) -> dict:
    """The metrics a weights folder's config records (train/test AUROC, epochs...)."""
    config = json.loads((folder / "config.json").read_text())
    prov = config.get("provenance", {})
    keep = {}
    for key in ("train_auroc", "test_auroc", "epochs", "n_train", "n_test", "pos_weight", "bn_stats",
                "final_metrics", "metrics", "tokens", "steps"):  # fmt: skip
        for source in (prov, config):
            if key in source:
                keep[key] = source[key]
    return keep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work", type=Path, default=ROOT / "build" / "recipe", help="scratch folder"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "weights", help="weights folder to write"
    )
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "evaluation")
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test recipe")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)

    recipe = json.loads(json.dumps(RECIPE))
    if args.quick:
        recipe.update(json.loads(json.dumps(QUICK)))
    t_start = time.perf_counter()
    work, out = args.work.resolve(), args.out.resolve()
    r = Recipe(work, out, recipe, args.device, args.workers)
    trained = work / "trained"

    r.phantom()
    task = recipe["pretext"]["task"]
    pretext = trained / f"pretext-{task}"
    r.head(f"pretext ({task})", pretext, task=recipe["pretext"]["task"], variant="finetuned",
           hp=recipe["pretext"])  # fmt: skip
    # the shipped (float16) pretext backbone is what every later step builds on
    shipped_pretext = out / "backbone-pretext"
    if not (shipped_pretext / "model.safetensors").exists():
        store_fp16(pretext, shipped_pretext)
    for concept in CONCEPTS:
        r.head(f"pretrained {concept}", trained / f"pretrained-{concept}", task="concept",
               concept=concept, variant="pretrained", hp=recipe["probe_head"],
               init=shipped_pretext)  # fmt: skip
        r.head(f"finetuned {concept}", trained / f"finetuned-{concept}", task="concept",
               concept=concept, variant="finetuned", hp=recipe["finetune"],
               init=shipped_pretext)  # fmt: skip
    for concept in CONCEPTS:
        for variant in ("pretrained", "finetuned"):
            src = trained / f"{variant}-{concept}"
            dst = out / f"{variant}-{concept}"
            if (dst / "model.safetensors").exists():
                continue
            if variant == "pretrained":
                store_fp16(src, dst, drop_prefix="backbone.",
                           extra={"backbone_weights": "../backbone-pretext",
                                  "backbone_sha256": sha256_file(shipped_pretext / "model.safetensors")})  # fmt: skip
            else:
                store_fp16(src, dst)

    stores = work / "stores"
    stores.mkdir(exist_ok=True)
    store_pre = stores / "pretrained.h5"
    r.extract("extract pretrained", out / "pretrained-calcification", store_pre)
    store_ft = {c: stores / f"finetuned-{c}.h5" for c in CONCEPTS}
    for concept in CONCEPTS:
        r.extract(f"extract finetuned {concept}", out / f"finetuned-{concept}", store_ft[concept])

    sae_run = work / "sae-run"
    r.sae(store_ft["calcification"], sae_run)
    sae_dir = out / "sae-finetuned-calcification"
    if not (sae_dir / "model.safetensors").exists():
        store_fp16(find_sae_weights(sae_run), sae_dir)
        for name in ("metrics.csv", "train_config.toml"):
            if (sae_run / name).exists():
                shutil.copy2(sae_run / name, sae_dir / name)

    # SAEs beyond the last layer: each finetuned backbone at each hook point, one SAE per store
    hooked = {}  # (concept, hook) -> (store, shipped SAE folder)
    for hook in recipe.get("hooks", []):
        for concept in CONCEPTS:
            store = stores / f"finetuned-{concept}-{hook}.h5"
            r.extract(f"extract finetuned {concept} at {hook}", out / f"finetuned-{concept}", store,
                      hook=hook)  # fmt: skip
            run_dir = work / f"sae-run-{concept}-{hook}"
            r.sae(store, run_dir, key="sae_hook", name=f"train SAE {concept} {hook}")
            shipped = out / f"sae-finetuned-{concept}-{hook}"
            if not (shipped / "model.safetensors").exists():
                store_fp16(find_sae_weights(run_dir), shipped)
            hooked[(concept, hook)] = (store, shipped)

    probes = out / "probes"
    probes.mkdir(exist_ok=True)
    for concept in CONCEPTS:
        store = store_ft["calcification"] if concept == "calcification" else store_ft["mass"]
        r.cli("probe", "--store", store, "--sae", sae_dir, "--head", out / f"finetuned-{concept}",
              "--concept", concept, "--out", probes / f"{concept}.npz", "--split", "training",
              "--top-k", recipe["probe_top_k"], "--device", args.device,
              done=probes / f"{concept}.npz", name=f"probe {concept}")  # fmt: skip
    for (concept, hook), (store, shipped) in hooked.items():
        # class means and galleries at the hook point; no --head: a head reads the last layer,
        # so there is no closed-form logit attribution here
        r.cli("probe", "--store", store, "--sae", shipped, "--concept", concept,
              "--out", probes / f"{concept}-{hook}.npz", "--split", "training",
              "--top-k", recipe["probe_top_k"], "--device", args.device,
              done=probes / f"{concept}-{hook}.npz", name=f"probe {concept} {hook}")  # fmt: skip

    report = args.report.resolve()
    # the shortcut report: every cue x concept x layer, the same rule and k everywhere (the last
    # layer reads the one bundled SAE, as evaluate does; each hook point its own SAE)
    runs = []
    for concept in CONCEPTS:
        runs += ["--run", store_ft[concept], sae_dir, out / f"finetuned-{concept}"]
        for hook in recipe.get("hooks", []):
            store, shipped = hooked[(concept, hook)]
            runs += ["--run", store, shipped, out / f"finetuned-{concept}"]
    # evaluate writes it (shortcuts.csv) with the layer localisation table (localisation.csv)
    heads = [out / f"{v}-{c}" for v in ("pretrained", "finetuned") for c in CONCEPTS]
    r.cli("evaluate", "--store", store_pre, store_ft["mass"], store_ft["calcification"],
          "--sae", sae_dir, "--heads", *heads, "--data", r.data, "--out", report,
          "--bootstrap", recipe["bootstrap"], "--seed", recipe["seed"], "--device", args.device,
          *runs, "--shortcut-k", recipe["shortcut_k"],
          done=report / "index.html", name="evaluate")  # fmt: skip

    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.name != "MANIFEST.json":
            rel = path.relative_to(out).as_posix()
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    total = sum(f["bytes"] for f in files.values())
    metrics = {
        p.name: folder_metrics(p)
        for p in sorted(out.iterdir())
        if p.is_dir() and (p / "config.json").exists()
    }
    manifest = {
        "description": "Demo weights trained on phantom mammograms by scripts/make_weights.py",
        "quick": args.quick,
        "seed": recipe["seed"],
        "recipe": recipe,
        "data": {
            "generator": "napari-mammo-sae phantom",
            "studies": recipe["phantom"]["studies"],
            "options": recipe["phantom"]["extra"],
        },  # fmt: skip
        "commands": r.commands,
        "metrics": metrics,
        "files": files,
        "total_bytes": total,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },  # fmt: skip
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"weights in {out} ({total / 1e6:.1f} MB), report in {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
