"""Verdicts on the papers' claims (METHOD.md) from a study's finished cells.

Pure functions over the rows `study report` builds (one dict per finished cell: the varied
fields, e.g. "prune.method", "prune.keep_fraction", "kd.alpha", "seed", plus
"test_accuracy", "val_accuracy" and "grids", the grids the cell belongs to). Each verdict
is "holds", "does not hold", "inconclusive at this scale" or "not tested", with the numbers
that decide it.

The rule is the same for every claim that compares two arms (our choice, stated in the
README): differences are PAIRED by seed (same subset seed, same kept fraction, same KD
weight unless the claim varies it); a comparison is decided only when every seed agrees on
its sign. With 2-3 seeds this is a strict test; a comparison whose seeds disagree is
"inconclusive at this scale", never counted for or against.
"""

from __future__ import annotations

import statistics

HOLDS, FAILS, INCONCLUSIVE, NOT_TESTED = ("holds", "does not hold",
                                          "inconclusive at this scale", "not tested")
KD_ALPHA = 0.9  # the KD arm of Table 1 (METHOD.md §2)


def _key(r: dict, drop: tuple[str, ...]) -> tuple:
    return tuple(sorted((k, v) for k, v in r.items() if k.startswith(("prune.", "kd.",
                                                                     "teacher", "seed",
                                                                     "student."))
                        and k not in drop))


def paired(rows, arm_a: dict, arm_b: dict, match_on_drop: tuple[str, ...]) -> list[float]:
    """Per-seed differences a - b of test accuracy between cells matching `arm_a` and
    `arm_b` (dicts of field -> value) that agree on every other field except those in
    `match_on_drop`."""
    def pick(arm):
        return {_key(r, match_on_drop): r for r in rows
                if all(r.get(f) == v for f, v in arm.items())}

    a, b = pick(arm_a), pick(arm_b)
    return [a[k]["test_accuracy"] - b[k]["test_accuracy"] for k in sorted(a) if k in b]


def _sign(diffs: list[float]) -> int:
    """+1 when every paired difference is > 0, -1 when every one is < 0, else 0."""
    if diffs and all(d > 0 for d in diffs):
        return 1
    if diffs and all(d < 0 for d in diffs):
        return -1
    return 0


def _fmt(diffs: list[float]) -> str:
    m = statistics.fmean(diffs)
    s = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return f"{m:+.4f} ± {s:.4f} (n={len(diffs)})"


def _table1(rows):
    return [r for r in rows if "table1" in r.get("grids", ())]


def a1_kd_helps_every_method(rows) -> tuple[str, str]:
    """A1: KD (alpha 0.9) beats no KD (alpha 0) for every method at every kept fraction."""
    t1 = _table1(rows)
    comps, lines = [], []
    for m in sorted({r["prune.method"] for r in t1}):
        for k in sorted({r["prune.keep_fraction"] for r in t1 if r["prune.method"] == m}):
            d = paired(t1, {"prune.method": m, "prune.keep_fraction": k, "kd.alpha": KD_ALPHA},
                       {"prune.method": m, "prune.keep_fraction": k, "kd.alpha": 0.0},
                       ("kd.alpha",))
            if d:
                comps.append(_sign(d))
                lines.append(f"{m} keep {k}: KD - no KD {_fmt(d)}")
    if not comps:
        return NOT_TESTED, "no (method, kept fraction) has finished cells with and without KD"
    return _decide(comps), "; ".join(lines)


def _decide(comps: list[int]) -> str:
    """Fails if any comparison fails in every seed, holds if every one holds in every seed."""
    if any(c < 0 for c in comps):
        return FAILS
    return HOLDS if all(c > 0 for c in comps) else INCONCLUSIVE


def _method_vs_others(rows, method: str, none: str) -> tuple[str, str]:
    """`method` against every other method at each kept fraction, KD cells of Table 1."""
    t1 = [r for r in _table1(rows) if r.get("kd.alpha") == KD_ALPHA]
    comps, lines = [], []
    for m in sorted({r["prune.method"] for r in t1} - {method}):
        for k in sorted({r["prune.keep_fraction"] for r in t1 if r["prune.method"] == m}):
            d = paired(t1, {"prune.method": method, "prune.keep_fraction": k},
                       {"prune.method": m, "prune.keep_fraction": k}, ("prune.method",))
            if d:
                comps.append(_sign(d))
                lines.append(f"keep {k}: {method} - {m} {_fmt(d)}")
    if not comps:
        return NOT_TESTED, none
    return _decide(comps), "; ".join(lines)


def a2_random_matches_scores_with_kd(rows) -> tuple[str, str]:
    """A2: with KD, random matches or beats every score-based method at every fraction. It
    fails where a method beats random in every seed; it holds where, at every (method,
    fraction), random beats it in every seed."""
    return _method_vs_others(rows, "random",
                             "no score-based method has finished KD cells beside random")


def a4_best_weight_grows_as_fraction_shrinks(rule: dict | None) -> tuple[str, str]:
    """A4 from the validation-fitted rule (kd_alpha.fit_rule): the best weight per kept
    fraction must not decrease as the fraction shrinks, and must change somewhere."""
    if not rule or len(rule.get("points", [])) < 2:
        return NOT_TESTED, "fewer than two kept fractions with a finished KD-weight sweep"
    pts = rule["points"]  # sorted by keep_fraction, increasing
    text = ", ".join(f"keep {p['keep_fraction']}: {p['alpha']}" for p in pts)
    runs = min(m["runs"] for m in rule["sweep"])
    alphas = [p["alpha"] for p in pts]
    if any(a1 > a0 for a0, a1 in zip(alphas, alphas[1:])):
        return FAILS, f"best weight on validation ({runs} seed(s)): {text}"
    if len(set(alphas)) == 1:
        return INCONCLUSIVE, f"the same best weight at every kept fraction: {text}"
    return HOLDS, f"best weight on validation ({runs} seed(s)): {text}"


def b2_ifbeta_beats_fixed_rules(rows) -> tuple[str, str]:
    """B2: IF-Beta (with KD) beats every other selection at every kept fraction."""
    if not any(r["prune.method"] == "ifbeta" and r.get("kd.alpha") == KD_ALPHA
               for r in _table1(rows)):
        return NOT_TESTED, "no finished IF-Beta cell"
    return _method_vs_others(rows, "ifbeta",
                             "no other method beside IF-Beta at the same kept fraction")


def full_data_kd(rows) -> list[float]:
    """Test accuracies of the full-data KD cells (keep 1.0, alpha 0.9, Table 1's epochs)."""
    return [r["test_accuracy"] for r in _table1(rows)
            if r.get("prune.keep_fraction") == 1.0 and r.get("kd.alpha") == KD_ALPHA]


def smallest_fraction_reaching_full_kd(rows) -> dict[str, float | None]:
    """Per method: the smallest kept fraction whose KD cells' mean test accuracy is within
    the full-data KD cells' spread (>= their mean minus their std), None if none is."""
    full = full_data_kd(rows)
    if not full:
        return {}
    bar = statistics.fmean(full) - (statistics.stdev(full) if len(full) > 1 else 0.0)
    t1 = [r for r in _table1(rows) if r.get("kd.alpha") == KD_ALPHA
          and r.get("prune.keep_fraction", 1.0) < 1.0]
    out = {}
    for m in sorted({r["prune.method"] for r in t1}):
        ok = [k for k in sorted({r["prune.keep_fraction"] for r in t1 if r["prune.method"] == m})
              if statistics.fmean(r["test_accuracy"] for r in t1 if r["prune.method"] == m
                                  and r["prune.keep_fraction"] == k) >= bar]
        out[m] = ok[0] if ok else None
    return out


def b3_less_data_beats_full_kd(rows) -> tuple[str, str]:
    """B3: some student trained with KD on a pruned subset (less data, fewer steps) beats
    the full-data KD student in every seed pairing (full-data cells paired by seed)."""
    full = {r["seed"]: r["test_accuracy"] for r in _table1(rows)
            if r.get("prune.keep_fraction") == 1.0 and r.get("kd.alpha") == KD_ALPHA}
    if not full:
        return NOT_TESTED, "no finished full-data KD cell"
    best, lines = None, []
    t1 = [r for r in _table1(rows) if r.get("kd.alpha") == KD_ALPHA
          and r.get("prune.keep_fraction", 1.0) < 1.0]
    for m in sorted({r["prune.method"] for r in t1}):
        for k in sorted({r["prune.keep_fraction"] for r in t1 if r["prune.method"] == m}):
            d = [r["test_accuracy"] - full[r["seed"]] for r in t1
                 if r["prune.method"] == m and r["prune.keep_fraction"] == k
                 and r["seed"] in full]
            if d:
                s = _sign(d)
                lines.append(f"{m} keep {k} - full KD {_fmt(d)}")
                best = s if best is None else max(best, s)
    if best is None:
        return NOT_TESTED, "no pruned KD cell shares a seed with a full-data KD cell"
    smallest = smallest_fraction_reaching_full_kd(rows)
    tail = "; smallest kept fraction within the full-KD spread: " + ", ".join(
        f"{m} {k}" for m, k in smallest.items())
    verdict = HOLDS if best > 0 else FAILS if best < 0 else INCONCLUSIVE
    return verdict, "; ".join(lines) + tail


def all_verdicts(rows, rule: dict | None) -> list[tuple[str, str, str]]:
    """[(claim, verdict, evidence)] for every claim of METHOD.md, in order."""
    return [
        ("A1", *a1_kd_helps_every_method(rows)),
        ("A2", *a2_random_matches_scores_with_kd(rows)),
        ("A3", NOT_TESTED, "needs ImageNet (KD on a random 50% vs the full data); this "
                           "study is CIFAR-10"),
        ("A4", *a4_best_weight_grows_as_fraction_shrinks(rule)),
        ("A5", NOT_TESTED, "needs teachers of three sizes (not in this study's grid yet)"),
        ("B1", NOT_TESTED, "needs influence against retraining at network scale; the "
                           "convex-head check is in tests/test_scoring.py"),
        ("B2", *b2_ifbeta_beats_fixed_rules(rows)),
        ("B3", *b3_less_data_beats_full_kd(rows)),
    ]


def cost_table(rows) -> str:
    """Table 3's cost view: per method at KD weight 0.9, the mean pruning + student seconds
    per kept fraction, also in full-data-KD student runs (Table 1's epochs), and the
    smallest kept fraction whose KD student reaches full-data KD within its spread."""
    full = [r for r in _table1(rows) if r.get("prune.keep_fraction") == 1.0
            and r.get("kd.alpha") == KD_ALPHA]
    if not full:
        return "No finished full-data KD cell yet: no cost table.\n"
    ref = statistics.fmean(r["student_seconds"] for r in full)
    smallest = smallest_fraction_reaching_full_kd(rows)
    t1 = [r for r in _table1(rows) if r.get("kd.alpha") == KD_ALPHA
          and r.get("prune.keep_fraction", 1.0) < 1.0]
    keeps = sorted({r["prune.keep_fraction"] for r in t1})
    out = [f"Full-data KD student: {ref:.0f} s (mean of {len(full)}). Cells: total seconds "
           "(pruning + student) and, in brackets, that in full-data-KD runs.\n",
           "| method | " + " | ".join(f"keep {k}" for k in keeps)
           + " | smallest kept fraction within the full-KD spread |",
           "|---|" + "---|" * (len(keeps) + 1)]
    for m in sorted({r["prune.method"] for r in t1}):
        cells = []
        for k in keeps:
            rs = [r["total_seconds"] for r in t1 if r["prune.method"] == m
                  and r["prune.keep_fraction"] == k]
            cells.append(f"{statistics.fmean(rs):.0f} s ({statistics.fmean(rs) / ref:.2f})"
                         if rs else "")
        out.append(f"| {m} | " + " | ".join(cells) + f" | {smallest.get(m) or 'none'} |")
    return "\n".join(out) + "\n"


def markdown(verdicts, *, n_done: int, n_cells: int, command: str) -> str:
    """verdicts.md: one row per claim."""
    out = ["# Verdicts\n",
           f"From {n_done} of {n_cells} finished cells; generated by `{command}`. A "
           "comparison is decided only when every seed's paired difference has the same "
           "sign (kdprune_jax/verdicts.py).\n",
           "| claim | verdict | evidence (test accuracy differences, mean ± std over "
           "seeds) |", "|---|---|---|"]
    for claim, verdict, evidence in verdicts:
        out.append(f"| {claim} | {verdict} | {evidence} |")
    return "\n".join(out) + "\n"
