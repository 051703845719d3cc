"""Small datasets and user plugins the project does not ship, built by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def write_digits_tree(root: Path, per_class: dict[str, int], side: int = 16,
                      classes: int = 10) -> Path:
    """An ImageFolder tree (``root/<split>/<digit>/<n>.png``) of scikit-learn digits as PNGs."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    taken = {c: 0 for c in range(classes)}
    for split, count in per_class.items():
        for c in range(classes):
            folder = root / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            rows = np.flatnonzero(digits.target == c)[taken[c] : taken[c] + count]
            taken[c] += count
            for i in rows:
                pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
                Image.fromarray(pixels, mode="L").resize((side, side), Image.BILINEAR).save(
                    folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def digits_tree(tmp_path_factory) -> Path:
    """300 digits: 20 per class in train/, 10 per class in val/ (no test/: val is halved)."""
    return write_digits_tree(tmp_path_factory.mktemp("digits-tree"), {"train": 20, "val": 10})
