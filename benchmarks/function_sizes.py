"""List the functions in ``pdd_ray/`` longer than 60 lines or taking more than 8 parameters.

Issue 13's limits for a legible codebase: ``python benchmarks/function_sizes.py`` prints one
line per offender (``path:line name: N lines, M params``) and exits 1 when there is any.
Lines count from the ``def`` to the function's last line, docstring included; parameters
count every named one (``self``/``cls`` excluded, ``*args``/``**kwargs`` included).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_LINES = 60
MAX_PARAMS = 8


def offenders(root: Path) -> list[str]:
    """One line per function over either limit, in file order."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
            n_params = len(names) + (a.vararg is not None) + (a.kwarg is not None)
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            n_lines = node.end_lineno - start + 1
            if n_lines > MAX_LINES or n_params > MAX_PARAMS:
                out.append(f"{path}:{node.lineno} {node.name}: {n_lines} lines, {n_params} params")
    return out


if __name__ == "__main__":
    found = offenders(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "pdd_ray"))
    print("\n".join(found) or "none")
    sys.exit(1 if found else 0)
