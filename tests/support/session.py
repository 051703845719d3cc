"""The suite's own environment, set up once per process when first imported (by
``tests/conftest.py``, before any test): a hermetic cache directory and Hypothesis's home
in it."""

from __future__ import annotations

import os
from pathlib import Path

from search._base.paths import cache_dir


def _hermetic_cache() -> Path:
    """The suite's own cache directory, so it never reads or writes the user's (latency
    calibrations of one test would otherwise steer the predictions of another, and of the
    user's next study). Seeded with the user's trained teachers (hard links: hundreds of MB
    for a ViT), and the data splits they were trained on, so nothing retrains;
    subprocesses, Ray workers and pytest-xdist's test processes inherit it through the
    environment."""
    import atexit
    import shutil
    import tempfile

    inherited = Path(os.environ.get("SEARCH_CACHE_DIR", "."))
    if os.environ.get("PYTEST_XDIST_WORKER") and inherited.name.startswith("search-tests-cache-"):
        return inherited  # the controller's: a teacher one test process trains serves the other
    real = cache_dir()
    test_cache = Path(tempfile.mkdtemp(prefix="search-tests-cache-"))
    seeds = ["*-teacher-*.pt", "*-teacher-*.pt.scores.json", "digits-split-*.npz"]
    for found in [path for pattern in seeds for path in real.glob(pattern)]:
        try:  # a link: a teacher is replaced whole (renamed over), never written in place
            os.link(found, test_cache / found.name)
        except OSError:  # another filesystem
            shutil.copy2(found, test_cache / found.name)  # mtime kept: the scores stay valid
    os.environ["SEARCH_CACHE_DIR"] = str(test_cache)
    atexit.register(shutil.rmtree, test_cache, ignore_errors=True)
    return test_cache


TEST_CACHE = _hermetic_cache()


def _hypothesis_home() -> None:
    """Hypothesis keeps its example database and the constants it reads from source in
    ``./.hypothesis``: in the suite's cache instead, so the checkout is left as found."""
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(TEST_CACHE / "hypothesis")


_hypothesis_home()
