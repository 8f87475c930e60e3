"""Per-module mutation score of the last ``mutmut run`` (what ``make mutate`` prints at the end).

    python -m benchmarks.mutation_score            # table: killed / total per module, then the total

Reads the results mutmut keeps in ``mutants/<module>.meta`` for the modules listed in ``[tool.mutmut]
only_mutate`` of pyproject.toml. A mutant counts as killed when a test failed on it; timeouts (the tests hung
or ran far longer than without the mutant) and survivors are listed apart, and mutants that no selected
test executes count as "no tests". Mutants not run (a filtered ``make mutate MUTANTS=...``) are left out.
"""

from __future__ import annotations

import json
import sys
import tomllib
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("killed", "survived", "timeout", "no tests", "suspicious")


def module_counts(root: Path = ROOT) -> dict[str, Counter]:
    """Status counts per mutated module (only mutants that were run)."""
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["mutmut"]
    counts = {}
    for module in config["only_mutate"]:
        meta = root / "mutants" / f"{module}.meta"
        if not meta.is_file():
            continue
        codes = json.loads(meta.read_text())["exit_code_by_key"].values()
        statuses = Counter(status_by_exit_code[c] for c in codes if c is not None)
        if statuses:
            counts[module] = statuses
    return counts


def main() -> int:
    counts = module_counts()
    if not counts:
        print("mutation_score: no mutmut results under mutants/; run `make mutate` first", file=sys.stderr)
        return 2
    width = max(len(m) for m in counts)
    print(f"{'module':<{width}}  {'score':>13}  " + "  ".join(f"{c:>10}" for c in COLUMNS))
    total = Counter()
    for module, c in counts.items():
        total.update(c)
        n = sum(c.values())
        print(f"{module:<{width}}  {c['killed']:>5}/{n:<4} {100 * c['killed'] / n:3.0f}%  "
              + "  ".join(f"{c[k]:>10}" for k in COLUMNS))
    n = sum(total.values())
    print(f"killed {total['killed']}/{n} mutants ({100 * total['killed'] / n:.1f}%); "
          f"{total['timeout']} timed out, {total['survived']} survived, {total['no tests']} without tests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
