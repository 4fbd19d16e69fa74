"""Verdicts from cell rows: paired by seed, decided only when every seed agrees."""

from kdprune_jax import kd_alpha, verdicts


def _row(method, keep, alpha, seed, acc, secs=100.0):
    return {"prune.method": method, "prune.keep_fraction": keep, "kd.alpha": alpha,
            "seed": seed, "teacher": "t", "test_accuracy": acc, "grids": ("table1",),
            "student_seconds": secs, "total_seconds": secs + 5}


def _rows(kd_gain=(0.02, 0.03), el2n_minus_random=(-0.01, -0.02)):
    rows = []
    for seed, (g, d) in enumerate(zip(kd_gain, el2n_minus_random)):
        for keep in (0.1, 0.5):
            rows += [_row("random", keep, 0.0, seed, 0.50 + keep / 10),
                     _row("random", keep, 0.9, seed, 0.50 + keep / 10 + g, secs=100 * keep),
                     _row("el2n", keep, 0.0, seed, 0.50 + keep / 10 + d),
                     _row("el2n", keep, 0.9, seed, 0.50 + keep / 10 + g + d, secs=100 * keep)]
        rows.append(_row("random", 1.0, 0.9, seed, 0.60 + 0.001 * seed))
    return rows


def test_every_seed_agreeing_decides_and_disagreement_is_inconclusive():
    rows = _rows()
    assert verdicts.a1_kd_helps_every_method(rows)[0] == verdicts.HOLDS
    assert verdicts.a2_random_matches_scores_with_kd(rows)[0] == verdicts.HOLDS
    v, text = verdicts.a1_kd_helps_every_method(_rows(kd_gain=(0.02, -0.01)))
    assert v == verdicts.INCONCLUSIVE and "KD - no KD +0.0050" in text
    assert verdicts.a1_kd_helps_every_method(_rows(kd_gain=(-0.02, -0.01)))[0] == verdicts.FAILS
    assert verdicts.a2_random_matches_scores_with_kd(
        _rows(el2n_minus_random=(0.01, 0.02)))[0] == verdicts.FAILS
    assert verdicts.b2_ifbeta_beats_fixed_rules(rows)[0] == verdicts.NOT_TESTED


def test_a4_reads_the_validation_rule_and_b3_the_full_data_cells():
    up = kd_alpha.fit_rule([{"keep_fraction": k, "alpha": a, "val_accuracy": v}
                            for k, a, v in ((0.1, 0.5, 0.4), (0.1, 0.9, 0.5),
                                            (0.5, 0.5, 0.7), (0.5, 0.9, 0.6))])
    assert verdicts.a4_best_weight_grows_as_fraction_shrinks(up)[0] == verdicts.HOLDS
    down = kd_alpha.fit_rule([{"keep_fraction": k, "alpha": a, "val_accuracy": v}
                              for k, a, v in ((0.1, 0.5, 0.5), (0.1, 0.9, 0.4),
                                              (0.5, 0.5, 0.6), (0.5, 0.9, 0.7))])
    assert verdicts.a4_best_weight_grows_as_fraction_shrinks(down)[0] == verdicts.FAILS
    assert verdicts.a4_best_weight_grows_as_fraction_shrinks(None)[0] == verdicts.NOT_TESTED
    rows = _rows()  # full-data KD ~0.6005; the best pruned KD cell is 0.50 + 0.05 + 0.03
    v, text = verdicts.b3_less_data_beats_full_kd(rows)
    assert v == verdicts.FAILS and "smallest kept fraction" in text
    assert verdicts.smallest_fraction_reaching_full_kd(rows) == {"el2n": None, "random": None}
    rows.append(_row("random", 0.5, 0.9, 0, 0.70))
    rows.append(_row("random", 0.5, 0.9, 1, 0.70))
    table = verdicts.cost_table(rows)
    assert "| random | 15 s (0.15) | 80 s (0.80) | 0.5 |" in table  # 0.5 now reaches full KD
    md = verdicts.markdown(verdicts.all_verdicts(rows, up), n_done=3, n_cells=5, command="c")
    assert md.count("\n| A") == 5 and "| B3 |" in md and "| A3 | not tested |" in md
