from .checkpoints import SafeCheckpointHook
from .runner import build_runner_from_args, load_config

__all__ = ['load_config', 'build_runner_from_args', 'SafeCheckpointHook']
