"""``kd.alpha="auto"``: the KD weight read from a rule fitted on validation accuracy.

A rule file (JSON, written by ``python -m kdprune_jax.study report`` from a KD-weight x
kept-fraction sweep of random subsets, METHOD.md §2 claim A4) holds, per kept fraction of
the sweep, the weight with the best mean VALIDATION accuracy, together with the sweep it
came from:

    {"format": "kdprune_jax.kd_alpha_rule/1", "fitted_on": "val_accuracy",
     "points": [{"keep_fraction": 0.1, "alpha": 0.5}, ...],      # sorted by keep_fraction
     "sweep": [{"keep_fraction": 0.1, "alpha": 0.0, "val_accuracy": 0.41, "runs": 1}, ...],
     "source": {...}}                                             # study, cells, commits

`alpha_for` interpolates linearly in the kept fraction between fitted points and holds the
nearest point's weight outside them (the rule says nothing there; it does not extrapolate).
"auto" is resolved before any stage key is computed (`resolve`): the student's key then
holds the resolved number and the rule file's sha256, never the path.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import ml_collections

from kdprune_jax.errors import ConfigError, DataError

FORMAT = "kdprune_jax.kd_alpha_rule/1"


def _bad(path: str, why: str) -> DataError:
    return DataError(f"kd.alpha_rule={path!r}: {why}; expected a JSON rule file written by "
                     f"`python -m kdprune_jax.study report` (format {FORMAT!r})")


def load_rule(path: str) -> tuple[dict, str]:
    """Read and check a rule file. Returns (rule, sha256 of its bytes).

    Raises DataError (one line naming the file and what is wrong) for a missing, unreadable
    or malformed file."""
    if not path:
        raise ConfigError("kd.alpha_rule", path,
                          "the path of a KD-weight rule file when kd.alpha='auto' (written "
                          "by `python -m kdprune_jax.study report`; see README \"Results\")")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise _bad(path, f"cannot be read ({e.strerror or e})") from None
    try:
        rule = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"is not JSON ({e})") from None
    if not isinstance(rule, dict) or rule.get("format") != FORMAT:
        raise _bad(path, "has no (or another) 'format' field")
    pts = rule.get("points")
    if not isinstance(pts, list) or not pts:
        raise _bad(path, "has no 'points'")
    last = -math.inf
    for p in pts:
        try:
            f, a = float(p["keep_fraction"]), float(p["alpha"])
        except (TypeError, KeyError, ValueError):
            raise _bad(path, f"point {p!r} lacks a numeric keep_fraction and alpha") from None
        if not (0 < f <= 1 and 0 <= a <= 1) or f <= last:
            raise _bad(path, f"point {p!r}: keep_fraction must be in (0, 1], increasing, and "
                             "alpha in [0, 1]")
        last = f
    return rule, hashlib.sha256(raw).hexdigest()


def alpha_for(rule: dict, keep_fraction: float) -> float:
    """The rule's KD weight at `keep_fraction`: linear between fitted kept fractions, the
    nearest fitted weight outside them."""
    pts = [(float(p["keep_fraction"]), float(p["alpha"])) for p in rule["points"]]
    if keep_fraction <= pts[0][0]:
        return pts[0][1]
    for (f0, a0), (f1, a1) in zip(pts, pts[1:]):
        if keep_fraction <= f1:
            return a0 + (a1 - a0) * (keep_fraction - f0) / (f1 - f0)
    return pts[-1][1]


def fit_rule(sweep: list[dict], source: dict | None = None) -> dict:
    """The rule from a sweep of runs, each {"keep_fraction", "alpha", "val_accuracy"}:
    per kept fraction, the weight with the best mean validation accuracy over its runs
    (ties: the smaller weight). Returns the rule dict (`FORMAT`), sweep means included."""
    groups: dict[tuple[float, float], list[float]] = {}
    for r in sweep:
        groups.setdefault((float(r["keep_fraction"]), float(r["alpha"])), []).append(
            float(r["val_accuracy"]))
    if not groups:
        raise ValueError("fit_rule: an empty sweep")
    means = [{"keep_fraction": f, "alpha": a, "val_accuracy": sum(v) / len(v),
              "runs": len(v)} for (f, a), v in sorted(groups.items())]
    points = []
    for f in sorted({m["keep_fraction"] for m in means}):
        at = [m for m in means if m["keep_fraction"] == f]
        best = max(at, key=lambda m: (m["val_accuracy"], -m["alpha"]))
        points.append({"keep_fraction": f, "alpha": best["alpha"]})
    return {"format": FORMAT, "fitted_on": "val_accuracy", "points": points, "sweep": means,
            "outside": "the nearest fitted kept fraction's weight (no extrapolation)",
            "source": source or {}}


def resolve(config):
    """A copy of `config` with ``kd.alpha="auto"`` replaced by the rule's weight at
    ``prune.keep_fraction`` and ``kd.alpha_rule_sha256`` set; any other config is returned
    unchanged (the same object). A non-numeric alpha other than "auto" is refused here."""
    alpha = config.kd.alpha
    if isinstance(alpha, str) and alpha == "auto":
        rule, sha = load_rule(os.path.expanduser(config.kd.get("alpha_rule", "")))
        out = config.copy_and_resolve_references()
        # A new kd section: the resolved number would not fit the str-typed "auto" field.
        out.kd = ml_collections.ConfigDict({
            **out.kd.to_dict(), "alpha_rule_sha256": sha,
            "alpha": round(alpha_for(rule, float(config.prune.keep_fraction)), 6)})
        return out
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ConfigError("kd.alpha", alpha, "a number in [0, 1] or 'auto'")
    return config
