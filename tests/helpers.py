"""Shared by the tests: models are built once per configuration (the large ones take seconds)."""
from functools import lru_cache

import torch

import noah


@lru_cache(maxsize=None)
def build(name, head="noah", num_classes=1000, img_size=None):
    torch.manual_seed(0)
    return noah.create_model(name, head=head, num_classes=num_classes, img_size=img_size)


def count(model):
    return sum(p.numel() for p in model.parameters())
