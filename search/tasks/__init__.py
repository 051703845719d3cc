"""Tasks: a teacher model with its data, the thing a study compresses.

A :class:`Task` is plain data. ``--task`` names a built-in (``digits``,
``cifar10``, ``imagefolder``) or a user's factory as ``module:function``: an
importable function ``make_task(seed: int, options: TaskOptions) -> Task``.
Built-ins are modules with ``check(options)`` (cheap, run before anything is
written) and ``make_task(seed, options)``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from search._base.errors import ConfigError
from search.tasks._arch import build_arch, known_archs
from search.tasks._base import (
    CALIBRATION_CAP,
    Loss,
    Metric,
    Split,
    Task,
    TaskOptions,
    class_dim,
    classification_loss,
    logits_of,
    top1_accuracy,
)
from search.tasks._teacher import (
    TrainSettings,
    cached_teacher,
    load_teacher_state,
    near_chance,
    read_teacher,
    teacher_scores,
    train_classifier,
)

__all__ = [
    "CALIBRATION_CAP", "Loss", "Metric", "Split", "TASKS", "Task", "TaskOptions", "TrainSettings",
    "build_arch", "cached_teacher", "check_task", "class_dim", "classification_loss",
    "known_archs", "load_task", "load_teacher_state", "logits_of", "near_chance",
    "top1_accuracy", "train_classifier",
]

TASKS: dict[str, str] = {
    "digits": "search.tasks.digits",
    "cifar10": "search.tasks.cifar10",
    "imagefolder": "search.tasks.imagefolder",
    "signals": "search.tasks.signals",
    "digits-detection": "search.tasks.digits_detection",
    "digits-segmentation": "search.tasks.digits_segmentation",
}

Factory = Callable[[int, TaskOptions], Task]
log = logging.getLogger("search")


def _plugin(spec: str) -> Factory:
    """The function ``module:function`` names, or ConfigError saying what is wrong."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--task {spec!r}: give a built-in task ({', '.join(sorted(TASKS))}) "
                          "or module:function, e.g. my_pkg.tasks:make_task")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--task {spec!r}: cannot import module {module_name!r} ({exc}); "
                          "is it installed or on PYTHONPATH?") from None
    except Exception as exc:  # the module itself raised on import
        raise ConfigError(f"--task {spec!r}: importing {module_name!r} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    try:
        factory = functools.reduce(getattr, attr.split("."), module)
    except AttributeError:
        public = sorted(n for n, v in vars(module).items()
                        if callable(v) and not n.startswith("_") and
                        getattr(v, "__module__", None) == module.__name__)
        raise ConfigError(f"--task {spec!r}: module {module_name!r} has no {attr!r}; "
                          f"its functions: {', '.join(public) or 'none'}") from None
    if not callable(factory):
        raise ConfigError(f"--task {spec!r}: {attr!r} is a {type(factory).__name__}, not a function")
    _ship_by_value(module)
    try:
        inspect.signature(factory).bind(0, TaskOptions())
    except TypeError:
        raise ConfigError(f"--task {spec!r}: {attr} must accept (seed, options), i.e. "
                          "def make_task(seed: int, options: TaskOptions) -> Task") from None
    except ValueError:  # no signature to inspect (a builtin): let the call decide
        pass
    return factory


def _ship_by_value(module: ModuleType) -> None:
    """Send a one-file plugin's functions to Ray workers by value, so the nodes of a cluster
    need not have the user's module on their path (a package's modules still must be:
    what they import from their package travels by reference)."""
    if "." in module.__name__ or hasattr(module, "__path__"):
        return
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(module)


def check_task(name: str, options: TaskOptions | None = None) -> None:
    """Fail fast, before anything is written: unknown task, missing data, bad plugin."""
    options = options or TaskOptions()
    if options.teacher is not None:
        read_teacher(options.teacher)  # missing or corrupt: now; a mismatch needs the model
    if name in TASKS:
        importlib.import_module(TASKS[name]).check(options)
    elif ":" in name:
        _plugin(name)
    else:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}, "
                          "or module:function for your own (see README, 'Your own model and data')")


def _validate(name: str, task: Task) -> None:
    """The shapes every stage relies on, checked once instead of failing in every trial."""
    for label in ("train", "val", "test"):
        split = getattr(task, label)
        if not isinstance(split, Split) or len(split) == 0:
            raise ConfigError(f"task {name!r}: {label} must be a non-empty Split(x, y)")
        if tuple(split.x.shape[1:]) != tuple(task.input_shape):
            raise ConfigError(f"task {name!r}: {label}.x has samples of shape "
                              f"{tuple(split.x.shape[1:])} but input_shape is {task.input_shape}")
        labels_ok = split.y.dtype == torch.long or (task.loss is not None
                                                    and split.y.dtype.is_floating_point)
        if split.x.dtype not in (torch.float32, torch.long) or not labels_ok \
                or len(split.x) != len(split.y):
            raise ConfigError(f"task {name!r}: {label} needs float32 x (or int64 token ids) and "
                              f"int64 class labels (float labels with a task loss, e.g. "
                              f"regression) of equal length "
                              f"(got {split.x.dtype} x{len(split.x)}, {split.y.dtype} x{len(split.y)})")
    if task.train.y.dtype.is_floating_point and task.metric is top1_accuracy:
        raise ConfigError(f"task {name!r}: float labels need a metric (Task(metric=...), higher "
                          "is better, e.g. R^2 in percent); top-1 accuracy is for class labels")
    _check_loss(name, task)


def _check_loss(name: str, task: Task) -> None:
    """The task's loss on two training samples: a loss that broadcasts an output of shape
    (N, 1) against labels of shape (N,) would train every trial on the wrong target."""
    if task.loss is None:
        return
    with torch.no_grad():
        output = logits_of(task.teacher()(task.train.x[:2]))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch warns where it broadcasts
        try:
            value = task.loss(output, task.train.y[:2])
        except Exception as exc:
            raise ConfigError(f"task {name!r}: its loss failed on the model's output for two "
                              f"training samples: {type(exc).__name__}: {exc}") from exc
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ConfigError(f"task {name!r}: its loss must return a scalar tensor (got "
                          f"{type(value).__name__} of shape {tuple(getattr(value, 'shape', ()))})")


def _sparse_state(path: Path, task: Task) -> dict:
    """The pre-sparsified checkpoint, checked like a teacher and for actually having zeros."""
    state = load_teacher_state(path, task.make_model())
    weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() > 1]
    zeros = sum(int((w == 0).sum()) for w in weights) / max(1, sum(w.numel() for w in weights))
    if zeros < 0.05:
        raise ConfigError(f"--sparse-init {path}: only {zeros:.1%} of its Conv/Linear weights "
                          "are zero; a pre-sparsified checkpoint (sparse transfer) should have "
                          "most of them zero")
    return state


@functools.cache
def load_task(name: str, seed: int = 0, options: TaskOptions | None = None) -> Task:
    """Build (and cache in this process) the task ``name``; trains its teacher on first use.

    ``options.teacher`` replaces the teacher's weights for any task, checked
    against its ``make_model()`` (built-ins load it instead of training).
    """
    options = options or TaskOptions()
    check_task(name, options)
    if name in TASKS:
        task = importlib.import_module(TASKS[name]).make_task(seed, options)
    else:
        try:
            task = _plugin(name)(seed, options)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"--task {name!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(task, Task):
        raise ConfigError(f"--task {name!r} returned {type(task).__name__}; it must return a "
                          "search.tasks.Task")
    _validate(name, task)
    if options.teacher is not None and task.teacher_info.get("teacher") != str(options.teacher):
        state = load_teacher_state(options.teacher, task.make_model())
        info = {**task.teacher_info, "teacher": str(options.teacher), "trained_s": 0.0}
        for key in ("test_accuracy", "val_accuracy", "cache"):  # they were the built-in's
            info.pop(key, None)
        task = dataclasses.replace(task, teacher_state=state, teacher_info=info)
    if options.sparse_init is not None:
        task = dataclasses.replace(task, sparse_state=_sparse_state(options.sparse_init, task))
    if "test_accuracy" not in task.teacher_info:  # built-ins and plugins leave it to us
        task = dataclasses.replace(task, teacher_info={**task.teacher_info,
                                                       **teacher_scores(task)})
    return _flag_chance_teacher(task)


def _flag_chance_teacher(task: Task) -> Task:
    """Warn (log, and ``teacher_info["warning"]`` for the study's outputs) when a top-1
    teacher is near chance; other metrics have no chance level to compare with."""
    if task.metric is not top1_accuracy:
        return task
    why = near_chance(float(task.teacher_info["test_accuracy"]), task.num_classes)
    if not why:
        return task
    log.warning("task %r: %s", task.name, why)
    return dataclasses.replace(task, teacher_info={**task.teacher_info, "warning": why})
