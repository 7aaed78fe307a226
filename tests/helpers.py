"""Shared by the tests: models are built once per configuration (the large ones take seconds)."""
import json
import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import torch

import noah

ROOT = Path(__file__).parent.parent


@lru_cache(maxsize=None)
def build(name, head="noah", num_classes=1000, img_size=None):
    torch.manual_seed(0)
    return noah.create_model(name, head=head, num_classes=num_classes, img_size=img_size)


def count(model):
    return sum(p.numel() for p in model.parameters())


def run(args, nproc=1, check=True):
    """Run train.py as a user would, in its own process (under torchrun when nproc > 1)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
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


def fails_cleanly(done, message):
    """A non-zero exit with the message; without torchrun around it (which reports its child's failure in
    its own words), no traceback either."""
    assert done.returncode != 0
    assert message in done.stderr, done.stderr[-2000:]
    if "torch.distributed.run" not in done.args:
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
