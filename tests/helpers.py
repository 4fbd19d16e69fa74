"""Shared test helpers."""

import os

import pytest

DEFAULT_ARCHIVE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                               "cifar10", "cifar10-jpeg.tar.gz")


def cifar_archive() -> str:
    """Path of the offline CIFAR-10 archive ($KDPRUNE_CIFAR10_ARCHIVE or ../shared/...).

    A missing archive FAILS the test (in CI and locally alike): a skipped test checks nothing.
    """
    path = os.environ.get("KDPRUNE_CIFAR10_ARCHIVE", DEFAULT_ARCHIVE)
    if not os.path.exists(path):
        pytest.fail(f"offline CIFAR-10 archive not found at {path}; set "
                    "KDPRUNE_CIFAR10_ARCHIVE to its path (see ../shared/data/cifar10/README.md)")
    return os.path.abspath(path)


def quiet_run(config, workdir: str, *, mesh=None, splits=None, log=None):
    """A `context.Run` for calling one stage directly (no log lines unless `log`)."""
    from kdprune_jax import context

    return context.Run.create(config, workdir, mesh=mesh, splits=splits,
                              log=log or (lambda *_: None))
