"""kd.alpha="auto": a rule fitted on validation accuracy, resolved before any key."""

import json

import pytest

from kdprune_jax import config_checks, kd_alpha
from kdprune_jax.errors import ConfigError, DataError, UserError
from kdprune_jax.stages import student
from tests.test_pipeline import load_config, override

SWEEP = [  # validation accuracies of a small sweep; test accuracies never enter
    {"keep_fraction": 0.1, "alpha": 0.0, "val_accuracy": 0.40},
    {"keep_fraction": 0.1, "alpha": 0.5, "val_accuracy": 0.46},
    {"keep_fraction": 0.1, "alpha": 0.5, "val_accuracy": 0.44},
    {"keep_fraction": 0.1, "alpha": 0.9, "val_accuracy": 0.43},
    {"keep_fraction": 0.5, "alpha": 0.0, "val_accuracy": 0.70},
    {"keep_fraction": 0.5, "alpha": 0.5, "val_accuracy": 0.72},
    {"keep_fraction": 0.5, "alpha": 0.9, "val_accuracy": 0.74},
]


def _rule_file(tmp_path, rule=None):
    path = tmp_path / "kd_alpha_rule.json"
    path.write_text(json.dumps(rule or kd_alpha.fit_rule(SWEEP)))
    return str(path)


def test_fit_picks_the_best_mean_validation_weight_per_kept_fraction():
    rule = kd_alpha.fit_rule(SWEEP)
    assert rule["points"] == [{"keep_fraction": 0.1, "alpha": 0.5},
                              {"keep_fraction": 0.5, "alpha": 0.9}]
    means = {(m["keep_fraction"], m["alpha"]): m for m in rule["sweep"]}
    assert means[(0.1, 0.5)]["runs"] == 2
    assert means[(0.1, 0.5)]["val_accuracy"] == pytest.approx(0.45)
    # Interpolated between fitted fractions, held (not extrapolated) outside them.
    assert kd_alpha.alpha_for(rule, 0.3) == pytest.approx(0.7)
    assert kd_alpha.alpha_for(rule, 0.05) == 0.5
    assert kd_alpha.alpha_for(rule, 1.0) == 0.9


def test_auto_resolves_to_the_fitted_weight_and_keys_the_rule_not_its_path(tmp_path):
    base = load_config("quickstart.py", "smoke")
    path = _rule_file(tmp_path)
    auto = override(base, kd__alpha="auto", kd__alpha_rule=path, prune__keep_fraction=0.3)
    resolved = kd_alpha.resolve(auto)
    assert resolved.kd.alpha == pytest.approx(0.7)
    assert auto.kd.alpha == "auto"  # the caller's config is not changed
    config_checks.validate(auto)
    kd = student.kd_key(resolved)
    assert kd["alpha"] == pytest.approx(0.7) and len(kd["alpha_rule_sha256"]) == 64
    assert "alpha_rule" not in kd
    # The same rule at another path: the same key. A number: the key it always had.
    other = tmp_path / "elsewhere.json"
    other.write_text(open(path).read())
    moved = kd_alpha.resolve(override(auto, kd__alpha_rule=str(other)))
    assert student.kd_key(moved) == kd
    plain = override(base, kd__alpha=0.9)
    assert student.kd_key(plain) == {"alpha": 0.9, "temperature": 4.0}
    assert kd_alpha.resolve(plain) is plain


@pytest.mark.parametrize("content,match", [
    (None, r"kd\.alpha_rule='.*missing\.json': cannot be read"),
    ("{not json", r"is not JSON"),
    (json.dumps({"format": "other"}), r"has no \(or another\) 'format' field"),
    (json.dumps({"format": kd_alpha.FORMAT, "points": []}), r"has no 'points'"),
    (json.dumps({"format": kd_alpha.FORMAT, "points": [{"keep_fraction": 0.5, "alpha": 2}]}),
     r"alpha in \[0, 1\]"),
])
def test_a_missing_or_malformed_rule_is_one_clear_error(tmp_path, content, match):
    path = tmp_path / "missing.json"
    if content is not None:
        path.write_text(content)
    config = override(load_config("quickstart.py", "smoke"), kd__alpha="auto",
                      kd__alpha_rule=str(path))
    with pytest.raises(DataError, match=match) as e:
        config_checks.validate(config)
    assert "\n" not in str(e.value)


def test_auto_without_a_rule_and_a_non_numeric_weight_are_refused():
    base = load_config("quickstart.py", "smoke")
    with pytest.raises(ConfigError, match=r"config\.kd\.alpha_rule=''.*kd\.alpha='auto'"):
        config_checks.validate(override(base, kd__alpha="auto"))
    with pytest.raises(ConfigError, match=r"config\.kd\.alpha='abc'.*a number in \[0, 1\] or "
                                          r"'auto'"):
        config_checks.validate(override(base, kd__alpha="abc"))
    assert issubclass(DataError, UserError)
