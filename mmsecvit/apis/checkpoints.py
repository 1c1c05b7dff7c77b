"""Checkpoints that survive a crash, and resuming that skips the ones a crash cut short.

mmengine's ``CheckpointHook`` writes a checkpoint straight under its final name, after deleting the oldest
one that ``max_keep_ckpts`` lets go: a process killed while saving leaves a truncated newest checkpoint and,
with ``max_keep_ckpts=1``, nothing intact. :class:`SafeCheckpointHook` writes each checkpoint to
``<name>.saving`` in the same directory, flushes it to disk and renames it into place with ``os.replace``;
``last_checkpoint`` (mmengine's pointer to the newest checkpoint) is rewritten the same way, and outdated
checkpoints are removed only after both. A name therefore only ever holds a complete file.

:func:`resolve_resume_checkpoint` picks the checkpoint a ``resume=True`` run starts from: the newest
``epoch_*.pth`` / ``iter_*.pth`` that ``torch.load(weights_only=True)`` reads, skipping (and naming) the
unreadable ones, which stay where they are.
"""
import math
import os
import os.path as osp
import re
from typing import Any, List, Optional

import torch
from mmengine.config import Config
from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend
from mmengine.hooks import CheckpointHook
from mmengine.registry import HOOKS
from mmengine.runner import Runner

SAVING_SUFFIX = '.saving'
LAST_CHECKPOINT = 'last_checkpoint'
RESUMABLE_NAME = re.compile(r'(?:epoch|iter)_(\d+)\.pth')
PLAIN_CHECKPOINT_HOOK_TYPES = ('CheckpointHook', 'mmengine.CheckpointHook', CheckpointHook)


def replace_atomically(temporary: str, path: str) -> None:
    """Flush ``temporary`` to disk and rename it to ``path``, replacing any file there in one step.

    Args:
        temporary (str): A complete file in the same directory as ``path``.
        path (str): The final name.
    """
    descriptor = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)
    directory = os.open(osp.dirname(osp.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)  # makes the rename itself durable
    finally:
        os.close(directory)


def write_text_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so that ``path`` holds the old or the new text.

    Args:
        path (str): The file to write.
        text (str): Its new content.
    """
    temporary = path + SAVING_SUFFIX
    with open(temporary, 'w') as file:
        file.write(text)
    replace_atomically(temporary, path)


def save_checkpoint_atomically(runner: Runner, out_dir: str, filename: str, **save_kwargs: Any) -> str:
    """Save ``runner``'s checkpoint as ``out_dir/filename`` so that the name never holds a partial file.

    The checkpoint goes to ``filename + '.saving'`` first and is renamed into place once complete. If saving
    fails, the temporary file is removed, whatever was under ``filename`` before is untouched, and the error
    is raised again. Call it on the main process only: ``runner.save_checkpoint`` writes nothing elsewhere.

    Args:
        runner (Runner): The runner whose state is saved.
        out_dir (str): A local directory.
        filename (str): The checkpoint's file name in ``out_dir``.
        **save_kwargs: Passed on to ``runner.save_checkpoint`` (``save_optimizer``, ``meta``, ...).

    Returns:
        str: The checkpoint's path.
    """
    path = osp.join(out_dir, filename)
    temporary = path + SAVING_SUFFIX
    try:
        runner.save_checkpoint(out_dir, filename + SAVING_SUFFIX, **save_kwargs)
        replace_atomically(temporary, path)
    except BaseException:
        if osp.exists(temporary):
            os.remove(temporary)
        raise
    return path


@HOOKS.register_module()
class SafeCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` that leaves a complete checkpoint on disk whenever the process dies.

    Each checkpoint is saved with :func:`save_checkpoint_atomically`, ``last_checkpoint`` is rewritten with
    :func:`write_text_atomically`, and the checkpoints beyond ``max_keep_ckpts`` are deleted only after
    that. A checkpoint to a storage backend other than the local disk (``out_dir='s3://...'``), which has no
    atomic rename, and one of a runner other than mmengine's ``Runner`` (``FlexibleRunner`` saves sharded
    states from all ranks) are saved as ``CheckpointHook`` saves them.

    Args:
        **kwargs: ``CheckpointHook``'s arguments (``interval``, ``max_keep_ckpts``, ``save_best``, ...).
    """

    def _save_checkpoint_with_step(self, runner, step, meta):
        local = isinstance(getattr(self.file_backend, 'client', self.file_backend), LocalBackend)
        if not (local and isinstance(runner, Runner)):
            return super()._save_checkpoint_with_step(runner, step, meta)
        outdated_steps = self._keep_step(runner, step)
        filename = self.filename_tmpl.format(step)
        self.last_ckpt = osp.join(self.out_dir, filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        if not is_main_process():
            return
        save_checkpoint_atomically(
            runner, self.out_dir, filename, file_client_args=self.file_client_args,
            save_optimizer=self.save_optimizer, save_param_scheduler=self.save_param_scheduler, meta=meta,
            by_epoch=self.by_epoch, backend_args=self.backend_args, **self.args)
        write_text_atomically(osp.join(runner.work_dir, LAST_CHECKPOINT), self.last_ckpt)
        for outdated in outdated_steps:
            path = osp.join(self.out_dir, self.filename_tmpl.format(outdated))
            if osp.isfile(path):
                os.remove(path)

    def _keep_step(self, runner, step):
        """Record ``step`` among the kept checkpoints (saved with the checkpoint, as in ``CheckpointHook``).

        Args:
            runner (Runner): The runner, whose message hub holds the kept steps.
            step (int): The epoch or iteration of the checkpoint about to be saved.

        Returns:
            list[int]: The steps whose checkpoints to delete once this one is in place.
        """
        if self.max_keep_ckpts <= 0 or (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            return []
        outdated = [self.keep_ckpt_ids.popleft()] if len(self.keep_ckpt_ids) == self.max_keep_ckpts else []
        self.keep_ckpt_ids.append(step)
        runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))
        return outdated


def use_safe_checkpoint_hook(cfg: Config) -> None:
    """Save the checkpoints of ``cfg`` with :class:`SafeCheckpointHook` where it uses mmengine's plain
    ``CheckpointHook`` (as mmengine does when ``default_hooks`` names no checkpoint hook); a custom hook or
    ``checkpoint=None`` is left alone.

    Args:
        cfg (Config): A runner config; changed in place.
    """
    default_hooks = cfg.get('default_hooks') or {}
    hook = default_hooks.get('checkpoint', dict(type='CheckpointHook', interval=1))
    if hook is not None and hook.get('type') in PLAIN_CHECKPOINT_HOOK_TYPES:
        cfg.default_hooks = {**default_hooks, 'checkpoint': {**hook, 'type': 'SafeCheckpointHook'}}


def unreadable_reason(path: str) -> Optional[str]:
    """Why a run cannot resume from ``path``; None when it is an intact training checkpoint.

    Intact means ``torch.load(path, weights_only=True, map_location='cpu')`` reads it and it holds what
    ``Runner.resume`` needs (``meta`` with ``epoch`` and ``iter``, ``state_dict`` and ``message_hub``).

    Args:
        path (str): A checkpoint file.

    Returns:
        str or None: The reason, as a clause ("it ...").
    """
    if not osp.isfile(path):
        return 'it does not exist'
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # any failure to read it makes it unusable
        first_line = next(iter(str(error).strip().splitlines()), '')[:300]
        return (f'it cannot be read ({type(error).__name__}: {first_line}); it was probably cut short by a '
                'crash while it was saved')
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    if not (isinstance(meta, dict) and {'epoch', 'iter'} <= meta.keys()
            and {'state_dict', 'message_hub'} <= checkpoint.keys()):
        return 'it holds no training state (meta epoch/iter, state_dict, message_hub) to resume from'
    return None


def _pointed_checkpoint(work_dir):
    """The path ``work_dir/last_checkpoint`` names, or None without one."""
    pointer = osp.join(work_dir, LAST_CHECKPOINT)
    if not osp.isfile(pointer):
        return None
    with open(pointer) as file:
        return file.read().strip() or None


def _newness(path):
    """Sort key, newest last: modification time, then the epoch/iteration number in the name."""
    mtime = osp.getmtime(path) if osp.exists(path) else -math.inf
    number = RESUMABLE_NAME.fullmatch(osp.basename(path))
    return mtime, int(number.group(1)) if number else -1


def resume_candidates(work_dir: str) -> List[str]:
    """The checkpoints a run in ``work_dir`` could resume from, newest first.

    They are the ``epoch_*.pth`` and ``iter_*.pth`` files in ``work_dir`` and in the directory of the
    checkpoint ``last_checkpoint`` names (a ``CheckpointHook`` ``out_dir``), and that checkpoint itself.

    Args:
        work_dir (str): The run's work directory.

    Returns:
        list[str]: Absolute paths.
    """
    paths = set()
    directories = {work_dir}
    pointed = _pointed_checkpoint(work_dir)
    if pointed:
        paths.add(osp.abspath(pointed))
        directories.add(osp.dirname(pointed))
    for directory in filter(osp.isdir, directories):
        paths.update(osp.abspath(osp.join(directory, name)) for name in os.listdir(directory)
                     if RESUMABLE_NAME.fullmatch(name))
    return sorted(paths, key=_newness, reverse=True)


def resolve_resume_checkpoint(cfg: Config) -> List[str]:
    """Choose the checkpoint a ``resume=True`` run starts from, and set ``cfg.load_from`` to it.

    With ``load_from`` given, that checkpoint must be intact. Without it (auto resume), the newest intact
    checkpoint of :func:`resume_candidates` is taken; unreadable ones are skipped and left in place. With no
    checkpoint at all, mmengine's auto resume trains from scratch as usual.

    Args:
        cfg (Config): A runner config with ``work_dir`` set; changed in place.

    Returns:
        list[str]: Warnings to log: the checkpoints skipped and why, and the one chosen.

    Raises:
        FileNotFoundError: The given ``load_from`` does not exist.
        RuntimeError: The given ``load_from`` is not intact, or no checkpoint in the work dir is.
    """
    if not cfg.get('resume'):
        return []
    work_dir = cfg.work_dir
    if cfg.get('load_from'):
        path = cfg.load_from
        if '://' in path:  # a URL or remote storage: mmengine loads it
            return []
        if not osp.isfile(path):
            raise FileNotFoundError(f'Cannot resume from {path!r}: the file does not exist. Pass an existing '
                                    'checkpoint to --resume, or --resume without a path to resume from the newest '
                                    f'intact checkpoint in {work_dir}')
        reason = unreadable_reason(path)
        if reason:
            raise RuntimeError(f'Cannot resume from {path!r}: {reason}. Pass an intact checkpoint to --resume, '
                               f'or --resume without a path to resume from the newest intact one in {work_dir}')
        return []
    skipped = []
    for path in resume_candidates(work_dir):
        reason = unreadable_reason(path)
        if reason is None:
            cfg.load_from = path
            if not skipped:
                return []
            notes = [f'Not resuming from {bad}: {why}. The file is left where it is.' for bad, why in skipped]
            return notes + [f'Resuming from {path}, the newest intact checkpoint in {work_dir}']
        skipped.append((path, reason))
    if skipped:
        listing = '\n'.join(f'  {path}: {reason}' for path, reason in skipped)
        raise RuntimeError(f'Cannot resume: no checkpoint in {work_dir} is intact:\n{listing}\nPass an intact '
                           'checkpoint to --resume, or move these files out of the work dir to train from scratch')
    return []
