"""orbax checkpoints of (train state, grain iterator state, JSON metadata).

A checkpoint directory belongs to one fingerprint (model, data, subset, schedule, seed...).
Orbax writes each step to a temporary directory and renames it on commit, so a process
killed mid-save leaves the previous step intact and the next run resumes from it.

Every save records a checksum of the saved state (all bits of every leaf) in its metadata,
and every restore recomputes it: a step whose files are truncated, deleted or silently
altered is detected (orbax alone only notices the damage it trips over). `open_for_training`
moves such a step aside to ``<dir>.corrupt-<time>/<step>`` (never deleted) and falls back to
the previous intact step, or to step 0.

A save that never committed (disk full, killed mid-save) leaves an INCOMPLETE step: a
``<step>.orbax-checkpoint-tmp*`` directory, or on object stores a ``<step>`` directory without
orbax's commit marker. It holds nothing usable and is not a checkpoint of another config:
`remove_incomplete_steps` deletes it with one line (freeing the space it took) and training
resumes from the last complete step. A failed write itself is one line, exit 2
(`io_errors.WriteError`, raised by `Checkpointer`'s save/wait/close).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from kdprune_jax import distributed, io_errors
from kdprune_jax.artifacts import describe
from kdprune_jax.errors import ArtifactError


class CorruptCheckpointError(ArtifactError):
    """A checkpoint step cannot be restored, or its state does not match its checksum."""

    def __init__(self, directory: str, step: int, problem: str):
        self.directory, self.step, self.problem = directory, step, problem
        super().__init__(f"checkpoint {directory} step {step} is unreadable ({problem})")


def _as_uint32(x):
    """Every bit of a leaf as uint32 words (floats bitcast, small types widened)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte types: [..., 2] words


@jax.jit
def _checksums(state):
    """uint32 [3]: checksums of state.params, state.batch_stats and the whole state."""
    def one(tree):
        acc = jnp.uint32(2166136261)
        for x in jax.tree.leaves(tree):  # order-sensitive (FNV-style), wrapping sums
            acc = (acc ^ jnp.sum(_as_uint32(x), dtype=jnp.uint32)) * jnp.uint32(16777619)
        return acc

    return jnp.stack([one(state.params), one(state.batch_stats), one(state)])


def state_checksums(state) -> dict:
    """{"params", "batch_stats", "state"} -> int: exact (integer) checksums of a train
    state, independent of its sharding; recorded at save, compared at restore/import."""
    c = np.asarray(jax.device_get(_checksums(state)))
    return {"params": int(c[0]), "batch_stats": int(c[1]), "state": int(c[2])}


def _abstract(tree):
    """ShapeDtypeStructs carrying each leaf's sharding: restore lands directly on the
    target devices/shardings (no host round trip, no resharding afterwards)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for one training run."""

    def __init__(self, directory: str, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._saving, self._needed = None, None  # the latest save started, its state bytes
        with self._writes():
            self.mgr = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            )

    @contextlib.contextmanager
    def _writes(self):
        """The one boundary of every checkpoint write: an OS error (disk full, EIO, EACCES;
        from orbax's Python writes or tensorstore's) becomes one `io_errors.WriteError`
        naming the step directory, the free space and the state's size. The step of an
        asynchronous save that failed is read off the error's text when it names it."""
        try:
            yield
        except Exception as e:
            step = self._saving
            m = re.search(re.escape(self.directory) + r"/(\d+)\b", str(e))
            if m:
                step = int(m.group(1))
            path = self.directory if step is None else os.path.join(self.directory, str(step))
            err = io_errors.write_error(e, path, needed=self._needed, what="checkpoint",
                                        needed_is="the train state to save is")
            if err is None:
                raise
            raise err from None

    def latest_step(self) -> int | None:
        return self.mgr.latest_step()

    def read_meta(self, step: int | None = None) -> dict | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        try:
            out = self.mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(out["meta"])
        except Exception:  # an unreadable meta means an unusable checkpoint
            return None

    def read_meta_checked(self, step: int):
        """(meta, None), or (None, what is wrong) when the step's metadata is unreadable."""
        try:
            out = self.mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = dict(out["meta"])
        except Exception as e:  # orbax/tensorstore raise many types for a damaged file
            return None, f"metadata: {describe(e)}"
        if not isinstance(meta.get("fingerprint"), str):
            return None, "metadata has no fingerprint"
        return meta, None

    def save(self, step: int, state, meta: dict, data_iter=None, *, force: bool = False):
        meta = {**meta, "checksum": state_checksums(state)}
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        # orbax first waits for the previous save: an error raised here may be that one's
        # (the message then names its step directory).
        self._needed = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state))
        self._saving = step
        with self._writes():
            self.mgr.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, state_like, data_iter=None):
        """Restore the state (onto `state_like`'s shapes/shardings) and, if given, set
        `data_iter` to the saved position. Returns (state, meta)."""
        items = {"state": ocp.args.StandardRestore(_abstract(state_like)),
                 "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            out = self.mgr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # truncated/deleted/garbage files, or another model's state
            raise CorruptCheckpointError(self.directory, step, describe(e)) from None
        meta = dict(out["meta"])
        want = (meta.get("checksum") or {}).get("state")
        if want is not None and state_checksums(out["state"])["state"] != want:
            raise CorruptCheckpointError(self.directory, step, "the restored state does not "
                                         "match the checksum recorded when it was saved")
        return out["state"], meta

    def restore_raw(self, step: int):
        """Restore the saved state as plain nested dicts of arrays (no target structure),
        e.g. to import just the params of a model trained with another optimizer.
        Returns (state_dict, meta).

        Every array lands on this process's first local device: the shardings saved with
        the checkpoint name the devices of the run that wrote it, which another topology
        (a 1-process teacher imported by each process of a multi-host run) may not be
        able to address."""
        try:
            # The handler reads the saved tree's shapes/dtypes locally (the manager knows
            # no handler for a directory it did not write, and would return None).
            tree = ocp.StandardCheckpointHandler().metadata(
                epath.Path(self.directory) / str(step) / "state")
            one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                getattr(tree, "tree", tree))
            out = self.mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise CorruptCheckpointError(self.directory, step, describe(e)) from None
        return out["state"], dict(out["meta"])

    def wait(self):
        with self._writes():  # where the errors of asynchronous saves surface
            self.mgr.wait_until_finished()

    def close(self):
        with self._writes():
            self.mgr.wait_until_finished()
            self.mgr.close()


def _aside_path(path: str, kind: str) -> str:
    """``<path>.<kind>-<time>`` (plus ``-2``, ``-3``... if that exists already)."""
    base = f"{path}.{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, k = base, 1
    while os.path.exists(out):
        k += 1
        out = f"{base}-{k}"
    return out


def set_aside_corrupt_step(directory: str, step: int, problem: str, log=print,
                           name: str = "") -> str:
    """Move the unreadable step ``<directory>/<step>`` to ``<directory>.corrupt-<time>/<step>``
    (never deleted), so the manager sees only the intact steps. Returns the new path."""
    src = os.path.join(directory, str(step))
    aside = _aside_path(directory, "corrupt")
    distributed.barrier("kdprune_corrupt_checkpoint_found")
    if jax.process_index() == 0:
        os.makedirs(aside)
        os.replace(src, os.path.join(aside, str(step)))
    distributed.barrier("kdprune_corrupt_checkpoint_moved")
    prefix = f"[{name}] " if name else ""
    log(f"{prefix}checkpoint {src} is unreadable ({problem}); moved to "
        f"{os.path.join(aside, str(step))}")
    return aside


_STEP_ENTRY = re.compile(r"(\d+)(\.orbax-checkpoint-tmp.*)?")


def incomplete_steps(directory: str, committed) -> list[str]:
    """Names of the step entries in `directory` that are not committed checkpoints:
    ``<step>.orbax-checkpoint-tmp*`` (a save that never finished on a POSIX/FUSE
    filesystem, where orbax commits by renaming) and ``<step>`` directories that orbax does
    not list in `committed` (on object stores, where a commit marker file commits)."""
    out = []
    for entry in sorted(os.listdir(directory)):
        m = _STEP_ENTRY.fullmatch(entry)
        if m and os.path.isdir(os.path.join(directory, entry)) and (
                m.group(2) or int(m.group(1)) not in committed):
            out.append(entry)
    return out


def remove_incomplete_steps(directory: str, log=print, name: str = "") -> None:
    """Delete the steps of `directory` whose save never committed, with one line each.

    Deleted, not set aside like a corrupt step: an uncommitted save holds no checkpoint
    (orbax never reads it), and after a full disk the space it takes is what the rerun
    needs. The workdir lock means no other run can still be writing it."""
    ck = Checkpointer(directory)
    committed = set(ck.mgr.all_steps())
    ck.close()
    found = incomplete_steps(directory, committed)
    if distributed.all_agree(not found):
        return
    distributed.barrier("kdprune_incomplete_checkpoint_found")
    if jax.process_index() == 0:
        for entry in found:
            shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)
    distributed.barrier("kdprune_incomplete_checkpoint_removed")
    prefix = f"[{name}] " if name else ""
    last = (f"the last complete step is {max(committed)}" if committed
            else "no step is complete")
    for entry in found:
        log(f"{prefix}checkpoint {os.path.join(directory, entry)} is incomplete (its save "
            f"never committed: interrupted or out of space); removed ({last})")


def set_aside_if_stale(directory: str, fingerprint: str, log=print, name: str = "") -> None:
    """If `directory` holds a checkpoint written for another fingerprint, rename it to
    ``<directory>.stale-<time>`` (never delete: nothing already computed is lost). Steps
    whose save never committed are incomplete, not stale: they are removed first
    (`remove_incomplete_steps`), and a directory left without a committed step is simply
    trained into. Steps whose metadata is unreadable are corrupt, not stale: each is moved
    aside on its own (`set_aside_corrupt_step`) and the next older step decides."""
    if not os.path.isdir(directory) or not os.listdir(directory):
        return
    remove_incomplete_steps(directory, log, name)
    ck = Checkpointer(directory)
    steps = sorted(ck.mgr.all_steps(), reverse=True)
    if not steps:  # nothing committed: no config wrote a checkpoint here to compare with
        ck.close()
        return
    meta = None
    for step in steps:
        meta, problem = ck.read_meta_checked(step)
        if distributed.all_agree(meta is not None):
            break
        ck.close()
        set_aside_corrupt_step(directory, step, problem or "unreadable on another process",
                               log, name)
        meta = None
        ck = Checkpointer(directory)
    ck.close()
    if steps and meta is None:
        return  # every step was corrupt and is set aside: training starts from step 0 here
    if meta is not None and meta.get("fingerprint") == fingerprint:
        return
    # Every process has read the same metadata (and so took this branch) before process 0
    # may move the directory.
    distributed.barrier("kdprune_stale_checkpoint_read")
    aside = _aside_path(directory, "stale")
    if jax.process_index() == 0:
        os.replace(directory, aside)
    # The others must not open the old directory as their own checkpoint while (or
    # before) process 0 moves it.
    distributed.barrier("kdprune_stale_checkpoint_moved")
    log(f"{directory} was written by a different config (fingerprint "
        f"{(meta or {}).get('fingerprint')} != {fingerprint}); moved to {aside}")


def open_for_training(directory: str, fingerprint: str, state_like, make_iter, log=print,
                      name: str = "", final_step: int | None = None):
    """The checkpoint manager of one training run, restored from its latest INTACT step.

    A step at or past `final_step` (training finished) is restored without its data
    iterator: nothing is left to read, and the iterator's state is per process, so a
    finished checkpoint written by another process count stays usable.

    A stale directory is moved aside (`set_aside_if_stale`); a step that fails to restore
    or whose state does not match its checksum is moved to ``<dir>.corrupt-<time>/<step>``
    with one log line, and the next older step is tried, down to none (train from step 0).
    `make_iter()` builds a fresh data iterator for each attempt (a failed restore may have
    moved the previous one). Returns (checkpointer, step or None, state, meta, data_iter).
    """
    set_aside_if_stale(directory, fingerprint, log, name)
    while True:
        ckpt = Checkpointer(directory)
        data_iter = make_iter()
        step = ckpt.latest_step()
        if step is None:
            return ckpt, None, state_like, {}, data_iter
        finished = final_step is not None and step >= final_step
        try:
            state, meta = ckpt.restore(step, state_like, None if finished else data_iter)
            problem = None
        except CorruptCheckpointError as e:
            problem = e.problem
        if distributed.all_agree(problem is None):
            return ckpt, step, state, meta, data_iter
        ckpt.close()
        set_aside_corrupt_step(directory, step, problem or "unreadable on another process",
                               log, name)
