"""The study: checks, the ask/tell loop over Ray tasks, refinement and the latency source.

``run_search`` is imported lazily (it pulls in Ray and torch), so ``search.study.storage``
opens a stored study without them.
"""

__all__ = ["StudyResult", "run_search"]


def __getattr__(name: str):  # noqa: ANN202
    if name in __all__:
        from search.study import run

        return getattr(run, name)
    raise AttributeError(name)
