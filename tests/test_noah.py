"""The NOAH head and the CNN backbones: parameter counts, shapes, the formula, gradients, errors."""
import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import noah
from helpers import build, count

# The original models' parameter counts (num_classes=1000, the paper's N and r): GAP + FC, NOAH.
# ResNet34 is not in the paper's tables; its baseline is torchvision's published count.
PARAMETER_COUNTS = {
    "resnet18": (11_689_512, 11_696_512),
    "resnet34": (21_797_672, 21_804_672),
    "resnet50": (25_557_032, 25_564_032),
    "resnet101": (44_549_160, 44_556_160),
    "resnet152": (60_192_808, 60_199_808),
    "mobilenetv2_100": (3_504_872, 3_519_872),
    "mobilenetv2_075": (2_636_424, 2_651_424),
    "mobilenetv2_050": (1_968_680, 1_983_680),
    "mobilenetv2_035": (1_677_128, 1_692_128),
    "mobilenetv3_small": (2_938_368, 2_953_368),
    "shufflenetv2_100": (2_278_604, 2_293_604),
}
CNNS = list(PARAMETER_COUNTS)


def test_every_cnn_is_listed():
    assert set(CNNS) <= set(noah.list_models())


@pytest.mark.parametrize("name", CNNS)
def test_parameter_counts_equal_the_original_models(name):
    gap, noah_head = PARAMETER_COUNTS[name]
    assert count(build(name, "gap")) == gap
    assert count(build(name)) == noah_head


@pytest.mark.parametrize("name", CNNS)
@pytest.mark.parametrize("size", [(64, 64), (96, 160), (33, 47)])
def test_shapes_for_any_input_size(name, size):
    m = build(name, num_classes=10).eval()
    x = torch.randn(2, 3, *size)
    grid = tuple(math.ceil(s / 32) for s in size)  # every backbone has total stride 32, 'same' padding
    with torch.no_grad():
        features = m.forward_features(x)
        assert features.shape == (2, m.num_features, *grid)
        assert m(x).shape == (2, 10)
        assert m.head.pocas(features).shape == (2, m.head.head_num, 10, *grid)
        assert build(name, "gap", num_classes=10).eval()(x).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet50", "mobilenetv2_100", "mobilenetv3_small", "shufflenetv2_100"])
def test_shapes_at_imagenet_size(name):
    with torch.no_grad():
        assert build(name).eval().forward_features(torch.randn(1, 3, 224, 224)).shape[-2:] == (7, 7)


def test_mobilenetv3_standard_head_pools_before_the_last_conv():
    m = build("mobilenetv3_small", "gap").eval()
    with torch.no_grad():
        assert m.forward_features(torch.randn(1, 3, 96, 96)).shape == (1, 1280, 1, 1)


def noah_by_loops(head, x):
    """The paper's formula, written out position by position, independent of the module's code."""
    B, C, H, W = x.shape
    N, K = head.head_num, head.query.weight.shape[1]
    Ck = head.key_channels
    dk, dv = Ck // N, (C - Ck) // N
    Wq, bq, Wv, bv = (t.double() for t in (head.query.weight, head.query.bias, head.value.weight, head.value.bias))
    x = x.double().flatten(2)  # (B, C, L)
    logits = torch.zeros(B, K, dtype=torch.float64)
    maps = torch.zeros(B, N, K, H * W, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            keys = x[b, n * dk:(n + 1) * dk]  # this head's key channels
            values = x[b, Ck + n * dv:Ck + (n + 1) * dv]  # this head's value channels
            for k in range(K):
                scores = [sum(Wq[n, k, d] * keys[d, p] for d in range(dk)) + bq[n, k] for p in range(H * W)]
                total = sum(math.exp(s) for s in scores)
                for p in range(H * W):  # every position
                    attention = math.exp(scores[p]) / total
                    value = sum(Wv[n, k, d] * values[d, p] for d in range(dv)) + bv[n, k]
                    maps[b, n, k, p] = attention
                    logits[b, k] += attention * value
    return logits, maps.reshape(B, N, K, H, W)


@pytest.mark.parametrize("channels, classes, head_num, key_ratio", [(12, 5, 3, 0.5), (10, 4, 1, 0.3), (16, 3, 4, 0.25)])
def test_head_matches_the_formula_written_as_loops(channels, classes, head_num, key_ratio):
    torch.manual_seed(0)
    head = noah.NOAH(channels, classes, head_num=head_num, key_ratio=key_ratio).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()  # biases too, so that a dropped bias would show
        x = torch.randn(2, channels, 3, 4)
        expected_logits, expected_maps = noah_by_loops(head, x)
        torch.testing.assert_close(head(x).double(), expected_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head.pocas(x).double(), expected_maps, rtol=1e-5, atol=1e-6)
        logits, pocas, evidence = head(x, maps=True)  # the maps of the very pass that gave the logits
        torch.testing.assert_close(logits.double(), expected_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pocas.double(), expected_maps, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(evidence.sum(dim=(1, 3, 4)), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet50", "mobilenetv2_100"])
def test_head_matches_the_original_grouped_convolution_form(name):
    """The original writes the projections as grouped 1x1 convolutions over a (B, C, 1, L) map; bench.py times
    that form against ours, which must give the same logits and the same gradients, at ImageNet shapes."""
    import bench

    head = copy.deepcopy(build(name).head).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(std=0.05)  # biases too, so that a dropped bias would show
    x = torch.randn(3, build(name).num_features, 7, 7, requires_grad=True)
    ours, original = head(x), bench.grouped_conv_noah(head)(x)
    torch.testing.assert_close(ours, original, rtol=1e-4, atol=1e-4)
    upstream = torch.randn_like(ours)
    gradients = [torch.autograd.grad(out, [x, *head.parameters()], upstream) for out in (ours, original)]
    for a, b in zip(*gradients):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_100", "shufflenetv2_100"])
def test_poca_maps_are_probability_maps_over_positions(name):
    m = build(name).eval()
    with torch.no_grad():
        maps = m.head.pocas(m.forward_features(torch.randn(2, 3, 96, 128)))
    assert maps.shape == (2, m.head.head_num, 1000, 3, 4)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(2, m.head.head_num, 1000))


def test_dropout_acts_on_the_values_only_in_training():
    head = noah.NOAH(16, 3, head_num=2, key_ratio=0.5, dropout=0.5)
    x = torch.randn(2, 16, 3, 3)
    torch.manual_seed(1)
    first = head.train()(x)
    assert not torch.allclose(first, head(x))  # a fresh dropout mask each call
    torch.testing.assert_close(head.eval()(x), head(x))
    with torch.no_grad():
        torch.testing.assert_close(head.pocas(x).sum(dim=(-2, -1)), torch.ones(2, 2, 3))


@pytest.mark.parametrize("head", ["noah", "gap"])
@pytest.mark.parametrize("name", CNNS)
def test_gradients_reach_every_parameter(name, head):
    torch.manual_seed(0)
    m = noah.create_model(name, head=head, num_classes=7).train()
    loss = F.cross_entropy(m(torch.randn(2, 3, 64, 64)), torch.tensor([1, 5]))
    loss.backward()
    silent = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []


def test_defaults_follow_the_papers_tables():
    for name, (n, key_channels) in {"resnet18": (4, 256), "resnet50": (4, 256), "mobilenetv2_035": (8, 320),
                                    "shufflenetv2_100": (8, 256)}.items():  # r = 1/2, 1/8, 1/4, 1/4
        head = build(name).head
        assert (head.head_num, head.key_channels) == (n, key_channels)
    assert build("resnet18").head.dropout.p == 0.1 and build("mobilenetv2_100").head.dropout.p == 0.2
    assert build("resnet18", "gap").head.dropout.p == 0.0


def test_settings_given_to_create_model_win_over_the_defaults():
    m = noah.create_model("resnet18", num_classes=10, head_num=2, key_ratio=0.25, dropout=0.3)
    assert (m.head.head_num, m.head.key_channels, m.head.dropout.p) == (2, 128, 0.3)
    assert m.head.query.weight.shape == (2, 10, 64) and m.head.value.weight.shape == (2, 10, 192)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="resnet5"), "unknown model 'resnet5'; known models: resnet18, resnet34"),
    (dict(name="resnet18", head="attention"), "unknown head 'attention'"),
    (dict(name="resnet18", key_ratio=0.0), "key_ratio=0.0 must lie strictly between 0 and 1"),
    (dict(name="resnet18", key_ratio=1.0), "key_ratio=1.0 must lie strictly between 0 and 1"),
    (dict(name="resnet18", key_ratio=-0.5), "key_ratio=-0.5 must lie strictly between 0 and 1"),
    (dict(name="resnet18", key_ratio=0.001), "leaves no key channels out of 512"),
    (dict(name="resnet50", head_num=3), "head_num=3 must divide both the 256 key channels and the 1792 value "
                                        "channels; head_num values that work here: [1, 2, 4, 8, 16, 32, 64, 128, 256]"),
    (dict(name="resnet18", key_ratio=0.3), "head_num=4 must divide both the 153 key channels and the 359 value "
                                           "channels; head_num values that work here: [1]"),
    (dict(name="resnet18", head_num=0), "head_num must be a positive integer, got 0"),
    (dict(name="resnet18", head_num=2.0), "head_num must be a positive integer, got 2.0"),
    (dict(name="resnet18", head="gap", head_num=4), "the 'gap' head has neither"),
    (dict(name="resnet18", num_classes=0), "num_classes must be a positive integer, got 0"),
    (dict(name="resnet18", drop_path_rate=0.1), "resnet18 is a CNN without dropout inside its blocks or stochastic "
                                                "depth, so drop_path_rate=0.1 cannot apply"),
    (dict(name="mobilenetv2_100", drop_rate=0.2), "mobilenetv2_100 is a CNN"),
    (dict(name="deit_tiny_patch16_224", img_size=0), "img_size=0 must be an integer of at least 32"),
    (dict(name="pvt_tiny", img_size=-16), "img_size=-16 must be an integer of at least 32"),
    (dict(name="deit_tiny_patch16_224", drop_path_rate=2.0), "drop_path_rate=2.0 must lie in [0, 1)"),
    (dict(name="resnet18", dropout=1.5), "dropout=1.5 must lie in [0, 1)"),
    (dict(name="pvt_tiny", representation_size=192), "representation_size=192 is the pre-logits layer of the "
                                                     "original DeiTs: a positive width, for the deit_* models only"),
])
def test_bad_settings_raise_a_clear_error(kwargs, message):
    with pytest.raises(ValueError) as error:
        noah.create_model(**kwargs)
    assert message in str(error.value)


def test_readme_usage_example_runs_as_written():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(example, namespace)
    assert namespace["logits"].shape == (2, 1000)
    assert namespace["maps"].shape == (2, 4, 1000, 7, 7)


# --- the model zoo: one entry per model, the same keywords for every model --------------------------------------------


def test_every_model_has_one_entry_with_its_head_and_evaluation_settings():
    assert all(isinstance(entry, noah.ModelEntry) for entry in noah.MODELS.values())
    resnet50, mixer = noah.MODELS["resnet50"], noah.MODELS["mixer_s16_224"]
    assert (resnet50.family, resnet50.head_num, resnet50.key_ratio, resnet50.dropout) == ("resnet", 4, 1 / 8, 0.1)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with torch.device("meta"):
        assert noah.create_model("resnet50").data_config == dict(
            mean=imagenet[0], std=imagenet[1], crop_pct=0.875, interpolation="bilinear")
        assert noah.create_model("deit_tiny_patch16_224").data_config["interpolation"] == "bicubic"
        assert noah.create_model("mixer_s16_224").data_config == dict(
            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.9, interpolation="bicubic")
    assert mixer.family == "mixer" and noah.list_models(("gmlp",)) == [n for n in noah.MODELS if n.startswith("gmlp")]


@pytest.mark.parametrize("name", noah.list_models())
def test_create_model_takes_the_same_keywords_for_every_model(name):
    with torch.device("meta"):
        defaults = noah.create_model(name, num_classes=10)
        unset = noah.create_model(name, num_classes=10, head_num=None, key_ratio=None, dropout=None, img_size=None,
                                  drop_rate=None, drop_path_rate=None)
        zero = noah.create_model(name, num_classes=10, img_size=224, drop_rate=0.0, drop_path_rate=0.0)
    shapes = lambda model: {k: v.shape for k, v in model.state_dict().items()}
    assert shapes(defaults) == shapes(unset) == shapes(zero)
    assert unset.head.head_num == noah.MODELS[name].head_num and unset.head.dropout.p == noah.MODELS[name].dropout


def test_an_unknown_keyword_is_blamed_on_create_model():
    with pytest.raises(TypeError, match=r"create_model\(\) got an unexpected keyword argument 'drop_path'"):
        noah.create_model("resnet18", drop_path=0.1)


def test_denormalize_undoes_the_normalization_for_display():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    picture = torch.rand(3, 5, 7)
    normalized = (picture - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    shown = noah.denormalize(normalized, mean, std)
    assert shown.shape == (5, 7, 3)
    torch.testing.assert_close(torch.from_numpy(shown), picture.permute(1, 2, 0))
