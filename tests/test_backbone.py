"""Backbones (timm, pretrained=False), concept heads and the concept classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_mammo_sae.errors import ConfigError
from napari_mammo_sae.models.backbone import (
    StaticSameConv2d,
    create_backbone,
    feature_dim,
    feature_grid,
    lukemelas_pads,
)
from napari_mammo_sae.models.classifier import ConceptClassifier, build_classifier_from_config
from napari_mammo_sae.models.heads import ConceptHead

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ConceptClassifier(create_backbone("test_efficientnet")).eval()


def test_feature_map_is_head_activation_before_pooling(tiny):
    x = torch.randn(2, 3, 96, 64)
    feats = tiny.forward_features(x)
    assert feats.shape == (2, feature_dim(tiny.backbone), *feature_grid((96, 64)))
    # the timm model's own pooled output is the mean of this map
    pooled = tiny.backbone(x)
    torch.testing.assert_close(feats.mean(dim=(-2, -1)), pooled)


def test_classifier_logit_is_linear_on_pooled_features(tiny):
    x = torch.randn(3, 3, 64, 64)
    logits = tiny(x)
    assert logits.shape == (3,)
    pooled = tiny.forward_features(x).mean(dim=(-2, -1))
    expect = pooled @ tiny.head.weight[0] + tiny.head.bias[0]
    torch.testing.assert_close(logits, expect)
    torch.testing.assert_close(tiny.probability(x), torch.sigmoid(expect))
    # the head accepts pooled features as well (train-head's cached linear probe)
    torch.testing.assert_close(tiny.head(pooled), expect)


def test_state_dict_keys_and_head_shape(tiny):
    keys = set(tiny.state_dict())
    assert {"head.weight", "head.bias"} <= keys
    assert all(k.startswith(("backbone.", "head.")) for k in keys)
    assert tiny.head.weight.shape == (1, 256) and tiny.head.bias.shape == (1,)
    assert tiny.backbone_name == "test_efficientnet"


def test_head_parts_read_the_classifier_head(tiny):
    from napari_mammo_sae.analysis.interventions import head_parts

    w, c = head_parts(tiny)
    assert w.shape == (256,) and c == pytest.approx(float(tiny.head.bias.detach()))
    np.testing.assert_allclose(w, tiny.head.weight.detach().double().numpy().reshape(-1))
    assert head_parts(tiny.head)[1] == c and head_parts((w, c))[1] == c


def test_freeze_backbone_keeps_weights_and_bn_statistics():
    torch.manual_seed(1)
    model = ConceptClassifier(create_backbone("test_efficientnet")).freeze_backbone()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.train()
    assert not model.backbone.training and model.head.training
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(torch.randn(2, 3, 64, 64)).sum()
    loss.backward()
    opt.step()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats too
    assert all(not p.requires_grad for p in model.backbone.parameters())
    model.unfreeze_backbone().train()
    assert model.backbone.training and all(p.requires_grad for p in model.parameters())


def test_pretrained_true_and_unknown_names_are_refused():
    with pytest.raises(ConfigError, match="pretrained=False"):
        create_backbone("test_efficientnet", pretrained=True)
    with pytest.raises(ConfigError, match="unknown backbone"):
        create_backbone("no_such_net_b9")


def test_head_dropout_only_in_training():
    torch.manual_seed(0)
    head = ConceptHead(8, dropout=0.5)
    x = torch.randn(4, 8)
    head.eval()
    torch.testing.assert_close(head(x), head(x))
    head.train()
    assert not torch.equal(head(x), head(x))


def test_lukemelas_static_pads_b5_match_reference():
    """SPEC 1.3: at 1520x912 B5 differs from timm's dynamic pads only at blocks.3.0.conv_dw."""
    b5 = create_backbone("tf_efficientnet_b5", static_padding=456)
    pads = {n: m.pads for n, m in b5.named_modules() if isinstance(m, StaticSameConv2d)}
    assert pads == {
        "conv_stem": (0, 1, 0, 1),
        "blocks.1.0.conv_dw": (0, 1, 0, 1),
        "blocks.2.0.conv_dw": (1, 2, 1, 2),
        "blocks.3.0.conv_dw": (1, 1, 1, 1),
        "blocks.5.0.conv_dw": (2, 2, 2, 2),
    }
    assert b5.static_padding == (456, 456)
    # timm's dynamic pad for blocks.3.0.conv_dw at 1520x912 (its input is 190x114) is (0,1,0,1)
    assert lukemelas_pads((190, 114), (3, 3), (2, 2)) == (0, 1, 0, 1)


def test_static_padding_refused_for_non_tf_models():
    with pytest.raises(ConfigError, match="tf_efficientnet"):
        create_backbone("test_efficientnet", static_padding=224)


def test_build_from_config_restores_padding_and_names():
    model = build_classifier_from_config(
        {"backbone": "tf_efficientnet_b0", "static_padding": [224, 224], "concept": "mass"}
    )
    assert model.static_padding == (224, 224) and model.concept == "mass"
    assert model.describe()["static_padding"] == [224, 224]
    with pytest.raises(ConfigError, match="backbone"):
        build_classifier_from_config({"kind": "classifier"})


# --- hook points (SAEs beyond the last layer) -----------------------------------------------------
def test_hook_points_name_stages_blocks_and_head(tiny):
    from napari_mammo_sae.models.backbone import hook_points

    points = hook_points(tiny)
    # test_efficientnet: five stages of one block each, strides 2..32, then conv_head + BN
    assert [points[f"stage{i}"].stride for i in range(5)] == [2, 4, 8, 16, 32]
    assert points["stage3"].module == "blocks.3" and points["stage3"].channels == 48
    assert points["blocks.3.0"].index == points["blocks.3"].index == points["stage3"].index
    assert points["head"].channels == 256 and points["head"].stride == 32
    assert list(points)[-1] == "head"


def test_head_of_rest_of_hook_is_the_full_forward(tiny):
    from napari_mammo_sae.models.backbone import features_at, hook_points, rest_of_backbone

    torch.manual_seed(3)
    x = torch.randn(2, 3, 65, 41)
    with torch.no_grad():
        full = tiny(x)
        for name in hook_points(tiny):
            acts = features_at(tiny, x, name)
            feats = rest_of_backbone(tiny, acts, name)
            torch.testing.assert_close(feats, tiny.forward_features(x), msg=name)
            torch.testing.assert_close(tiny.forward_head(feats).reshape(2), full, msg=name)


def test_grid_per_hook_point_matches_the_activations(tiny):
    from napari_mammo_sae.models.backbone import features_at, hook_grid, hook_points

    x = torch.randn(1, 3, 97, 61)
    with torch.no_grad():
        for name, point in hook_points(tiny).items():
            acts = features_at(tiny, x, name)
            assert acts.shape == (1, point.channels, *hook_grid(tiny, name, (97, 61))), name
    assert hook_grid(tiny, "stage3", (768, 480)) == (48, 30)
    assert hook_grid(tiny, "head", (768, 480)) == feature_grid((768, 480)) == (24, 15)


def test_edits_at_an_intermediate_hook_reach_the_prediction(tiny):
    """The rest of the backbone is re-run from the edited activations: switching channels off at
    stage3 changes the head features (no closed form there), leaving them on changes nothing."""
    from napari_mammo_sae.models.backbone import features_at, rest_of_backbone

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        acts = features_at(tiny, x, "stage3")
        edited = acts.clone()
        edited[:, :24] = 0
        before = rest_of_backbone(tiny, acts, "stage3")
        after = rest_of_backbone(tiny, edited, "stage3")
    assert not torch.allclose(before, after)
    assert (tiny.forward_head(before) - tiny.forward_head(after)).abs().max() > 0


def test_static_padding_models_have_hook_points_too():
    from napari_mammo_sae.models.backbone import features_at, hook_grid, rest_of_backbone

    torch.manual_seed(0)
    model = ConceptClassifier(create_backbone("tf_efficientnet_b0", static_padding=(96, 64))).eval()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        acts = features_at(model, x, "stage3")
        assert acts.shape[-2:] == hook_grid(model, "stage3", (96, 64)) == (6, 4)
        torch.testing.assert_close(
            rest_of_backbone(model, acts, "stage3"), model.forward_features(x)
        )


def test_unknown_hooks_and_backbones_without_them_are_refused(tiny):
    from napari_mammo_sae.models.backbone import resolve_hook

    with pytest.raises(ConfigError, match="unknown hook point 'stage9'.*stage3"):
        resolve_hook(tiny, "stage9")
    assert resolve_hook(tiny, None).name == "head"
    with pytest.raises(ConfigError, match="no hook points"):
        resolve_hook(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), "stage3")


def test_hooked_backbone_runs_like_a_backbone(tiny):
    from napari_mammo_sae.models.backbone import HookedBackbone, at_hook, features_at

    hooked = at_hook(tiny, "stage2")
    assert isinstance(hooked, HookedBackbone) and at_hook(tiny, "head") is tiny.backbone
    assert feature_dim(hooked) == 32 and hooked.backbone_name == "test_efficientnet"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        acts = hooked.forward_features(x)
        torch.testing.assert_close(acts, features_at(tiny, x, "stage2"))
        torch.testing.assert_close(hooked.rest(acts), tiny.forward_features(x))
    # the repr (what an export cache keys its graph by) tells the hooks apart
    assert "hook=stage2" in repr(hooked) and repr(hooked) != repr(at_hook(tiny, "stage3"))
