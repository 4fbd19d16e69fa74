"""orbax checkpoints of (train state, grain iterator state, JSON metadata).

A checkpoint directory belongs to one fingerprint (model, data, subset, schedule, seed...).
Orbax writes each step to a temporary directory and renames it on commit, so a process
killed mid-save leaves the previous step intact and the next run resumes from it.
"""

from __future__ import annotations

import os
import time

import grain
import jax
import orbax.checkpoint as ocp

from kdprune_jax import distributed
from kdprune_jax.errors import ArtifactError


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
        self.mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

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

    def save(self, step: int, state, meta: dict, data_iter=None, *, force: bool = False):
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
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
        except Exception as e:
            raise ArtifactError(
                f"checkpoint {self.directory} step {step} cannot be restored into this model "
                f"({type(e).__name__}: {str(e)[:300]}); it was written by a different model or"
                " is corrupt. Move it away or use a new --workdir."
            ) from None
        return out["state"], dict(out["meta"])

    def restore_raw(self, step: int):
        """Restore the saved state as plain nested dicts of arrays (no target structure),
        e.g. to import just the params of a model trained with another optimizer.
        Returns (state_dict, meta)."""
        try:
            out = self.mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        except Exception as e:
            raise ArtifactError(f"checkpoint {self.directory} step {step} is unreadable "
                                f"({type(e).__name__}: {str(e)[:300]})") from None
        return out["state"], dict(out["meta"])

    def wait(self):
        self.mgr.wait_until_finished()

    def close(self):
        self.mgr.wait_until_finished()
        self.mgr.close()


def set_aside_if_stale(directory: str, fingerprint: str, log=print) -> None:
    """If `directory` holds a checkpoint written for another fingerprint, rename it to
    ``<directory>.stale-<time>`` (never delete: nothing already computed is lost)."""
    if not os.path.isdir(directory) or not os.listdir(directory):
        return
    ck = Checkpointer(directory)
    meta = ck.read_meta()
    ck.close()
    if meta is not None and meta.get("fingerprint") == fingerprint:
        return
    # Every process has read the same metadata (and so took this branch) before process 0
    # may move the directory.
    distributed.barrier("kdprune_stale_checkpoint_read")
    aside = f"{directory}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
        os.replace(directory, aside)
    # The others must not open the old directory as their own checkpoint while (or
    # before) process 0 moves it.
    distributed.barrier("kdprune_stale_checkpoint_moved")
    log(f"{directory} was written by a different config (fingerprint "
        f"{(meta or {}).get('fingerprint')} != {fingerprint}); moved to {aside}")
