r"""Summarize a test-suite profile (per-test wall and XLA compile seconds) as Markdown.

Record one with the suite's own hook (tests/conftest.py), e.g. the README's test command with

    KDPRUNE_TEST_PROFILE=/tmp/prof.jsonl python -m pytest -q ...

then

    python -m benchmarks.suite_profile /tmp/prof.jsonl --label NAME \
        --out benchmarks/results/suite-profile-NAME.md

`wall_s` includes the test's share of fixture setup (a module fixture is charged to the first
test that uses it); `compile_s` counts this process's backend compilations only (a CLI
subprocess's compilations are inside its wall time, not in this column).
"""

import argparse
import collections
import json


def summarize(rows: list[dict], label: str, top: int = 25) -> str:
    total = sum(r["wall_s"] for r in rows)
    comp = sum(r["compile_s"] for r in rows)
    by_file = collections.defaultdict(float)
    for r in rows:
        by_file[r["test"].split("::")[0]] += r["wall_s"]
    workers = sorted({r.get("worker", "main") for r in rows})
    out = [f"# Suite profile: {label}", "",
           f"{len(rows)} tests; sum of test wall times {total:.0f} s, of which in-process XLA "
           f"compilation {comp:.0f} s; workers: {', '.join(workers)}", "",
           f"## Slowest {top} tests", "",
           "| test | wall s | compile s | compiles | worker |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["wall_s"])[:top]:
        out.append(f"| `{r['test']}` | {r['wall_s']:.1f} | {r['compile_s']:.1f} | "
                   f"{r['compiles']} | {r.get('worker', 'main')} |")
    out += ["", "## By file", "", "| file | wall s |", "|---|---|"]
    for f, s in sorted(by_file.items(), key=lambda kv: -kv[1]):
        out.append(f"| `{f}` | {s:.1f} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("profiles", nargs="+", help="JSON-lines files written by the test hook")
    ap.add_argument("--label", default="suite")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    rows = []
    for p in a.profiles:
        with open(p) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    text = summarize(rows, a.label)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
