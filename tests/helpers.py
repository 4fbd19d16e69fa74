"""Shared test helpers."""

import os

import pytest

DEFAULT_ARCHIVE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                               "cifar10", "cifar10-jpeg.tar.gz")


def cifar_archive() -> str:
    """Path of the offline CIFAR-10 archive ($KDPRUNE_CIFAR10_ARCHIVE or ../shared/...).

    Under CI (CI set) a missing archive FAILS the test; elsewhere it skips it.
    """
    path = os.environ.get("KDPRUNE_CIFAR10_ARCHIVE", DEFAULT_ARCHIVE)
    if not os.path.exists(path):
        msg = f"offline CIFAR-10 archive not found at {path} (set KDPRUNE_CIFAR10_ARCHIVE)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return os.path.abspath(path)
