"""The stages of a run, one module each (DESIGN.md "A run"); `pipeline.run` orders them.

Each stage module exposes ``key(run, ...)`` (what its artifact is keyed on) beside
``compute(run, ...)``; `cache` owns the artifact-reuse protocol and `training` what the
training stages share. Stages never import each other: values flow through the pipeline.
"""
