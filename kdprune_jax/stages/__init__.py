"""The stages of a run, one module each (DESIGN.md "A run"); `pipeline.run` orders them.

Each stage module exposes ``key(run, ...)`` (what its artifact is keyed on: a fingerprint,
or the metadata dict whose fingerprint it is) beside the function that computes it
(``compute``; ``train`` for proxies; the influence stage's ``influence_scores``, which the
scores stage calls for the influence methods). `cache` owns the artifact-reuse protocol and
`training` what the training stages share. Stages never import each other: values flow
through the pipeline.
"""
