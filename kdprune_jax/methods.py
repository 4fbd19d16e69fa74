"""The table of pruning methods: one entry per method, the one place a method is defined.

Each `Method` says which end of its score is KEPT (METHOD.md §3), what it reads (teacher
logits/features, proxies, influence), the config fields that key its scores, and its score
function. `config_checks`, the score stage, selection and the README's method table read
this table; adding a method is one `register` call plus its score function::

    def my_scores(inputs):                       # -> float32 [N_train]
        return np.asarray(scoring.margin_from_logits(inputs.teacher_logits))

    methods.register(methods.Method("my_margin", keep="lowest", teacher_pass=True,
                                    score=my_scores, doc="teacher margin, my way"))

Score functions take a `ScoreInputs` (what the stage computed for them) and return one
score per train example (indexed by source position). The table imports only leaves
(`scoring`), so it never imports the stages that read it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from kdprune_jax import scoring

KEEPS = ("highest", "lowest", "middle", "-")
INFLUENCE_SCOPES = ("full", "last_layer", "head")
# The influence stage's solvers: the library's inverse-HVP solvers, plus K-FAC / EK-FAC
# (factors fitted once per model and data, scopes last_layer and full).
KFAC_SOLVERS = ("kfac", "ekfac")
INFLUENCE_STAGE_SOLVERS = (*scoring.INFLUENCE_SOLVERS, *KFAC_SOLVERS)


@dataclasses.dataclass
class ScoreInputs:
    """What the score stage hands a method's score function.

    teacher_logits / teacher_features: float32 [N_train, C] / [N_train, D] when the method
      has ``teacher_pass`` (else None). proxies: the trained proxy models (`inference`
      bundles) with their train results, when the method uses proxies. labels: int [N_train]
      (after label noise). The callables run the stage's sharded passes: `logits_and_features(
      model)` -> ([N, C], [N, D]); `grand(model)` -> [N]; `influence()` -> [N]."""

    config: object
    labels: np.ndarray
    num_classes: int
    teacher_logits: np.ndarray | None
    teacher_features: np.ndarray | None
    proxies: list
    logits_and_features: Callable
    grand: Callable
    influence: Callable


@dataclasses.dataclass(frozen=True)
class Method:
    """One pruning method.

    keep: which end of the score is kept ("highest", "lowest", "middle"; "-" for random).
    teacher_pass: the stage computes teacher logits and features for it.
    teacher: it reads the teacher (beyond KD): True, False, or a function of the config.
    proxies: "multi" (proxy.num_models proxies, averaged), "one" (one proxy run), None, or
      a function of the config returning one of those.
    influence: its scores depend on config.influence (and the seed).
    key_fields: extra {key name: dotted config field} entering its score key.
    score: ScoreInputs -> scores [N_train]; None for methods without a score file (random,
      ifbeta).
    track_forgetting: its proxy run tracks forgetting events.
    """

    name: str
    keep: str
    doc: str = ""
    teacher_pass: bool = False
    teacher: bool | Callable = False
    proxies: str | None | Callable = None
    influence: bool = False
    key_fields: tuple = ()
    score: Callable | None = None
    track_forgetting: bool = False
    scored: bool = True  # has a scores file (random and ifbeta do not)

    def needs_teacher(self, config) -> bool:
        return self.teacher(config) if callable(self.teacher) else bool(self.teacher)

    def proxy_mode(self, config) -> str | None:
        return self.proxies(config) if callable(self.proxies) else self.proxies


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add (or replace) a method in the table; returns it."""
    if method.keep not in KEEPS:
        raise ValueError(f"method {method.name!r}: keep={method.keep!r}; allowed: "
                         f"{', '.join(KEEPS)}")
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    return METHODS[name]


def names() -> tuple[str, ...]:
    """Every method name, read at call time (methods registered later included)."""
    return tuple(METHODS)


def scored_names() -> tuple[str, ...]:
    return tuple(n for n, m in METHODS.items() if m.scored)


# ----------------------------------------------------------------------------- the table
def _from_teacher_logits(fn):
    def score(x: ScoreInputs):
        return np.asarray(fn(x))
    return score


def _proxy_mean(per_proxy):
    def score(x: ScoreInputs):
        return np.mean(np.stack([np.asarray(per_proxy(x, m)) for m, _ in x.proxies]), axis=0)
    return score


def _el2n(x, model):
    lg, _ = x.logits_and_features(model)
    return scoring.el2n_from_logits(lg, x.labels)


def _grand_last_layer(x, model):
    lg, ft = x.logits_and_features(model)
    return scoring.grand_last_layer_from_features(ft, lg, x.labels)


def _influence_teacher(config) -> bool:
    i = config.influence
    return i.scope == "head" or i.model == "teacher" or i.loss == "kd"


def _influence_proxies(config) -> str | None:
    i = config.influence
    return "one" if i.scope != "head" and i.model == "proxy" else None


for _m in (
    Method("random", "-", "uniform within each class", scored=False),
    Method("el2n", "highest", "norm of softmax minus one-hot, over proxies", proxies="multi",
           score=_proxy_mean(_el2n)),
    Method("teacher_el2n", "highest", "EL2N of the teacher", teacher_pass=True, teacher=True,
           score=_from_teacher_logits(
               lambda x: scoring.el2n_from_logits(x.teacher_logits, x.labels))),
    Method("grand", "highest", "per-example gradient norm over all proxy parameters",
           proxies="multi", key_fields=(("grand_chunk", "score.grand_chunk_size"),),
           score=_proxy_mean(lambda x, m: x.grand(m))),
    Method("grand_last_layer", "highest", "closed-form GraNd of the proxies' head",
           proxies="multi", score=_proxy_mean(_grand_last_layer)),
    Method("forgetting", "highest", "correct -> incorrect transitions in one proxy run",
           proxies="one", track_forgetting=True,
           score=lambda x: np.asarray(scoring.forgetting_scores(x.proxies[0][1]))),
    Method("entropy", "highest", "teacher's predictive entropy", teacher_pass=True,
           teacher=True,
           score=_from_teacher_logits(lambda x: scoring.entropy_from_logits(x.teacher_logits))),
    Method("margin", "lowest", "teacher's top-2 margin", teacher_pass=True, teacher=True,
           score=_from_teacher_logits(lambda x: scoring.margin_from_logits(x.teacher_logits))),
    Method("moderate", "middle", "distance of the teacher feature to its class median",
           teacher_pass=True, teacher=True,
           score=lambda x: scoring.moderate_scores(x.teacher_features, x.labels,
                                                   x.num_classes)),
    Method("influence", "highest", "grad L_V^T H^-1 grad l_i, positive = helpful",
           teacher_pass=True, teacher=_influence_teacher, proxies=_influence_proxies,
           influence=True, score=lambda x: x.influence()),
    Method("self_influence", "highest", "grad l_i^T H^-1 grad l_i", teacher_pass=True,
           teacher=_influence_teacher, proxies=_influence_proxies, influence=True,
           score=lambda x: x.influence()),
    Method("ifbeta", "-", "learned Beta(a, b) policy over influence ranks (our "
           "reconstruction)", teacher=True, scored=False),
):
    register(_m)


def needs_teacher(config) -> bool:
    """Whether the method reads the teacher (KD aside)."""
    return get(config.prune.method).needs_teacher(config)


def needs_proxies(config) -> bool:
    return get(config.prune.method).proxy_mode(config) is not None


# Fields added to config.influence after score files were first written, with their
# defaults: they enter the score key only when they differ, so existing files stay valid.
_INFLUENCE_FIELDS_SINCE = {"kfac_fisher": "true", "kfac_damping_mode": "absolute"}
# Memory knobs: the scores do not depend on them (beyond float rounding), so not keyed.
_INFLUENCE_UNKEYED = ("kfac_chunk_size",)


def influence_key(i) -> dict:
    """config.influence as the influence scores depend on it."""
    d = i.to_dict()
    for k, default in _INFLUENCE_FIELDS_SINCE.items():
        if d.get(k) == default:
            d.pop(k)
    for k in _INFLUENCE_UNKEYED:
        d.pop(k, None)
    return d


def score_params(config) -> dict:
    """The config fields a method's scores depend on (its score key; recorded in the
    score metadata)."""
    m = get(config.prune.method)
    out = {"method": m.name, "data_eval": [config.data.augment, config.data.image_size,
                                           list(config.data.mean), list(config.data.std)]}
    mode = m.proxy_mode(config)
    if mode is not None:
        out["proxy"] = config.proxy.to_dict()
        if mode != "multi":  # forgetting / influence train exactly one proxy
            del out["proxy"]["num_models"]
        out["student"] = [config.student.model, config.student.width,
                          config.student.optim.to_dict()]
        out["seed"] = config.seed  # proxies are seeded from it
    if m.influence:
        out["influence"] = influence_key(config.influence)
        out["seed"] = config.seed  # scope full: the Hessian's examples are drawn with it
    for key, field in m.key_fields:
        node = config
        for part in field.split("."):
            node = node[part]
        out[key] = node
    return out
