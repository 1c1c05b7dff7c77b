"""Let torch's safe checkpoint loading (``weights_only=True``, the default since torch 2.6) read the
checkpoints that mmengine 0.10.7 writes and the official SecViT training checkpoints, without turning the
protection off.

mmengine's checkpoints hold, beside tensors, its ``HistoryBuffer`` log objects and numpy arrays and
scalars; each buffer pickles its statistics methods as ``getattr(HistoryBuffer, 'min')`` and so on. The
real ``getattr`` is not allowed: a stand-in registered under its name resolves exactly those methods.
The official (DeiT-style) training script, like timm's, stores its ``argparse.Namespace`` of training
arguments under ``args``; unpickling a Namespace only sets attributes. Exactly those types are
added to torch's allowlist; anything else a checkpoint tries to unpickle (arbitrary classes or callables)
is still refused by ``torch.load``.
"""
import argparse
import pickle
from typing import Any, Callable

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer


def _numpy_globals():
    multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
    dtype_classes = [type(np.dtype(t)) for t in
                     (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.bool_)]
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *dtype_classes]


HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')


def history_buffer_getattr(obj: object, name: str) -> Callable[..., Any]:
    """Stands in for ``builtins.getattr`` while unpickling: only ``HistoryBuffer``'s statistics methods."""
    if obj is HistoryBuffer and name in HISTORY_BUFFER_STATISTICS:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f'Checkpoint asks for attribute {name!r} of {obj!r}; safe loading only allows '
                                 f'HistoryBuffer.{{{", ".join(HISTORY_BUFFER_STATISTICS)}}}')


MMENGINE_CHECKPOINT_GLOBALS = [HistoryBuffer, (history_buffer_getattr, 'builtins.getattr'), *_numpy_globals()]
# Given with its explicit name: torch's ``safe_globals`` context manager (timm's checkpoint loader uses one
# for Namespace) removes a bare class from the allowlist on exit, even one allowed before; this entry stays.
TRAINING_ARGS_GLOBALS = [(argparse.Namespace, 'argparse.Namespace')]


def allow_mmengine_checkpoints() -> None:
    """Add the types found in mmengine and official SecViT checkpoints to torch's ``weights_only`` allowlist
    (idempotent)."""
    torch.serialization.add_safe_globals(MMENGINE_CHECKPOINT_GLOBALS + TRAINING_ARGS_GLOBALS)
