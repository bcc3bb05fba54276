import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_file(rel: str) -> Path:
    """A file from ../shared; the test is skipped (with the reason) when it is absent, except in CI."""
    path = SHARED / rel
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is required in CI")
        pytest.skip(f"{path} not present (../shared is only beside the checkout on project machines)")
    return path


@pytest.fixture
def image_file(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = (rng.random((40, 56, 3)) * 255).astype("uint8")
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    return path


def _tree_names() -> set[str]:
    """The checkout's top-level names and everything under runs/ (where bdm writes by default)."""
    names = {p.name for p in ROOT.iterdir()}
    return names | {str(p.relative_to(ROOT)) for p in (ROOT / "runs").rglob("*")} if (ROOT / "runs").is_dir() else names


@pytest.fixture(scope="session", autouse=True)
def checkout_untouched():
    """Tests write only under their tmp_path: a test that wrote into the checkout (a relative --csv name once
    committed a stray ``c\\xff.csv``) fails the run, naming what appeared."""
    before = _tree_names()
    yield
    new = sorted(_tree_names() - before - {".pytest_cache", "__pycache__"})
    assert not new, f"the tests wrote into the checkout {ROOT}: {new}"
