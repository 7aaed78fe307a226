"""Faithful to the original's own files: every ViT and MLP preset resolves to the recipe of the original
repository (OSVAI/NOAH; file and line cited beside each value), timm's RandAugment op by op, and the original
narrow DeiTs' checkpoints with their pre-logits layer."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import data
import noah
import train
from helpers import run, timm_style

VIT_PRESETS = [f"{head}{name}" for name in noah.list_models(("deit", "pvt")) for head in ("noah_", "")]
MLP_PRESETS = [f"{head}{name}" for name in noah.list_models(("mixer", "gmlp")) for head in ("noah_", "")]


def resolved(preset):
    return train.parse_args(["--preset", preset, "--data", "D"])


def exempt_from_decay(args):
    """The parameter names that get no weight decay under the preset's rule."""
    with torch.device("meta"):
        model = noah.create_model(args.arch, head="noah" if args.use_noah else "gap")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = train.param_groups(model, args.wd, args.nowd_bn)
    return {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}, set(names.values())


@pytest.mark.parametrize("preset", VIT_PRESETS)
def test_deit_and_pvt_presets_are_the_originals_recipe(preset):
    args = resolved(preset)
    # vit/deit/main.py:96 and vit/pvt/classification/main.py:96: --aa rand-m9-mstd0.5-inc1
    assert (args.randaug, args.randaug_n, args.randaug_mstd) == (9, 2, 0.5)
    # main.py:100 (both): --train-interpolation bicubic; timm's RandomResizedCrop keeps ratio (3/4, 4/3)
    assert args.train_interpolation == "bicubic" and args.crop_ratio == pytest.approx([3 / 4, 4 / 3])
    # deit/main.py:348, pvt/main.py:297: lr = 5e-4 x global batch / 512, with 8 GPUs x 128 images
    assert args.lr == pytest.approx(5e-4 * 1024 / 512) and args.train_batch == 1024
    # deit/main.py:433, pvt/main.py:387: lr_scheduler.step(epoch) after epoch `epoch`, so epoch e trains at
    # timm's cosine schedule (5 warmup epochs from 1e-6, main.py:77-84; floor 1e-5) for e - 1
    warmup = lambda t: 1e-6 + t * (args.lr - 1e-6) / 5
    cosine = lambda t: 1e-5 + (args.lr - 1e-5) * (1 + math.cos(math.pi * t / 300)) / 2
    lrs = [train.epoch_lr(args, epoch) for epoch in (0, 1, 2, 5, 299)]
    assert lrs == pytest.approx([1e-6, 1e-6, warmup(1), warmup(4), cosine(298)])
    # deit/main.py:351, pvt/main.py:300: NativeScaler, DeiT's engine trains under torch.cuda.amp.autocast()
    assert args.use_amp and args.amp_dtype == "float16"
    exempt, names = exempt_from_decay(args)
    assert not {n for n in exempt if n.endswith("weight") and "norm" not in n}  # conv and linear weights decay
    if args.arch.startswith("deit"):  # deit/noah_vision_transformer.py:207 {'pos_embed'}, vision_transformer.py:262
        assert {"pos_embed", "cls_token"} & names <= exempt  # {'pos_embed', 'cls_token'}
    else:  # pvt/classification/noah_pvt.py:187 {} and pvt.py:187 {'cls_token'}: the position embeddings decay
        assert not {f"pos_embed{i}" for i in range(1, 5)} & exempt and ("cls_token" in exempt) == ("cls_token" in names)


@pytest.mark.parametrize("preset", MLP_PRESETS)
def test_mixer_and_gmlp_presets_are_the_originals_recipe(preset):
    args = resolved(preset)
    # mlp/configs/default_noah.yaml:1 aa: rand-m6-n3-mstd1.0-inc1
    assert (args.randaug, args.randaug_n, args.randaug_mstd) == (6, 3, 1.0)
    # default_noah.yaml:66-68 ratio [0.67, 1.5]; :86 train_interpolation: random; :13 crop_pct: 0.9
    assert args.crop_ratio == [0.67, 1.5] and args.train_interpolation == "random" and args.crop_pct == 0.9
    # :37 lr 0.0007 at 8 x 192 (:3), :93-94 20 warmup epochs from 1e-6, :44 min_lr 1e-5; timm's train.py steps the
    # scheduler with epoch + 1 after each epoch, so epoch e trains at the schedule's value for e
    warmup = lambda t: 1e-6 + t * (7e-4 - 1e-6) / 20
    cosine = lambda t: 1e-5 + (7e-4 - 1e-5) * (1 + math.cos(math.pi * t / 300)) / 2
    lrs = [train.epoch_lr(args, epoch) for epoch in (0, 1, 2, 5, 299)]
    assert lrs == pytest.approx([1e-6, warmup(1), warmup(2), warmup(5), cosine(299)])
    # :54 native_amp: false (and no apex): float32
    assert not args.use_amp
    exempt, names = exempt_from_decay(args)  # timm's rule: no decay for 1-D parameters and biases only
    assert exempt == {n for n in names if n.endswith(".bias") or "norm" in n}


def test_a_smaller_batch_scales_the_deit_learning_rate_unless_lr_is_given():
    assert resolved("noah_deit_small_patch16_224").lr == pytest.approx(1e-3)
    smaller = train.parse_args(["--preset", "noah_pvt_tiny", "--data", "D", "--train-batch", "256"])
    assert smaller.lr == pytest.approx(5e-4 * 256 / 512)
    given = train.parse_args(["--preset", "noah_pvt_tiny", "--data", "D", "--train-batch", "256", "--lr", "3e-4"])
    assert given.lr == 3e-4
    assert train.parse_args(["--preset", "noah_mixer_s16_224", "--data", "D", "--train-batch", "256"]).lr == 7e-4


def test_mlp_training_crops_use_the_originals_ratio_and_a_random_interpolation():
    from torchvision.transforms import v2

    args = train.parse_args(["--preset", "noah_mixer_s16_224", "--data", "D"])
    crop = data.build_transforms(args, train=True).transforms[0]
    assert isinstance(crop, v2.RandomChoice)
    assert [(c.ratio, c.interpolation.value) for c in crop.transforms] == [
        ((0.67, 1.5), "bilinear"), ((0.67, 1.5), "bicubic")]


# --- RandAugment, op by op ---------------------------------------------------------------------------------------


def augment(name, image, m, **kwargs):
    """One operation on a uint8 image (3, H, W) or (1, H, W), done on PIL as in training."""
    from torchvision.transforms.v2 import functional as F

    return F.pil_to_tensor(data.RandAugment(1, 10, **kwargs).apply(name, F.to_pil_image(image), m))


def test_randaugment_draws_timms_increasing_ops():
    assert data.RandAugment.OPS == ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                                     "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                                     "ShearY", "TranslateX", "TranslateY")


@pytest.mark.parametrize("interpolation", ["bicubic", "random"])
def test_rotate_at_m9_turns_the_image_by_27_degrees(interpolation):
    image = torch.zeros(3, 129, 129, dtype=torch.uint8)
    image[:, 64, 114] = 255  # a dot 50 pixels right of the centre
    for _ in range(6):  # the sign is random
        turned = augment("Rotate", image, 0.9, fill=(0, 0, 0), interpolation=interpolation)
        y, x = divmod(turned[0].argmax().item(), 129)
        angle = math.degrees(math.atan2(64 - y, x - 64))
        assert 25.5 < abs(angle) < 28.5, angle


@pytest.mark.parametrize("m, levels", [(0.9, {0, 128}), (0.5, {0, 64, 128, 192})])
def test_posterize_keeps_the_bits_timm_keeps(m, levels):  # timm: keep 4 - int(4 m) bits
    image = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16).expand(3, 16, 16)
    assert set(augment("Posterize", image, m).unique().tolist()) == levels


def test_solarize_and_solarize_add_at_their_thresholds():
    image = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16).expand(3, 16, 16).contiguous()
    solarized = augment("Solarize", image, 0.9)  # inverts from 256 - int(230.4) = 26 up
    assert torch.equal(solarized[image < 26], image[image < 26])
    assert torch.equal(solarized[image >= 26], 255 - image[image >= 26])
    added = augment("SolarizeAdd", image, 0.5)  # adds int(55) below 128
    assert torch.equal(added[image < 128], (image[image < 128] + 55).clamp(max=255))
    assert torch.equal(added[image >= 128], image[image >= 128])


def test_enhancements_move_by_0_9_m_either_way():
    image = torch.full((3, 8, 8), 100, dtype=torch.uint8)
    seen = {augment("Brightness", image, 1.0)[0, 0, 0].item() for _ in range(40)}
    assert seen == {10, 190}  # factor 1 - 0.9 or 1 + 0.9


def test_shear_about_the_top_left_corner_and_translate_by_0_45_of_the_side():
    image = torch.zeros(1, 40, 40, dtype=torch.uint8)
    image[:, :, 20] = 255  # a vertical line
    sheared = augment("ShearX", image, 1.0, fill=(0,))
    assert sheared[0, 0].argmax().item() == 20  # the top row stays: shear factor 0.3 about (0, 0)
    assert abs(sheared[0, 39].argmax().item() - 20) in (11, 12)  # the bottom row moves 0.3 x 39 pixels
    moved = augment("TranslateX", image, 1.0, fill=(0,))
    assert abs(moved[0, 10].argmax().item() - 20) == 18  # 0.45 x 40


def test_each_op_applies_with_probability_one_half_at_a_noisy_clipped_magnitude(monkeypatch):
    magnitudes = []
    monkeypatch.setattr(data.RandAugment, "apply", lambda self, name, image, m: magnitudes.append(m) or image)
    torch.manual_seed(0)
    augment_ = data.RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5)
    for _ in range(2000):
        augment_(torch.zeros(3, 4, 4, dtype=torch.uint8))
    assert 0.45 < len(magnitudes) / 4000 < 0.55
    m = torch.tensor(magnitudes)
    assert m.max() <= 1.0 and abs(m.mean() - 0.88) < 0.02 and 0.035 < m.std() < 0.055  # N(9, 0.5) clipped at 10


def test_a_deit_preset_augments_photos_with_it(image_folder):
    args = train.parse_args(["--preset", "noah_deit_tiny_patch16_224", "--data", str(image_folder), "--img-size", "32"])
    transform = data.build_transforms(args, train=True)
    assert any(isinstance(t, data.RandAugment) for t in transform.transforms)
    train_set, _, _ = data.build_datasets(args)
    assert train_set[0][0].shape == (3, 32, 32)


# --- position embeddings and the original narrow DeiTs -----------------------------------------------------------


def test_position_embeddings_are_resized_bicubically():
    pos = torch.randn(1, 196, 8)
    expected = F.interpolate(pos.reshape(1, 14, 14, 8).permute(0, 3, 1, 2), size=(6, 9), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1).reshape(1, 54, 8)
    torch.testing.assert_close(noah.resize_pos_embed(pos, (14, 14), (6, 9)), expected)


def deit_by_hand(state, x, heads=3, noah_heads=4):
    """The original NOAH DeiT's forward pass (vit/deit/noah_vision_transformer.py), written out from its state dict:
    fused qkv, a pre-logits layer at every token, and the head as grouped 1x1 convolutions."""
    tokens = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=16)
    tokens = tokens.flatten(2).transpose(1, 2) + state["pos_embed"]  # (B, L, C)
    (B, L, C), norm = tokens.shape, lambda t, p: F.layer_norm(t, (t.shape[-1],), state[p + ".weight"],
                                                             state[p + ".bias"], eps=1e-6)
    for i in range(12):
        p = f"blocks.{i}."
        qkv = F.linear(norm(tokens, p + "norm1"), state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(B, L, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) / math.sqrt(C // heads)).softmax(dim=-1)
        mixed = (attention @ v).transpose(1, 2).reshape(B, L, C)
        tokens = tokens + F.linear(mixed, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        hidden = F.gelu(F.linear(norm(tokens, p + "norm2"), state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]))
        tokens = tokens + F.linear(hidden, state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
    tokens = torch.tanh(F.linear(norm(tokens, "norm"), state["pre_logits.fc.weight"], state["pre_logits.fc.bias"]))
    features = tokens.transpose(1, 2).unsqueeze(3)  # (B, 192, L, 1)
    keys, values = features.split(features.shape[1] // 2, dim=1)
    scores = F.conv2d(keys, state["head.query.weight"], state["head.query.bias"], groups=noah_heads)
    values = F.conv2d(values, state["head.value.weight"], state["head.value.bias"], groups=noah_heads)
    attention = scores.reshape(B, noah_heads, -1, L).softmax(dim=-1)
    return (attention * values.reshape(B, noah_heads, -1, L)).sum(dim=(1, 3))


def original_narrow_deit(name, num_classes):
    """A checkpoint as the original repository saves a DeiT-Tiny x0.75 or x0.5: {'model': ...} in timm's layout,
    with the pre-logits layer its code adds below 192 channels, and DeiT's arguments as a Namespace."""
    torch.manual_seed(0)
    model = noah.create_model(name, num_classes=num_classes, representation_size=192).eval()
    state = timm_style(model)
    assert {"pre_logits.fc.weight", "blocks.0.attn.qkv.weight"} <= set(state)
    return {"model": state, "epoch": 300, "args": argparse.Namespace(model=f"noah_{name}", lr=5e-4)}


@pytest.mark.parametrize("name, counts", [("deit_tiny_075_patch16_224", (3_375_536, 3_368_824)),
                                          ("deit_tiny_050_patch16_224", (1_653_536, 1_646_728))])
def test_the_original_narrow_deits_load_and_give_their_logits(name, counts):
    count = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        assert (count(noah.create_model(name, representation_size=192)),
                count(noah.create_model(name, head="gap", representation_size=192))) == counts
    original = original_narrow_deit(name, 10)
    with pytest.raises(ValueError, match=r"pre-logits layer of the original narrow DeiTs: build the model with "
                                         r"create_model\(name, representation_size=192\)"):
        noah.load_checkpoint(noah.create_model(name, num_classes=10), original)
    model = noah.load_checkpoint(noah.create_model(name, num_classes=10, representation_size=192), original).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), deit_by_hand(original["model"], x), rtol=1e-4, atol=1e-5)
    plain = noah.create_model(name, num_classes=10)
    assert noah.load_backbone(plain, original) is False  # fine-tuning: the backbone, without the extra layer
    torch.testing.assert_close(plain.blocks[0].attn.q.weight, model.blocks[0].attn.q.weight)


@pytest.mark.slow
def test_train_evaluates_an_original_narrow_deit_file_as_the_readme_says(image_folder, tmp_path):
    torch.save(original_narrow_deit("deit_tiny_075_patch16_224", 3), tmp_path / "noah_deit_tiny_075.pth")
    done = run(["--preset", "noah_deit_tiny_075_patch16_224", "--data", image_folder, "--evaluate", "--resume",
                tmp_path / "noah_deit_tiny_075.pth", "--workers", 0, "--test-batch", 4])
    assert "has the pre-logits layer of the original narrow DeiTs (to 192 channels)" in done.stdout
    assert "on 12 images" in done.stdout
    torch.save(original_narrow_deit("deit_tiny_075_patch16_224", 1000), tmp_path / "imagenet.pth")
    picture = next((image_folder / "val" / "plum").iterdir())
    run(["--preset", "noah_deit_tiny_075_patch16_224", "--resume", tmp_path / "imagenet.pth", "--show-pocas", picture,
         "-c", tmp_path / "maps", "--workers", 0])
    assert (tmp_path / "maps" / f"pocas_{picture.stem}.png").exists()
