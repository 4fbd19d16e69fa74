"""The `multidevice` tests (sharded against single-device results, and the bad inputs whose
message names the device count), run in their own pytest process with 8 simulated devices.

XLA fixes the device count when a process starts, and every other test runs on one device
(tests/conftest.py), so this test starts ``KDPRUNE_TEST_DEVICES=8 python -m pytest -m
multidevice`` and passes only if every one of them passes there. Under xdist (``pytest -n 3``) it
runs beside the 1-device tests instead of after them. To run them directly:

    KDPRUNE_TEST_DEVICES=8 python -m pytest -m multidevice
"""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_multidevice_tests_pass_on_8_devices():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["KDPRUNE_TEST_DEVICES"] = "8"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-m", "multidevice", "tests"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1800)
    print(p.stdout[-6000:])
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    summary = p.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 8 and not re.search(r"failed|error|skipped", summary), summary
