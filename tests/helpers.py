"""Shared by the tests: models are built once per configuration (the large ones take seconds)."""
import json
import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

import noah

ROOT = Path(__file__).parent.parent


@lru_cache(maxsize=None)
def build(name, head="noah", num_classes=1000, img_size=None):
    torch.manual_seed(0)
    return noah.create_model(name, head=head, num_classes=num_classes, img_size=img_size)


def count(model):
    return sum(p.numel() for p in model.parameters())


def run(args, nproc=1, check=True, env=None):
    """Run train.py as a user would, in its own process (under torchrun when nproc > 1), with `env` added to the
    environment."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", **{k: str(v) for k, v in (env or {}).items()})
    done = subprocess.run(launcher + [str(ROOT / "train.py")] + [str(a) for a in args], capture_output=True,
                          text=True, env=env, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def small_run(data, checkpoint, *extra):
    return ["--data", data, "--arch", "resnet18", "--use_noah", "--epochs", 1, "--train-batch", 8, "--test-batch", 8,
            "--img-size", 32, "--workers", 0, "--lr", 0.01, "--manualSeed", 1, "--checkpoint", checkpoint, *extra]


def in_original_layout(model, prefix=""):
    """A state dict as the original repository saves it, written from what its README and models say:
    the NOAH projections as grouped 1x1 convolutions, MobileNetV3's head and last conv by their names."""
    state = {}
    for key, value in model.state_dict().items():
        if re.fullmatch(r"head\.(query|value)\.weight", key):
            value = value.reshape(-1, value.shape[-1], 1, 1)  # (N, K, D) -> (N*K, D, 1, 1)
        elif re.fullmatch(r"head\.(query|value)\.bias", key):
            value = value.reshape(-1)
        if isinstance(model, noah.MobileNetV3Small):
            last_conv = "features.13." if isinstance(model.head, noah.NOAH) else "features.14."  # pooling is 13
            key = re.sub(r"^head\.", "classifier.", re.sub(r"^head\.fc\.", "classifier.1.", key))
            key = key.replace("conv_head.0.", last_conv)
        elif isinstance(model.head, noah.GAPHead):
            key = key.replace("head.fc.", "head.2.")
        state[prefix + key] = value
    return state


def timm_style(model):
    """The original ViT and MLP models' layout (timm's): a fused qkv, a linear standard head."""
    state = {}
    for key, value in in_original_layout(model).items():
        if key.endswith("attn.q.weight") or key.endswith("attn.q.bias"):
            kv = model.state_dict()[key.replace("attn.q.", "attn.kv.")]
            state[key.replace("attn.q.", "attn.qkv.")] = torch.cat((value, kv))
        elif ".attn.kv." in key and not key.startswith("block"):  # PVT keeps q and kv apart
            continue
        else:
            state[key.replace("head.2.", "head.")] = value
    return state


def save_original_checkpoint(model, path, prefix):
    torch.save({"epoch": 100, "state_dict": in_original_layout(model, prefix), "acc": torch.tensor(71.8),
                "best_acc": torch.tensor(71.8), "optimizer": {"state": {}, "param_groups": []}}, path)


def read_log(folder):
    return [json.loads(line) for line in open(Path(folder) / "log.jsonl")]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def last_checkpoint(folder):
    """What a run in `folder` saved last: its checkpoint.pth.tar, read as a user would (weights only)."""
    return torch.load(Path(folder) / "checkpoint.pth.tar", map_location="cpu", weights_only=True)


def fails_cleanly(done, message):
    """A non-zero exit with the message; without torchrun around it (which reports its child's failure in
    its own words), no traceback either."""
    assert done.returncode != 0
    assert message in done.stderr, done.stderr[-2000:]
    if "torch.distributed.run" not in done.args:
        assert "Traceback" not in done.stderr, done.stderr[-2000:]


def mixed_image_folder(root, train_per_class, val_per_class, classes=("ant", "bee", "cat", "dog"), seed=0):
    """An ImageFolder with train/ and val/ of every kind of file a real folder holds: RGB and CMYK JPEGs,
    grayscale, palette and RGBA PNGs, of random sizes from 1x1 to very wide and very tall. Each class is a
    colour, so that a model can learn it. -> root."""
    g = torch.Generator().manual_seed(seed)
    kinds = [("RGB", "jpg"), ("L", "png"), ("P", "png"), ("RGBA", "png"), ("CMYK", "jpg")]
    shapes = [(1, 1), (2, 3), (400, 3), (3, 300)]  # tiny, very wide, very tall: one in ten images
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                draw = torch.randint(0, 1000, (4,), generator=g).tolist()
                width, height = shapes[draw[0] % 4] if draw[0] % 10 == 0 else (8 + draw[1] % 57, 8 + draw[2] % 57)
                mode, suffix = kinds[draw[3] % len(kinds)]
                colour = torch.tensor([60 + 60 * c, 200 - 40 * c, 128])
                pixels = (colour + 40 * torch.randn(height, width, 3, generator=g)).clamp(0, 255).byte().numpy()
                Image.fromarray(pixels).convert(mode).save(folder / f"{i}.{suffix}")
    return Path(root)
