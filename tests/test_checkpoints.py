"""Loading weights: this project's, the original repository's (CNNs and timm-style ViT/MLP), torchvision's;
fine-tuning from a backbone; and the errors a bad file gives."""
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import torchvision

import noah
import train
from helpers import build, in_original_layout, save_original_checkpoint, timm_style

REFERENCE = Path(__file__).parent / "data" / "official-cnn-state-dict-keys.txt"


def reference_layouts():
    """The official NOAH CNNs' state-dict keys and shapes, from the original repository's models."""
    layouts, name = {}, None
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("## "):
            name = line.split()[1]
            layouts[name] = {}
        elif line and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            layouts[name][key] = tuple(int(n) for n in re.findall(r"\d+", shape))
    return layouts


LAYOUTS = reference_layouts()


@pytest.mark.parametrize("name", LAYOUTS)
def test_original_layout_is_the_official_models(name):
    """What these tests write as 'the original's checkpoint' has exactly the official keys and shapes."""
    with torch.device("meta"):
        model = noah.create_model(name)
    assert {k: tuple(v.shape) for k, v in in_original_layout(model).items()} == LAYOUTS[name]


@pytest.mark.parametrize("prefix", ["module.", ""])
@pytest.mark.parametrize("name, head", [("resnet18", "noah"), ("resnet50", "noah"), ("mobilenetv2_100", "noah"),
                                        ("mobilenetv3_small", "noah"), ("shufflenetv2_100", "noah"),
                                        ("resnet18", "gap"), ("mobilenetv3_small", "gap")])
def test_original_checkpoints_load_and_give_the_same_outputs(name, head, prefix, tmp_path):
    original = build(name, head).eval()
    save_original_checkpoint(original, tmp_path / "model_best.pth.tar", prefix)
    torch.manual_seed(123)
    fresh = noah.create_model(name, head=head).eval()
    noah.load_checkpoint(fresh, tmp_path / "model_best.pth.tar")
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), original(x), rtol=0, atol=0)


@pytest.mark.parametrize("name, head", [("deit_tiny_patch16_224", "noah"), ("deit_tiny_patch16_224", "gap"),
                                        ("pvt_tiny", "noah"), ("mixer_s16_224", "noah"), ("gmlp_ti16_224", "gap")])
def test_original_vit_and_mlp_checkpoints_load_and_give_the_same_outputs(name, head):
    original = build(name, head).eval()
    state = timm_style(original)
    if name.startswith("deit"):
        assert "blocks.0.attn.qkv.weight" in state and "blocks.0.attn.q.weight" not in state
    torch.manual_seed(123)
    fresh = noah.create_model(name, head=head).eval()
    noah.load_checkpoint(fresh, {"model": state, "epoch": 300})  # DeiT saves {'model': ..., 'args': ...}
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), original(x), rtol=0, atol=0)


def test_deit_style_files_with_their_arguments_load(tmp_path):
    import argparse

    original = build("deit_tiny_patch16_224").eval()
    torch.save({"model": timm_style(original), "args": argparse.Namespace(lr=5e-4, model="noah_deit_tiny")},
               tmp_path / "checkpoint.pth")
    fresh = noah.load_checkpoint(noah.create_model("deit_tiny_patch16_224"), tmp_path / "checkpoint.pth")
    assert torch.equal(fresh.pos_embed, original.pos_embed)


# torchvision's model of the same architecture, and its last feature map
TORCHVISION = {
    "resnet18": (torchvision.models.resnet18, lambda m, x: torch.nn.Sequential(*list(m.children())[:-2])(x)),
    "mobilenetv2_100": (torchvision.models.mobilenet_v2, lambda m, x: m.features(x)),
    "shufflenetv2_100": (torchvision.models.shufflenet_v2_x1_0,
                         lambda m, x: m.conv5(m.stage4(m.stage3(m.stage2(m.maxpool(m.conv1(x))))))),
}


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_weights_give_identical_backbone_features_and_outputs(name, tmp_path):
    make, features = TORCHVISION[name]
    torch.manual_seed(0)
    reference = make().eval()
    torch.save(reference.state_dict(), tmp_path / "torchvision.pth")
    noah_model = noah.create_model(name, num_classes=10).eval()
    assert noah.load_backbone(noah_model, tmp_path / "torchvision.pth") is False  # 1000 classes: a new head
    standard = noah.create_model(name, head="gap").eval()
    assert noah.load_backbone(standard, tmp_path / "torchvision.pth") is True  # GAP + FC, 1000 classes: it fits
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        torch.testing.assert_close(noah_model.forward_features(x), features(reference, x), rtol=0, atol=0)
        torch.testing.assert_close(standard(x), reference(x), rtol=1e-5, atol=1e-5)


def test_backbone_of_a_standard_deit_fits_a_noah_deit_at_another_size():
    standard = build("deit_tiny_patch16_224", "gap")
    target = noah.create_model("deit_tiny_patch16_224", num_classes=10, img_size=96)
    assert noah.load_backbone(target, standard.state_dict()) is False
    assert not hasattr(target, "cls_token") and target.pos_embed.shape == (1, 36, 192)
    expected = noah.resize_pos_embed(standard.pos_embed[:, 1:], (14, 14), (6, 6))  # the class-token row dropped
    torch.testing.assert_close(target.pos_embed, expected)
    assert torch.equal(target.blocks[3].mlp.fc1.weight, standard.blocks[3].mlp.fc1.weight)


def test_noah_checkpoint_of_mobilenetv3_gives_its_backbone_to_the_standard_head():
    noah_model = build("mobilenetv3_small")
    standard = noah.create_model("mobilenetv3_small", head="gap", num_classes=10)
    assert noah.load_backbone(standard, {"state_dict": in_original_layout(noah_model)}) is False
    assert torch.equal(standard.conv_head[0].weight, noah_model.conv_head[0].weight)


# --- bad files -----------------------------------------------------------------------------------------------------


def error_of(model, source):
    with pytest.raises(ValueError) as error:
        noah.load_checkpoint(model, source)
    return str(error.value)


def test_a_file_of_another_model_names_the_keys_and_the_model_it_seems_to_be_for(tmp_path):
    save_original_checkpoint(build("resnet50"), tmp_path / "r50.pth.tar", "module.")
    message = error_of(noah.create_model("resnet18"), tmp_path / "r50.pth.tar")
    assert "checkpoint does not fit the model: unexpected keys (" in message and "layer1.0.conv3.weight" in message
    assert "shapes differ, file vs model" in message
    assert "layer1.0.conv1.weight (64, 64, 1, 1) vs (64, 64, 3, 3)" in message
    assert message.endswith("the file seems to be for resnet50 with NOAH (N=4, r=0.125), 1000 classes")


def test_a_file_of_another_head_says_so():
    other_head = build("shufflenetv2_100", "gap", num_classes=10).state_dict()
    message = error_of(noah.create_model("shufflenetv2_100"), other_head)
    assert "missing keys (4): head.query.weight, head.query.bias, head.value.weight, head.value.bias" in message
    assert "unexpected keys (2): head.fc.weight, head.fc.bias" in message
    assert message.endswith("the file seems to be for shufflenetv2_100 with the standard head, 10 classes")


def test_truncated_file(tmp_path):
    torch.save(build("mobilenetv2_035").state_dict(), tmp_path / "full.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:100_000])
    assert error_of(noah.create_model("mobilenetv2_035"), tmp_path / "cut.pth").startswith(
        f"cannot read {tmp_path / 'cut.pth'} as a checkpoint")


def test_files_that_are_not_checkpoints(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert "cannot read" in error_of(build("resnet18"), tmp_path / "notes.txt")
    torch.save({"epoch": 3, "best_acc": 50.0}, tmp_path / "numbers.pth")
    assert "holds no state dict of tensors" in error_of(build("resnet18"), tmp_path / "numbers.pth")


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Payload.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # plain pickle, not torch.save
def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    Payload.marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    assert "cannot read" in error_of(build("resnet18"), tmp_path / "evil.pth")
    assert not Payload.marker.exists()


def test_backbone_learns_at_a_fraction_of_the_heads_rate():
    model = build("resnet18", num_classes=10)
    groups = train.param_groups(model, 1e-4, nowd_bn=False, backbone_lr_scale=0.1)
    scales = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert {n: scales[id(p)] for n, p in model.named_parameters() if n.startswith("head.")} == {
        "head.query.weight": 1.0, "head.query.bias": 1.0, "head.value.weight": 1.0, "head.value.bias": 1.0}
    assert {scales[id(p)] for n, p in model.named_parameters() if not n.startswith("head.")} == {0.1}
