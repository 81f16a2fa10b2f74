"""The checkpoints of a training run: save every K steps, keep the newest N, resume from the newest complete one.

    from hf_storage.manager import CheckpointManager

    manager = CheckpointManager("/ckpt/run", every=500, keep=3, async_mode=True, max_shard_size="5GB")
    start = manager.load_latest(state_dict) or 0      # every rank: the newest complete checkpoint, or None
    for step in range(start + 1, total_steps + 1):
        train_step()
        manager.maybe_save(step, state_dict)            # every rank, every step (it saves when step % every == 0;
                                                        # force=True saves any step, e.g. the last)
    manager.wait()                                      # every rank, before the process group is destroyed

    # under torchrun: torchrun --nproc-per-node=2 examples/train_fsdp_cpu.py --out /tmp/run --async --keep 2

The rules:

- **Names.** Step N is saved to ``root/step-{N:08d}`` (one Hugging Face checkpoint: ``hf_storage.save``'s
  files, the weights and whatever else the state dict holds, plus ``extra_files``). ``root/latest`` is a
  relative symbolic link to the newest complete one.
- **Complete.** A checkpoint is complete when its ``model.safetensors.index.json`` exists: the library writes
  it last and publishes the directory with one rename, so a save that died never looks complete. Staging
  directories (``.step-N.staging-*``), lock files, directories being deleted (``.step-N.deleting-*``) and
  ``step-N`` directories without an index are never chosen: :meth:`CheckpointManager.latest` and
  :meth:`~CheckpointManager.load_latest` take the complete one with the highest step.
- **Collective.** Every rank of ``process_group`` calls :meth:`~CheckpointManager.maybe_save` with the same
  steps, and :meth:`~CheckpointManager.wait` and :meth:`~CheckpointManager.load_latest`; the save itself
  runs on that group. The step to resume from is chosen by rank 0 and broadcast, so all ranks load the same.
- **Async.** With ``async_mode=True`` a save copies this rank's shards to host memory and returns a future
  (:func:`hf_storage.async_save`); the files are written on a background thread while training goes on. One
  save is in flight at a time: the next save first settles the previous one (waits for it, raises its error
  on every rank). So do :meth:`~CheckpointManager.wait` and :meth:`~CheckpointManager.load_latest`.
  On steps that save nothing, :meth:`~CheckpointManager.maybe_save` (or :meth:`~CheckpointManager.poll`) only
  looks whether the save in flight has finished, without waiting, and if it succeeded does its housekeeping.
- **Housekeeping, after a save completed** (sync: when it returns; async: when its future resolved without
  error and the manager saw it): only rank 0 of the group acts, the other ranks never touch the directory.
  It points ``latest`` at the newest complete checkpoint (a temporary link, then ``os.replace``: atomic), then,
  with ``keep=N``, deletes the complete checkpoints older than the newest N (never the one just saved):
  each is first renamed to ``.step-M.deleting-<id>`` (atomic: a crash never leaves a half-deleted directory
  that looks like a checkpoint), then removed on a background thread. Leftover ``.deleting-`` directories of
  a crashed run are removed when a manager starts. Failures here are logged, never raised: the checkpoint
  just saved is safe either way.
- **Crash.** A job killed mid-save leaves ``.step-N.staging-*`` and ``.step-N.lock`` (the library removes
  them at the next save of step N) and no ``step-N``; resuming takes the newest complete step before it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import objstore, pipeline, publish
from .api import SaveSummary, async_save, load, save
from .collectives import Group
from .errors import HFStorageError
from .layout import INDEX_NAME

log = logging.getLogger(__name__)

LATEST = "latest"
STEP_DIR = re.compile(r"step-(\d+)")
_DELETING = ".deleting-"


def step_dir(step: int) -> str:
    """The directory name of step ``step``: ``step-00000500``."""
    return f"step-{step:08d}"


def scan(root: str | os.PathLike) -> tuple[list[tuple[int, Path]], list[tuple[int, Path]]]:
    """The ``step-N`` directories of ``root``: ``(complete, incomplete)``, each as ``(step, path)`` oldest first.
    Hidden entries (staging, deleting, locks) and the ``latest`` link are not ``step-N`` and never listed."""
    complete: list[tuple[int, Path]] = []
    incomplete: list[tuple[int, Path]] = []
    try:
        entries = list(os.scandir(os.fspath(root)))
    except FileNotFoundError:
        return [], []
    for e in entries:
        m = STEP_DIR.fullmatch(e.name)
        if m is None or not e.is_dir():
            continue
        done = os.path.isfile(os.path.join(e.path, INDEX_NAME))
        (complete if done else incomplete).append((int(m.group(1)), Path(e.path)))
    return sorted(complete), sorted(incomplete)


class CheckpointManager:
    """Save every ``every`` steps to ``root/step-{step:08d}``, keep the newest ``keep``, resume from the newest.

    Args:
        root: the run's checkpoint directory (created by the first save).
        every: save when ``step % every == 0``.
        keep: how many complete checkpoints to keep (the newest); None keeps all.
        async_mode: save with :func:`hf_storage.async_save` (write behind training) instead of
            :func:`hf_storage.save`.
        process_group: the group whose ranks save together (default: the default group).
        **save_kwargs: passed to every save (``max_shard_size``, ``durable``, ``extra_files``, ``progress``...).

    Raises:
        ValueError: ``every`` < 1 or ``keep`` < 1.
        TypeError: an unknown save option (naming the known ones).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        every: int,
        keep: int | None = None,
        async_mode: bool = False,
        process_group: Any = None,
        **save_kwargs: Any,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1 (save when step % every == 0), got {every}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 (the newest checkpoints to keep) or None to keep all, got {keep}")
        pipeline.options(**save_kwargs)  # names an unknown option now, not at the first save
        if objstore.is_uri(os.fspath(root)):
            raise HFStorageError(
                f"CheckpointManager keeps its checkpoints in a directory (a 'latest' link, atomic deletes); "
                f"{os.fspath(root)!r} is an object store: call hf_storage.save / async_save with s3:// paths instead"
            )
        self.root, self.every, self.keep, self.async_mode = Path(root), every, keep, async_mode
        self.process_group, self.save_kwargs = process_group, save_kwargs
        self.rank0 = Group(process_group).rank == 0
        self._pending: tuple[int, Future[SaveSummary]] | None = None
        self._deletions: list[Future[None]] = []
        self._purger = ThreadPoolExecutor(1, thread_name_prefix="hf_storage-purge") if self.rank0 else None
        if self.rank0:
            self._sweep()

    # -- saving ---------------------------------------------------------------------------------------

    def maybe_save(
        self,
        step: int,
        state_dict: Mapping,
        extra_files: Mapping[str, bytes | str] | None = None,
        *,
        force: bool = False,
    ) -> Future[SaveSummary] | SaveSummary | None:
        """Save ``state_dict`` as step ``step`` if ``step % every == 0`` (or ``force``: e.g. the last step).
        Call on every rank, every step.

        Returns:
            None when this step saves nothing; else :func:`hf_storage.save`'s summary, or with ``async_mode``
            the future of it (resolved once the checkpoint is published).

        Raises:
            What :func:`hf_storage.save` raises; with ``async_mode`` also the error of the previous save.
        """
        if not force and step % self.every != 0:
            self.poll()
            return None
        self._settle()
        path = self.root / step_dir(step)
        kwargs = dict(self.save_kwargs)
        if extra_files is not None:
            kwargs["extra_files"] = {**(kwargs.get("extra_files") or {}), **extra_files}
        if not self.async_mode:
            summary = save(state_dict, path, process_group=self.process_group, **kwargs)
            self._completed(step)
            return summary
        future = async_save(state_dict, path, process_group=self.process_group, **kwargs)
        self._pending = (step, future)
        return future

    @property
    def in_flight(self) -> bool:
        """Whether an async save is still writing."""
        return self._pending is not None and not self._pending[1].done()

    def poll(self) -> SaveSummary | None:
        """Without waiting: if the save in flight has finished without error, do its housekeeping and return its
        summary. An error is left for :meth:`wait` or the next save, which raise it on every rank at the same
        point of the program (a rank raising alone would leave its peers waiting in a collective)."""
        if self._pending is None:
            return None
        step, future = self._pending
        if not future.done() or future.exception() is not None:
            return None
        self._pending = None
        self._completed(step)
        return future.result()

    def wait(self) -> SaveSummary | None:
        """Settle the save in flight (wait for it, raise its error, do its housekeeping) and wait for deletions
        in progress. Call on every rank before destroying the process group. Returns the save's summary, or
        None if none was in flight."""
        summary = self._settle()
        deletions, self._deletions = self._deletions, []
        for d in deletions:
            d.result()
        return summary

    def _settle(self) -> SaveSummary | None:
        if self._pending is None:
            return None
        (step, future), self._pending = self._pending, None
        summary = future.result()  # the save's error, raised on every rank
        self._completed(step)
        return summary

    # -- resuming -------------------------------------------------------------------------------------

    def latest(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint in ``root`` as ``(step, path)``, or None. Reads the directory only."""
        complete, _ = scan(self.root)
        return complete[-1] if complete else None

    def load_latest(self, state_dict: Mapping | Callable[[], Mapping], **load_kwargs: Any) -> int | None:
        """Load the newest complete checkpoint into ``state_dict`` in place (every rank; rank 0 chooses it for all).

        Args:
            state_dict: the targets, or a function that builds them, called only when there is a checkpoint to
                load (building optimizer state, for one, changes the optimizer).
            **load_kwargs: passed to :func:`hf_storage.load` (``strict``, ``allow_cast``...).

        Returns:
            The step loaded, or None when ``root`` holds no complete checkpoint (nothing is built or loaded).
        """
        self._settle()
        group = Group(self.process_group)
        chosen = group.broadcast(self._choose() if group.rank == 0 else None)
        if chosen is None:
            return None
        step, name = chosen
        load(state_dict() if callable(state_dict) else state_dict, self.root / name, **load_kwargs)
        return step

    def _choose(self) -> tuple[int, str] | None:
        complete, incomplete = scan(self.root)
        newest = complete[-1][0] if complete else -1
        for step, path in incomplete:
            if step > newest:
                log.warning("skipping %s: it has no %s (its save did not complete)", path, INDEX_NAME)
        return (complete[-1][0], complete[-1][1].name) if complete else None

    # -- housekeeping (rank 0) ------------------------------------------------------------------------

    def _completed(self, step: int) -> None:
        """After step ``step``'s checkpoint was published: point ``latest`` at the newest, delete the old ones."""
        if not self.rank0:
            return
        complete, _ = scan(self.root)
        if not complete:
            log.warning("%s: the save of step %d completed but no complete checkpoint is there", self.root, step)
            return
        if complete[-1][0] > step:
            log.warning(
                "%s holds step %d, newer than the step %d just saved (a new run in an old directory?); "
                "'latest' stays on step %d",
                self.root,
                complete[-1][0],
                step,
                complete[-1][0],
            )
        self._link(complete[-1][1])
        if self.keep is not None:
            for old_step, path in complete[: -self.keep]:
                if old_step != step:
                    self._delete(path)

    def _link(self, target: Path) -> None:
        tmp = self.root / f".{LATEST}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            os.symlink(target.name, tmp)
            os.replace(tmp, self.root / LATEST)
        except OSError as e:
            log.warning(
                "could not point %s at %s (%s); remove whatever is at that path so the link can be made",
                self.root / LATEST,
                target.name,
                e,
            )
            _remove(tmp)

    def _delete(self, path: Path) -> None:
        hidden = path.with_name(f".{path.name}{_DELETING}{uuid.uuid4().hex[:12]}")
        try:
            os.rename(path, hidden)
        except OSError as e:
            log.warning("could not delete the old checkpoint %s (%s); delete it by hand", path, e)
            return
        assert self._purger is not None
        self._deletions.append(self._purger.submit(_remove, hidden))

    def _sweep(self) -> None:
        """Remove what a crashed run left: directories being deleted, temporary links."""
        if not self.root.is_dir():
            return
        assert self._purger is not None
        publish.sweep(self.root)  # staging of saves that died (their lock is free), whatever their step
        for p in self.root.iterdir():
            if p.name.startswith(".") and (_DELETING in p.name or p.name.startswith(f".{LATEST}.tmp-")):
                log.info("removing %s, left by an interrupted run", p)
                self._deletions.append(self._purger.submit(_remove, p))


def _remove(path: Path) -> None:
    """Remove a directory tree or a link (best effort: a leftover is logged and swept by the next manager)."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)
    except OSError as e:
        log.warning("could not remove %s (%s); delete it by hand", path, e)
