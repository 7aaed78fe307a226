"""Fixtures shared by the test files."""
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A tiny ImageFolder dataset: 3 classes, 8 training and 4 validation images each, 40x40 JPEGs."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 8), ("val", 4)):
        for c, name in enumerate(["apple", "pear", "plum"]):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = (torch.rand(40, 40, 3, generator=g) * 80 + 80 * c).byte().numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg")
    return root
