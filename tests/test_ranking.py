"""Neuron rankings: the paper's class mean, class-centred and logit scores; agreement with probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mammo_sae.analysis import ranking
from napari_mammo_sae.errors import ConfigError
from napari_mammo_sae.models.sae import SparseAutoencoder

D, M = 8, 32


@pytest.fixture(scope="module")
def parts():
    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(D, M, generator=g).double().eval()
    torch.manual_seed(3)
    head = torch.nn.Linear(D, 1).double()
    rng = np.random.default_rng(0)
    pooled = np.abs(rng.normal(size=(20, M))) * (rng.random((20, M)) < 0.3)
    labels = np.array([0] * 14 + [1] * 6)
    return sae, head, pooled, labels


def test_class_mean_is_the_papers_equation_2(parts):
    _, _, pooled, labels = parts
    means = np.stack([pooled[labels == 0].mean(0), pooled[labels == 1].mean(0)])
    s = ranking.class_mean_scores(means)
    np.testing.assert_allclose(s, means)
    # the top neuron of class 1 is the one with the largest mean activation over positive images
    assert ranking.rank(s[1], 1)[0] == int(np.argmax(pooled[labels == 1].mean(0)))


def test_class_centred_subtracts_the_mean_over_all_images(parts):
    _, _, pooled, labels = parts
    means = np.stack([pooled[labels == 0].mean(0), pooled[labels == 1].mean(0)])
    counts = np.bincount(labels)
    s = ranking.class_centred_scores(means, counts=counts)
    np.testing.assert_allclose(s, means - pooled.mean(0)[None, :])
    np.testing.assert_allclose(ranking.class_centred_scores(means, pooled.mean(0)), s)
    # a neuron that fires equally everywhere ranks first by class mean, nowhere by class-centred
    means2 = means.copy()
    means2[:, 5] = 100.0
    assert ranking.rank(ranking.class_mean_scores(means2)[1], 1)[0] == 5
    centred = ranking.class_centred_scores(means2, counts=counts)
    assert centred[1, 5] == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="overall mean"):
        ranking.class_centred_scores(means)


def test_logit_contributions_sum_to_reconstruction_logit(parts):
    from napari_mammo_sae.analysis.interventions import reconstruction_logits

    sae, head, pooled, _ = parts
    contrib = ranking.logit_contributions(pooled, sae, head)
    w = head.weight.detach().numpy().reshape(-1)
    bias = float(w @ sae.b_dec.detach().numpy()) + float(head.bias.detach())
    np.testing.assert_allclose(contrib.sum(1) + bias, reconstruction_logits(pooled, sae, head))
    # explicit: decoding neuron j alone (no bias) and applying w
    j = int(np.argmax(np.abs(contrib[0])))
    e = np.zeros(M)
    e[j] = pooled[0, j]
    with torch.no_grad():
        xj = torch.as_tensor(e) @ sae.W_dec.T
    assert contrib[0, j] == pytest.approx(float(xj @ head.weight.reshape(-1)))
    assert ranking.logit_contributions(pooled[0], sae, head).shape == (M,)


def test_scores_agree_with_pipeline_probe(parts):
    from napari_mammo_sae.pipeline.probe import ClassMeans, rank_scores, top_neurons

    sae, head, pooled, labels = parts
    means = np.stack([pooled[labels == 0].mean(0), pooled[labels == 1].mean(0)])
    counts = np.bincount(labels)
    w = head.weight.detach().numpy().reshape(-1)
    theirs = rank_scores(
        ClassMeans(means, counts, pooled.mean(0)), sae, (w, float(head.bias.detach()))
    )
    for name in ("class_mean", "class_centred", "logit"):
        mine = ranking.scores(name, means, counts=counts, sae=sae, head=head)
        np.testing.assert_allclose(mine, theirs[name], atol=1e-12)
        for c in (0, 1):
            assert ranking.rank(mine[c], 5).tolist() == top_neurons(theirs[name][c], 5)


def test_ranking_names_and_rank():
    assert ranking.RANKINGS == ("class-mean", "class-centred", "logit")
    assert ranking.ranking_name("class_centred") == "class-centred"
    assert ranking.ranking_name("Class-Centered") == "class-centred"
    with pytest.raises(ConfigError, match="unknown ranking"):
        ranking.ranking_name("max")
    with pytest.raises(ConfigError, match="needs the SAE"):
        ranking.scores("logit", np.zeros((2, 3)))
    with pytest.raises(ConfigError, match=r"\(2, m\)"):
        ranking.class_mean_scores(np.zeros((3, 4)))
    assert ranking.rank(np.array([1.0, 3.0, 3.0, 2.0]), 3).tolist() == [1, 2, 3]
    assert ranking.rank(np.array([1.0, 3.0]), None).tolist() == [1, 0]
    assert ranking.rank(np.array([1.0, 3.0]), 0).tolist() == []


def test_class_means_define_an_empty_class_as_undefined():
    sums = np.array([[0.0, 0.0, 0.0], [2.0, 4.0, 6.0]])
    means = ranking.ClassMeans.from_sums(sums, np.array([0, 2]))
    assert np.isnan(means.mean[0]).all()  # no negative image: its mean is undefined, not zero
    np.testing.assert_allclose(means.mean[1], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(means.overall, [1.0, 2.0, 3.0])  # over the images there are
    assert not means.complete
    with pytest.raises(ConfigError, match="2 positive and 0 negative"):
        ranking.rank_scores(means)
    full = ranking.ClassMeans.from_sums(np.array([[1.0, 0.0], [0.0, 3.0]]), np.array([1, 3]))
    assert full.complete
    np.testing.assert_allclose(full.mean, [[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(full.overall, [0.25, 0.75])
    table = ranking.rank_scores(full)
    np.testing.assert_allclose(table["class-centred"], [[0.75, -0.75], [-0.25, 0.25]])
    assert "logit" not in table  # needs the SAE and the head


def test_ranking_table_answers_to_every_spelling():
    table = ranking.RankingTable({"class_mean": 1, "class-centred": 2})
    assert list(table) == ["class-mean", "class-centred"]
    assert table["class-mean"] == table["class_mean"] == table["mean"] == 1
    assert table["class_centered"] == 2 and "class_centred" in table
    assert "logit" not in table and "max" not in table and table.get("max", 7) == 7
    with pytest.raises(ConfigError, match="unknown ranking"):
        table["max"]
