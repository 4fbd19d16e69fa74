"""The shipped configs (configs/): each loads for every arg it documents, a bad ``:arg`` is one
line naming the file, the bad arg and every allowed arg, and the files share one loader and
one arg parser (kdprune_jax.config_helpers), the only part of the package they import.
Fast: no training, no jax in this process except the method-table check."""

import ast
import importlib.util
import itertools
import os
import re
import subprocess
import sys

import pytest

from kdprune_jax import config_helpers
from kdprune_jax.config_helpers import ConfigArgError, parse_config_arg
from kdprune_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
METHODS = ("random", "el2n", "teacher_el2n", "grand", "grand_last_layer", "forgetting",
           "entropy", "margin", "moderate", "influence", "self_influence", "ifbeta")
# Every config file: (its flags, its choices); the documented args are every combination.
ARGS = {
    "base.py": ((), {}),
    "quickstart.py": (("smoke",), {}),
    "cifar10_kd.py": (("smoke", "tfds"), {"method": METHODS}),
    "cifar10_random_kd.py": (("smoke", "tfds"), {}),
    "cifar10_ifbeta.py": (("smoke", "tfds"), {}),
    "imagenet_random_kd.py": (("smoke",), {}),
    "imagenet_ifbeta.py": (("smoke",), {}),
    "study/cifar10.py": ((), {}),
    "study/smoke.py": ((), {}),
}


def _documented_args(name):
    flags, choices = ARGS[name]
    flag_sets = [c for r in range(len(flags) + 1) for c in itertools.combinations(flags, r)]
    values = [(None,), *((v,) for vs in choices.values() for v in vs)]
    return [",".join(x for x in (*v, *f) if x) for v in values for f in flag_sets]


def _config_files():
    out = []
    for dp, _, files in os.walk(CONFIGS):
        out += [os.path.relpath(os.path.join(dp, f), CONFIGS) for f in files if f.endswith(".py")]
    return sorted(out)


def _load(name):
    spec = importlib.util.spec_from_file_location("test_cfg", os.path.join(CONFIGS, name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_config_file_is_listed_here():
    assert _config_files() == sorted(ARGS)


@pytest.mark.parametrize("name", sorted(ARGS))
def test_every_documented_arg_loads(name):
    args = _documented_args(name)
    dumps = {arg: _load(name).get_config(arg).to_json() for arg in args}
    for arg in args:
        c = _load(name).get_config(arg)
        assert c.keys(), (name, arg)
        tokens = [t for t in arg.split(",") if t]
        if "prune" in c:
            want = next((t for t in tokens if t in METHODS), None)
            assert c.prune.method == (want or _load(name).get_config("").prune.method), arg
            if "tfds" in ARGS[name][0]:
                assert (c.data.source == "tfds") == ("tfds" in tokens), arg
        for t in tokens:  # every token of the arg changes the config (but the default)
            if t == "random":
                continue
            assert dumps[",".join(x for x in tokens if x != t)] != dumps[arg], (arg, t)
    # Order, spaces and empty items do not matter: one parsing style for every file.
    if len(args) > 2:
        tokens = args[-1].split(",")
        assert _load(name).get_config(" , ".join(reversed(tokens)) + ",").to_json() == \
            _load(name).get_config(args[-1]).to_json()


@pytest.mark.parametrize("name", sorted(ARGS))
def test_an_unknown_arg_names_the_file_the_arg_and_every_allowed_arg(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    flags, choices = ARGS[name]
    with pytest.raises(ConfigArgError) as e:
        _load(name).get_config(",".join([*flags, "bogus"]))
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)
    assert "\n" not in msg
    assert msg.startswith("unknown config arg 'bogus'"), msg
    assert f" for configs/{name}; allowed: " in msg, msg
    allowed = msg.split("; allowed: ", 1)[1]
    for token in (*flags, *(v for vs in choices.values() for v in vs)):
        assert re.search(rf"\b{re.escape(token)}\b", allowed), (token, msg)
    if not flags and not choices:
        assert allowed == "none (it takes no arg)", msg


def test_two_methods_in_the_arg_is_an_error_listing_the_methods(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigArgError, match=r"^config arg 'el2n,smoke,grand' for "
                       r"configs/cifar10_kd\.py gives two values of method, 'el2n' and 'grand'; "
                       r"allowed: smoke, tfds, and at most one method of: random, el2n, .*ifbeta"):
        _load("cifar10_kd.py").get_config("el2n,smoke,grand")


def test_cifar10_kd_methods_are_the_method_table():
    from kdprune_jax import methods

    assert _load("cifar10_kd.py").METHODS == METHODS
    assert set(METHODS) == set(methods.names())


@pytest.mark.parametrize("name", sorted(ARGS))
def test_config_files_import_only_the_config_helpers_from_the_package(name):
    path = os.path.join(CONFIGS, name)
    text = open(path).read()
    assert "spec_from_file_location" not in text and "importlib.util" not in text, name
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, (name, "relative import")
            mods = [node.module]
        else:
            continue
        for m in mods:
            assert not m.startswith("importlib"), (name, m)
            if m.split(".")[0] == "kdprune_jax":
                assert m == "kdprune_jax.config_helpers", (name, m)


def test_loading_every_config_imports_no_jax_flax_or_numpy():
    code = (
        "import importlib.util, os, sys\n"
        f"root = {CONFIGS!r}\n"
        f"for name in {sorted(ARGS)!r}:\n"
        "    spec = importlib.util.spec_from_file_location('c', os.path.join(root, name))\n"
        "    mod = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(mod)\n"
        "    mod.get_config('')\n"
        "heavy = sorted(m for m in ('jax', 'flax', 'numpy', 'optax') if m in sys.modules)\n"
        "assert not heavy, heavy\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 0, p.stderr[-2000:]


def test_a_bad_study_config_arg_is_one_line_exit_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "kdprune_jax.study", "status",
                        "--config=configs/study/smoke.py:bogus", f"--root={tmp_path / 'r'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert p.stderr.strip() == ("error: unknown config arg 'bogus' for configs/study/smoke.py; "
                                "allowed: none (it takes no arg)"), p.stderr[-2000:]


# ----------------------------------------------------------------------------- the helpers
def test_parse_config_arg_returns_flags_and_choices():
    f = os.path.join(CONFIGS, "x.py")
    a = parse_config_arg("tfds, b ,,tfds", flags=("smoke", "tfds"),
                         choices={"letter": ("a", "b")}, config_file=f)
    assert (a.smoke, a.tfds, a.letter, a.flags) == (False, True, "b", ("tfds",))
    empty = parse_config_arg("", flags=("smoke",), choices={"letter": ("a",)}, config_file=f)
    assert (empty.smoke, empty.letter, empty.flags) == (False, None, ())
    with pytest.raises(AttributeError, match="no flag or choice 'smok'"):
        a.smok  # noqa: B018
    with pytest.raises(AttributeError):
        a.smoke = True
    with pytest.raises(ConfigArgError, match=r"^unknown config args 'c', 'd' in 'a,c,smoke,d' "
                       r"for .*x\.py; allowed: smoke, and at most one letter of: a, b "
                       r"\(comma-separated\)$"):
        parse_config_arg("a,c,smoke,d", flags=("smoke",), choices={"letter": ("a", "b")},
                         config_file=f)
    assert config_helpers.allowed_args(("smoke",)) == "smoke"


def test_the_config_file_defaults_to_the_caller(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigArgError, match=r" for tests/test_configs\.py; allowed: smoke$"):
        parse_config_arg("x", flags=("smoke",))


def test_load_config_module_is_relative_to_the_caller_and_fresh(tmp_path):
    (tmp_path / "a.py").write_text("X = []\n")
    m1 = config_helpers.load_config_module("a.py", relative_to=str(tmp_path / "b.py"))
    m2 = config_helpers.load_config_module("a.py", relative_to=str(tmp_path))
    assert m1.X == [] and m1.X is not m2.X
    base = config_helpers.load_config_module("../configs/base.py")  # next to this file
    assert base.get_config().to_json() == _load("base.py").get_config().to_json()
    with pytest.raises(FileNotFoundError, match=r"nope\.py"):
        config_helpers.load_config_module("nope.py", relative_to=str(tmp_path))
