"""Shared by the tests: models are built once per configuration (the large ones take seconds)."""
import os
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
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(launcher + [str(ROOT / "train.py")] + [str(a) for a in args], capture_output=True,
                          text=True, env=env, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def small_run(data, checkpoint, *extra):
    return ["--data", data, "--arch", "resnet18", "--use_noah", "--epochs", 1, "--train-batch", 8, "--test-batch", 8,
            "--img-size", 32, "--workers", 0, "--lr", 0.01, "--manualSeed", 1, "--checkpoint", checkpoint, *extra]
