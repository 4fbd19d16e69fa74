"""The package's imports form no cycle (function-level imports included), they point one
way (leaves <- inference / context <- stages <- pipeline <- main / study), and the method
table and the config checks never import the stages that read them."""

import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kdprune_jax")


def _graph() -> dict[str, set[str]]:
    mods = {}
    for dp, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dp, f), os.path.dirname(PKG))[:-3]
                name = rel.replace(os.sep, ".").removesuffix(".__init__")
                mods[name] = os.path.join(dp, f)
    graph = {}
    for name, path in mods.items():
        out = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kdprune_jax"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    out.add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name.startswith("kdprune_jax")}
        graph[name] = {d for d in out if d in mods and d != name}
    return graph


def _related(a: str, b: str) -> bool:  # a package and its own submodules
    return a.startswith(b + ".") or b.startswith(a + ".")


def test_no_import_cycle():
    graph = _graph()
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], {start}
        while stack:
            node, path = stack.pop()
            for d in graph[node]:
                if d == start:
                    cycles.append(path)
                elif d not in seen and not _related(start, d):
                    seen.add(d)
                    stack.append((d, path + [d]))
    assert not cycles, cycles


STAGE_INFRA = {"kdprune_jax.stages", "kdprune_jax.stages.cache", "kdprune_jax.stages.training"}
ABOVE_STAGES = {"kdprune_jax.pipeline", "kdprune_jax.main", "kdprune_jax.study",
                "kdprune_jax.ifbeta_variants"}


def _stages(graph) -> set[str]:
    return {m for m in graph if m.startswith("kdprune_jax.stages.")} - STAGE_INFRA


def test_the_method_table_and_the_checks_import_no_stage():
    graph = _graph()
    above = _stages(graph) | STAGE_INFRA | ABOVE_STAGES
    for name in ("kdprune_jax.methods", "kdprune_jax.config_checks"):
        assert not graph[name] & above, (name, graph[name] & above)


def test_imports_point_one_way():
    """leaves <- inference / context <- stages <- pipeline <- main / study: no stage imports
    another stage (only the shared cache protocol and training helpers), nothing below the
    stages imports a stage or the orchestration, and the stages import nothing above them."""
    graph = _graph()
    stages = _stages(graph)
    assert {"kdprune_jax.stages.teacher", "kdprune_jax.stages.proxies",
            "kdprune_jax.stages.scores", "kdprune_jax.stages.influence",
            "kdprune_jax.stages.select", "kdprune_jax.stages.ifbeta",
            "kdprune_jax.stages.features", "kdprune_jax.stages.teacher_views",
            "kdprune_jax.stages.student", "kdprune_jax.stages.evaluate"} <= stages, stages
    for name in stages:
        assert not graph[name] & (stages | ABOVE_STAGES), (name, graph[name] & stages)
    for name in STAGE_INFRA:
        assert not graph[name] & (stages | ABOVE_STAGES), (name, graph[name])
    below = set(graph) - stages - STAGE_INFRA - ABOVE_STAGES
    for name in below:
        assert not graph[name] & (stages | STAGE_INFRA | ABOVE_STAGES), (name, graph[name])
    # The orchestration reaches the stages; main only the orchestration.
    assert stages <= graph["kdprune_jax.pipeline"] | {"kdprune_jax.stages.cache"}
    assert "kdprune_jax.pipeline" in graph["kdprune_jax.main"]


def test_the_readme_method_table_is_the_method_table():
    """Every method of the table is in the README's "Pruning methods" table with its kept
    end ("uniform ..." for random's "-"), and the README lists no other."""
    import re

    from kdprune_jax import methods

    text = open(os.path.join(os.path.dirname(PKG), "README.md")).read()
    section = text.split("### Pruning methods", 1)[1].split("\n\n`prune.rule", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`"):
            names = re.findall(r"`(\w+)`", cells[0])
            ends = [e.strip() for e in cells[-1].split("/")]
            ends = ends if len(ends) == len(names) else ends * len(names)
            rows.update(zip(names, ends))
    want = {n: m.keep for n, m in methods.METHODS.items() if n != "ifbeta"}
    assert set(rows) == set(want), set(rows) ^ set(want)
    for name, keep in want.items():
        assert rows[name].startswith("uniform" if keep == "-" else keep), (name, rows[name])
