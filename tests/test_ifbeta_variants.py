"""The IF-Beta variant runner on the smoke study's base and the quickstart smoke teacher:
one shared feature pass, each variant's policy learned as the pipeline learns it, V1/V2 at
Beta(1, 1) and at the learned policy; the outer-loss knob changes the objective."""

import math
import os

from kdprune_jax import ifbeta_variants
from kdprune_jax.stages import ifbeta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_variants_share_features_and_report_v2_at_init_and_learned(tmp_path,
                                                                   quickstart_smoke_run):
    wd = quickstart_smoke_run(str(tmp_path / "t"), parts=["teacher"])
    variants = (("default", (("policy.max_steps", 3),)),
                ("outer ce", (("policy.max_steps", 3), ("policy.outer_loss", "ce"))),
                ("diag-Fisher ranks", (("policy.max_steps", 3),
                                       ("ifbeta.influence_solver", "diag_fisher"))))
    logs = []
    rows = ifbeta_variants.run(os.path.join(ROOT, "configs/study/smoke.py"),
                               os.path.join(wd, "teacher"), str(tmp_path / "v"),
                               variants=variants, log=logs.append)
    assert [r["variant"] for r in rows] == ["default", "outer ce", "diag-Fisher ranks"]
    for r in rows:
        assert r["a"] > 0 and r["b"] > 0 and 1 <= r["steps"] <= 3
        assert all(math.isfinite(r[k]) for k in ("v1_init", "v1_learned", "v2_init",
                                                 "v2_learned"))
    # CE on the labels is another objective than the KD-aligned loss.
    assert rows[0]["v1_init"] != rows[1]["v1_init"]
    assert sum("[features]" in ln and "pass" in ln for ln in logs) <= 1  # one feature pass
    md = ifbeta_variants.markdown(rows, teacher={"dir": "t", "step": 1}, command="cmd")
    assert "| outer ce |" in md and "`--config.policy.max_steps=3" in md


def test_outer_loss_default_leaves_the_policy_key_unchanged():
    from tests.test_pipeline import load_config, override

    c = load_config("quickstart.py", "smoke")
    assert "outer_loss" not in ifbeta.policy_key(c.policy)
    ce = override(c, policy__outer_loss="ce")
    assert ifbeta.policy_key(ce.policy)["outer_loss"] == "ce"
