"""evaluate: closed-form logits equal the explicit decode, Table 2 (both AP protocols), the
confounder check (one rule for the report and the summary script), rankings by either spelling."""

from __future__ import annotations

import math
from html import escape

import numpy as np
import torch

from napari_mammo_sae.analysis import confounder, interventions
from napari_mammo_sae.analysis.localisation import ScoredBox
from napari_mammo_sae.pipeline import evaluate


class _SAE(torch.nn.Module):
    def __init__(self, d: int, m: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.nn.Parameter(torch.randn(m, d, generator=g))
        self.b_enc = torch.nn.Parameter(torch.randn(m, generator=g) * 0.1)
        self.W_dec = torch.nn.Parameter(torch.randn(d, m, generator=g))
        self.b_dec = torch.nn.Parameter(torch.randn(d, generator=g))

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc)

    def decode(self, z):
        return z @ self.W_dec.T + self.b_dec


def test_reconstruction_logits_equal_explicit_decode_then_pool():
    sae = _SAE(6, 12)
    w = np.random.default_rng(0).normal(size=6)
    c = 0.3
    fmap = torch.randn(6, 4, 3)
    tokens = fmap.reshape(6, -1).T
    with torch.no_grad():
        z = sae.encode(tokens)
        explicit = float(sae.decode(z).mean(0).numpy() @ w + c)
    closed = interventions.reconstruction_logits(z.mean(0).numpy()[None], sae, (w, c))
    assert closed.shape == (1,)
    assert math.isclose(float(closed[0]), explicit, rel_tol=1e-5, abs_tol=1e-5)


def test_localisation_table_reports_both_protocols_with_hand_computed_ap():
    gt = {"a": [(0, 0, 10, 10)], "b": [(20, 20, 30, 30)], "c": [], "d": []}
    hit_a, hit_b = (0, 0, 10, 10), (20, 20, 30, 30)
    boxes = {
        # a true positive on a, outranked by a false positive on c (no finding there)
        1: {"a": [ScoredBox(hit_a, 1.0)], "c": [ScoredBox(hit_a, 2.0)]},
        # b found (score 1), then a miss on a (score 0.5): precision 1 then 1/2 at recall 1/2
        2: {"b": [ScoredBox(hit_b, 1.0)], "a": [ScoredBox(hit_b, 0.5)]},
        # fires only where there is no finding
        3: {"c": [ScoredBox(hit_a, 1.0)]},
        # finds both findings but fires more strongly on the two images without one
        4: {"a": [ScoredBox(hit_a, 0.5)], "b": [ScoredBox(hit_b, 0.5)],
            "c": [ScoredBox(hit_a, 0.9)], "d": [ScoredBox(hit_a, 0.8)]},
    }  # fmt: skip
    row = evaluate.localisation_table(boxes, gt, [1, 2, 3, 4], ["a", "b", "c", "d"])
    assert row["neurons"] == [1, 2, 3, 4]
    assert (row["n_finding_images"], row["n_whole_split"]) == (2, 4)
    # paper protocol: only a and b are scored
    assert row["ap_finding_images"] == pytest.approx([0.5, 0.5, 0.0, 1.0])
    assert row["mean_ap_finding_images"] == pytest.approx(2.0 / 4)
    # whole split: neuron 1 ranks FP (p 0) then TP (p 1/2, r 1/2) -> 1/2 * 1/2;
    # neuron 4 ranks FP, FP, TP (p 1/3, r 1/2), TP (p 1/2, r 1) -> 1/2 * 1/2 + 1/2 * 1/2
    assert row["ap_whole_split"] == pytest.approx([0.25, 0.5, 0.0, 0.5])
    assert row["mean_ap_whole_split"] == pytest.approx(1.25 / 4)


def test_localisation_table_mean_ignores_undefined():
    boxes = {1: {"a": [ScoredBox((0, 0, 10, 10), 1.0)]}, 2: {}}
    gt = {"a": [(0, 0, 10, 10)]}
    row = evaluate.localisation_table(boxes, gt, [1, 2], ["a", "z"])
    assert row["ap_finding_images"] == [1.0, 0.0]
    row = evaluate.localisation_table(boxes, {}, [1, 2], ["a", "z"])  # no finding anywhere
    assert math.isnan(row["ap_whole_split"][0]) and math.isnan(row["mean_ap_whole_split"])


def test_confounder_check_flags_the_cue_neuron():
    cue = {"a": [(0, 0, 10, 10)], "b": [(0, 0, 10, 10)]}
    lesion = {"a": [(40, 40, 60, 60)], "b": [(40, 40, 60, 60)]}
    boxes = {
        7: {k: [ScoredBox((0, 0, 11, 11), 1.0)] for k in "ab"},  # sits on the cue
        8: {k: [ScoredBox((41, 41, 60, 60), 1.0)] for k in "ab"},  # sits on the lesion
        9: {"a": [ScoredBox((0, 0, 11, 11), 1.0)], "b": [ScoredBox((30, 30, 50, 50), 1.0)]},
    }
    rows = confounder.confounder_check(boxes, lesion, cue, [7, 8, 9], ["a", "b"])
    by = {r["neuron"]: r for r in rows}
    assert by[7]["on_cue"] and not by[7]["on_lesion"]
    assert by[8]["on_lesion"] and not by[8]["on_cue"]
    assert by[7]["iou_cue"] == pytest.approx(100 / 121) and by[7]["iou_lesion"] == 0.0
    # neuron 9: cue IoU 100/121 on a, 0 on b -> mean 0.41 >= 0.25; lesion IoU 0 on a, 100/700 on b
    assert by[9]["iou_cue"] == pytest.approx(50 / 121)
    assert by[9]["iou_lesion"] == pytest.approx(50 / 700)
    assert by[9]["frac_cue"] == 0.5 and by[9]["on_cue"]


def test_the_confounder_rule_at_its_edges():
    assert confounder.on_cue(0.25, 0.0) and not confounder.on_cue(0.2499, 0.0)
    assert not confounder.on_cue(0.5, 0.25)  # on both: neither verdict
    assert not confounder.on_lesion(0.5, 0.25)
    assert confounder.on_cue(0.3, math.nan)  # no lesion image scored
    assert not confounder.on_cue(math.nan, 0.0) and confounder.on_lesion(math.nan, 0.3)
    assert "0.25" in confounder.RULE


def _summariser():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "summarise_evaluation.py"
    spec = importlib.util.spec_from_file_location("summarise_evaluation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_table_and_summary_line_follow_the_one_rule():
    """Stored verdicts written under an older rule do not decide: both the confounder table and
    the summary line apply analysis.confounder to the stored IoUs."""

    def neuron(n, iou_cue, iou_lesion, stored):
        return {"neuron": n, "iou_cue": iou_cue, "iou_lesion": iou_lesion, "frac_cue": 0.0,
                "frac_lesion": 0.0, "on_cue": stored, "on_lesion": False}  # fmt: skip

    def results(neurons, deactivated):
        return {
            "meta": {"bootstrap": 10, "protocol": "image", "ranking": "class mean"},
            "confounder": [{
                "variant": "finetuned", "concept": "calcification", "neurons": neurons,
                "cue_negatives": {"n": 5, "n_clean": 9, "neurons": deactivated,
                                  "mean_probability": 0.6,
                                  "mean_probability_without_cue_neurons": 0.2,
                                  "mean_probability_clean": 0.1}}],
        }  # fmt: skip

    summarise = _summariser().summarise
    # neuron 3 passes the rule although its stored flag says no; neuron 4 fails although flagged
    rows = [neuron(3, 0.6, 0.05, False), neuron(4, 0.15, 0.0, True)]
    text = summarise(results(rows, [3]), None, "evaluation")
    table = [ln for ln in text.splitlines() if ln.startswith("| finetuned | calcification |")]
    assert len(table) == 1 and "3 (0.60 / 0.05)" in table[0] and "4 (" not in table[0]
    claim = next(ln for ln in text.splitlines() if "confounder shows up" in ln)
    assert "**holds**" in claim and "neuron 3" in claim and "neuron 4" not in claim
    assert next(ln for ln in text.splitlines() if "lowers P(positive)" in ln).count("holds") == 1
    assert confounder.RULE in text
    # no neuron passes: table and summary line both say so
    text = summarise(results([neuron(4, 0.15, 0.0, True)], [4]), None, "evaluation")
    table = [ln for ln in text.splitlines() if ln.startswith("| finetuned | calcification |")]
    assert "| none |" in table[0]
    claim = next(ln for ln in text.splitlines() if "confounder shows up" in ln)
    assert "**does not hold**" in claim
    # the deactivation figures were computed for another neuron set: not reported as if current
    text = summarise(results([neuron(3, 0.6, 0.05, False)], []), None, "evaluation")
    assert "lowers P(positive)" not in text
    assert "re-run" in text


# --- end to end on a tiny dataset, with a small random SAE ---------------------------------------
import json  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from napari_mammo_sae.cli import main  # noqa: E402
from napari_mammo_sae.errors import ConfigError, StoreError  # noqa: E402
from napari_mammo_sae.models import folders  # noqa: E402
from napari_mammo_sae.pipeline import probe  # noqa: E402
from test_extract import write_vindr_dataset  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from napari_mammo_sae.pipeline.head_training import build_classifier, save_model

    root = tmp_path_factory.mktemp("eval")
    write_vindr_dataset(root / "data", studies=4)
    torch.manual_seed(0)
    config = {"kind": "classifier", "backbone": "test_efficientnet", "input_size": [128, 80],
              "task": "concept", "concept": "calcification", "variant": "finetuned"}  # fmt: skip
    save_model(root / "head", build_classifier("test_efficientnet"), config)
    assert main(["extract", "--data", str(root / "data"), "--weights", str(root / "head"),
                 "--out", str(root / "store.h5"), "--workers", "0", "--device", "cpu"]) == 0  # fmt: skip
    (root / "sae").mkdir()
    (root / "sae" / "model.safetensors").write_bytes(b"stand-in weights for the hash")
    return root


@pytest.fixture
def fake_sae(monkeypatch):
    sae = _SAE(256, 64, seed=1)
    with torch.no_grad():
        sae.W_enc.mul_(0.05)
    monkeypatch.setattr(folders, "load_sae", lambda folder: sae.eval())
    return sae


def test_closed_form_interventions_equal_explicit_decode(setup, fake_sae):
    from napari_mammo_sae.models.folders import load_model_folder
    from napari_mammo_sae.pipeline.probe import head_parts, open_view

    view = open_view(setup / "store.h5")
    model, _ = load_model_folder(setup / "head")
    w, c = head_parts(model)
    neurons = np.array([3, 10, 40])
    for row in range(3):
        tokens = torch.from_numpy(view.feature_map(row)).reshape(256, -1).T
        with torch.no_grad():
            z = fake_sae.encode(tokens)
            pooled = z.mean(0).numpy()[None]
            for mode in ("keep", "remove"):
                mask = torch.zeros(64)
                mask[neurons] = 1
                if mode == "remove":
                    mask = 1 - mask
                explicit = model.head(fake_sae.decode(z * mask).mean(0)).item()
                closed = interventions.intervened_logits(pooled, fake_sae, model, neurons, mode)[0]
                assert closed == pytest.approx(explicit, rel=1e-4, abs=1e-4)


def test_evaluate_writes_the_report(setup, fake_sae, tmp_path):
    out = tmp_path / "report"
    rc = main(["evaluate", "--store", str(setup / "store.h5"), "--sae", str(setup / "sae"),
               "--heads", str(setup / "head"), "--data", str(setup / "data"), "--out", str(out),
               "--bootstrap", "10", "--k", "0,1,5,all", "--protocol", "row"])  # fmt: skip
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["protocol"] == "row"
    (t1,) = results["table1"]
    assert (t1["variant"], t1["concept"]) == ("finetuned", "calcification")
    assert t1["without"]["n"] == 4  # the test study's four images, one row each
    act = next(r for r in results["figure2"] if r["mode"] == "activated")
    dea = next(r for r in results["figure2"] if r["mode"] == "deactivated")
    assert act["k"] == [0, 1, 5, "all"] and act["union_size"][-1] == 64
    assert act["auroc"][0] == 0.5  # nothing kept: constant logits
    assert act["auroc"][-1] == pytest.approx(t1["with"]["auroc"])  # everything kept
    assert dea["auroc"][0] == pytest.approx(t1["with"]["auroc"])  # nothing removed
    (t2,) = results["table2"]
    assert len(t2["neurons"]) == 10
    assert len(t2["ap_finding_images"]) == len(t2["ap_whole_split"]) == 10
    assert t2["n_whole_split"] == 4  # every test image is scored by the whole-split protocol
    assert results["meta"]["ranking_name"] == "class-mean"
    assert results["meta"]["confounder_rule"] == confounder.RULE
    (f4,) = results["figure4"]
    assert f4["top_neurons"] == t2["neurons"]
    assert results["confounder"][0]["neurons"]
    html = (out / "index.html").read_text()
    for src in re.findall(r'src="([^"]+)"', html):
        assert (out / src).is_file()
    assert len(re.findall(r"<img", html)) >= 3
    assert "AP, whole test split" in html and "AP, images with a finding (paper protocol)" in html
    assert escape(confounder.RULE) in html  # the rule is stated in the report


def test_evaluate_ranking_takes_either_spelling(setup, fake_sae, tmp_path):
    def run(ranking):
        out = tmp_path / ranking
        rc = main(["evaluate", "--store", str(setup / "store.h5"), "--sae", str(setup / "sae"),
                   "--heads", str(setup / "head"), "--data", str(setup / "data"), "--out", str(out),
                   "--bootstrap", "0", "--k", "0,5", "--ranking", ranking])  # fmt: skip
        assert rc == 0
        return json.loads((out / "results.json").read_text())

    hyphen, underscore = run("class-centred"), run("class_centred")
    assert hyphen["meta"]["ranking_name"] == underscore["meta"]["ranking_name"] == "class-centred"
    assert hyphen["figure4"][0]["top_neurons"] == underscore["figure4"][0]["top_neurons"]
    paper = run("class-mean")
    assert paper["meta"]["ranking_name"] == "class-mean"
    assert main(["evaluate", "--store", str(setup / "store.h5"), "--sae", str(setup / "sae"),
                 "--heads", str(setup / "head"), "--data", str(setup / "data"),
                 "--out", str(tmp_path / "x"), "--ranking", "max"]) == ConfigError.exit_code  # fmt: skip


def test_probe_cli_writes_a_findable_file(setup, fake_sae, tmp_path):
    out = tmp_path / "p.npz"
    rc = main(["probe", "--store", str(setup / "store.h5"), "--sae", str(setup / "sae"),
               "--head", str(setup / "head"), "--concept", "calcification", "--out", str(out),
               "--images", "3"])  # fmt: skip
    assert rc == 0
    result = probe.load_probe(out)
    assert result.sae_sha256 == folders.sae_sha256(setup / "sae")
    assert probe.find_probe(tmp_path, result.sae_sha256, "calcification") == out
    for neuron, tops in result.top_images.items():
        assert len(tops) <= 3
        assert all(t.split in ("training", "test") for t in tops)
        assert [t.activation for t in tops] == sorted((t.activation for t in tops), reverse=True)
        assert neuron in {n for r in result.rankings.values() for v in r.values() for n in v}


def test_evaluate_errors(setup, fake_sae, tmp_path):
    args = ["evaluate", "--sae", str(setup / "sae"), "--data", str(setup / "data"),
            "--out", str(tmp_path / "r"), "--bootstrap", "0"]  # fmt: skip
    store = ["--store", str(setup / "store.h5")]
    heads = ["--heads", str(setup / "head")]
    assert main([*args, *store, *heads, "--protocol", "breast"]) == ConfigError.exit_code
    assert main([*args, "--store", str(tmp_path / "none.h5"), *heads]) == StoreError.exit_code
    # a head trained on another backbone matches no store
    from napari_mammo_sae.pipeline.head_training import build_classifier, save_model

    torch.manual_seed(5)
    other = tmp_path / "other"
    save_model(other, build_classifier("test_efficientnet"), {
        "kind": "classifier", "backbone": "test_efficientnet", "concept": "mass",
        "variant": "pretrained", "provenance": {"backbone_signature": "0" * 64}})  # fmt: skip
    assert main([*args, *store, "--heads", str(other)]) == StoreError.exit_code
    assert main(["probe", *store, "--sae", str(setup / "sae"), "--head", str(other), "--concept",
                 "mass", "--out", str(tmp_path / "p.npz")]) == StoreError.exit_code  # fmt: skip
    assert main(["probe", *store, "--sae", str(setup / "sae"), "--concept", "density",
                 "--out", str(tmp_path / "p.npz")]) == ConfigError.exit_code  # fmt: skip
    assert main(["probe", *store, "--sae", str(setup / "sae"), "--concept", "mass", "--split",
                 "validation", "--out", str(tmp_path / "p.npz")]) == ConfigError.exit_code  # fmt: skip
    # an SAE whose input dimension differs from the store's features
    probe_sae = _SAE(128, 16)
    folders.load_sae = lambda folder: probe_sae  # undone by the fake_sae fixture's monkeypatch
    assert main([*args, *store, *heads]) == ConfigError.exit_code
    assert Path(setup / "store.h5").exists()


def test_table2_values_equal_an_independent_recomputation(setup, fake_sae, tmp_path):
    """Table 2 by value: its neurons and both APs, recomputed from the store, the SAE and the boxes."""
    from napari_mammo_sae.analysis import localisation as loc
    from napari_mammo_sae.annotations import load_vindr

    out = tmp_path / "report"
    rc = main(["evaluate", "--store", str(setup / "store.h5"), "--sae", str(setup / "sae"),
               "--heads", str(setup / "head"), "--data", str(setup / "data"), "--out", str(out),
               "--bootstrap", "0", "--k", "0"])  # fmt: skip
    assert rc == 0
    (t2,) = json.loads((out / "results.json").read_text())["table2"]
    view = probe.open_view(setup / "store.h5")
    ann = load_vindr(setup / "data").images
    ids = [str(i) for i in view.index.image_id]
    split = {i: ann[i].split for i in ids}
    latents = {}  # image id -> (positions, m) latents of the fake SAE
    for row, image_id in enumerate(ids):
        fmap = torch.from_numpy(np.asarray(view.feature_map(row), dtype=np.float32))
        with torch.no_grad():
            latents[image_id] = (fake_sae.encode(fmap.reshape(fmap.shape[0], -1).T).numpy(), row)
    # the paper's ranking: mean pooled latent over the training images with a calcification
    positives = [i for i in ids if split[i] == "training" and ann[i].has("calcification")]
    mean_pos = np.mean([latents[i][0].mean(0) for i in positives], axis=0)
    top = np.argsort(-mean_pos, kind="stable")[:10].tolist()
    assert t2["neurons"] == top
    # AP@0.25 of each neuron's heatmap boxes, on the test images with a finding / on all of them
    test_ids = [i for i in ids if split[i] == "test"]
    gt = {i: ann[i].boxes("calcification") for i in test_ids}
    with_box = [i for i in test_ids if gt[i]]
    assert len(test_ids) == 4 and len(with_box) == 1
    want_paper, want_whole = [], []
    for n in top:
        pred = {}
        for i in test_ids:
            z, row = latents[i]
            grid = np.asarray(view.feature_map(row)).shape[1:]
            pred[i] = loc.heatmap_boxes(z[:, n].reshape(grid), view.geometry(row))
        want_paper.append(loc.average_precision({i: pred[i] for i in with_box},
                                                {i: gt[i] for i in with_box}, 0.25))  # fmt: skip
        want_whole.append(loc.average_precision(pred, gt, 0.25))
    # this fixture discriminates: one neuron finds the box, and false positives on the three
    # images without a finding lower its whole-split AP
    assert max(want_paper) > 0 and want_whole != want_paper
    assert t2["ap_finding_images"] == pytest.approx(want_paper, nan_ok=True)
    assert t2["ap_whole_split"] == pytest.approx(want_whole, nan_ok=True)


def test_evaluate_with_an_empty_class_reports_table1_and_says_why_the_rest_is_missing(
    setup, fake_sae, tmp_path, monkeypatch
):
    from napari_mammo_sae.analysis.ranking import ClassMeans

    real = evaluate.summarise_store

    def no_positives(*args, **kw):
        summary = real(*args, **kw)
        means = summary.means["calcification"]
        sums = np.nan_to_num(means.mean) * means.count[:, None]
        summary.means["calcification"] = ClassMeans.from_sums(sums, [means.count[0], 0])
        return summary

    monkeypatch.setattr(evaluate, "summarise_store", no_positives)
    out = tmp_path / "report"
    rc = main(["evaluate", "--store", str(setup / "store.h5"), "--sae", str(setup / "sae"),
               "--heads", str(setup / "head"), "--data", str(setup / "data"), "--out", str(out),
               "--bootstrap", "0", "--k", "0,5"])  # fmt: skip
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["table1"]) == 1
    assert results["figure2"] == results["table2"] == results["figure4"] == []
    (note,) = results["notes"]
    assert "0 positive" in note and "undefined" in note
