"""NOAH's initialization: the default draws the original's numbers at the scale they have for 1000 classes,
so that a model of a few classes starts where an ImageNet model starts; the original's is one keyword away."""
import math

import pytest
import torch

import noah

FAMILIES = {"resnet18": None, "pvt_tiny": None, "deit_tiny_patch16_224": None, "mixer_s16_224": 96}


def logit_spread(name, num_classes, img_size, head_init=None):
    """The std of the logits of a freshly drawn model, in training mode, on fixed random inputs."""
    torch.manual_seed(0)
    model = noah.create_model(name, num_classes=num_classes, dropout=0.0, img_size=img_size,
                              head_init=head_init).train()
    torch.manual_seed(1)
    with torch.no_grad():
        return model(torch.randn(8, 3, 96, 96)).std().item()


@pytest.mark.parametrize("name", FAMILIES)
def test_the_default_init_starts_six_classes_where_it_starts_a_thousand(name):
    few, many = logit_spread(name, 6, FAMILIES[name]), logit_spread(name, 1000, FAMILIES[name])
    assert few <= 1.5 * many, (few, many)


def test_the_original_init_starts_six_classes_far_wider_on_a_cnn():
    few, many = logit_spread("resnet18", 6, None, "original"), logit_spread("resnet18", 1000, None, "original")
    assert few > 5 * many, (few, many)


@pytest.mark.parametrize("name", ["resnet50", "mobilenetv2_100", "deit_tiny_patch16_224", "pvt_tiny"])
def test_at_a_thousand_classes_the_default_draws_the_originals_weights(name):
    heads = {}
    for head_init in ("scaled", "original"):
        torch.manual_seed(3)
        heads[head_init] = noah.create_model(name, head_init=head_init).head.state_dict()
    assert all(torch.equal(heads["scaled"][k], heads["original"][k]) for k in heads["original"])


@pytest.mark.parametrize("num_classes", [6, 10, 1000])
def test_each_init_draws_its_stated_scale(num_classes):
    per_head = 2048 // 2 // 4  # inputs per head of each projection
    scaled, original, linear = (math.sqrt(2 / (4 * 1000)), math.sqrt(2 / (4 * num_classes)),
                                1 / math.sqrt(3 * per_head))
    for head_init, query_std, value_std in (("scaled", scaled, scaled), ("original", original, original),
                                            ("linear", linear, linear), ("zero_value", scaled, 0.0)):
        head = noah.NOAH(2048, num_classes, head_num=4, key_ratio=0.5, init=head_init)
        for projection, std in ((head.query, query_std), (head.value, value_std)):
            assert projection.weight.std().item() == pytest.approx(std, rel=0.05, abs=1e-9), head_init
            assert not projection.bias.any()


def test_a_standard_head_or_an_unknown_init_is_refused():
    with pytest.raises(ValueError, match="the 'gap' head has neither"):
        noah.create_model("resnet18", head="gap", head_init="original")
    with pytest.raises(ValueError, match="choose 'scaled'"):
        noah.create_model("resnet18", head_init="kaiming")
