"""Render the single-file pipelines that saved models ship (diffusers' custom-pipeline convention).

A single-file pipeline is the concatenation of the package modules it needs, in dependency order, with their
package-internal imports removed and their external imports merged at the top. The package stays the one home
of every formula; the files in the repository's ``pipelines/`` folder are rendered from it, and a test checks
that they are up to date (``memdistill bundle --check``; ``memdistill bundle --write`` regenerates them).
"""

import argparse
import ast
import os
import sys
from pathlib import Path

from ..pipelines.pipeline_io import SINGLE_FILE_HEADER

PACKAGE_DIR = Path(__file__).resolve().parent.parent

# name -> package modules, in dependency order (each may import only from modules listed before it).
BUNDLES = {
    "pipeline_edm": [
        "scalings",
        "solvers",
        "models/denoiser",
        "schedulers/scheduling_edm_heun",
        "pipelines/pipeline_io",
        "pipelines/pipeline_edm",
    ],
    "pipeline_consistency": [
        "scalings",
        "solvers",
        "models/denoiser",
        "schedulers/scheduling_edm_heun",
        "schedulers/scheduling_consistency",
        "pipelines/pipeline_io",
        "pipelines/pipeline_edm",
        "pipelines/pipeline_consistency",
    ],
}


def _is_internal(node: ast.ImportFrom) -> bool:
    return node.level > 0 or (node.module or "").split(".")[0] == "diffusers_memdistill"


def render(name: str) -> str:
    """The text of the single-file pipeline ``name``."""
    if name not in BUNDLES:
        raise KeyError(f"Unknown single-file pipeline {name!r}; known: {sorted(BUNDLES)}.")
    plain_imports, from_imports, bodies, defined = set(), {}, [], {}
    for module in BUNDLES[name]:
        source = (PACKAGE_DIR / f"{module}.py").read_text(encoding="utf-8")
        tree = ast.parse(source)
        lines = source.splitlines(keepends=True)
        drop = set()
        for index, node in enumerate(tree.body):
            span = range(node.lineno - 1, node.end_lineno)
            is_docstring = index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            if is_docstring:
                drop.update(span)
            elif isinstance(node, ast.Import):
                drop.update(span)
                plain_imports.update(alias.name if alias.asname is None else f"{alias.name} as {alias.asname}"
                                     for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                drop.update(span)
                if not _is_internal(node):
                    names = from_imports.setdefault(node.module, [])
                    for alias in node.names:
                        text = alias.name if alias.asname is None else f"{alias.name} as {alias.asname}"
                        if text not in names:
                            names.append(text)
            else:
                for target in _defined_names(node):
                    if target in defined:
                        raise ValueError(f"{target!r} is defined in both {defined[target]} and {module}.")
                    defined[target] = module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _is_internal(node) and node not in tree.body:
                raise ValueError(f"{module}.py imports package code inside a function: it cannot be bundled.")
        body = "".join(line for i, line in enumerate(lines) if i not in drop).strip("\n")
        bodies.append(f"# {'-' * 20} diffusers_memdistill/{module}.py {'-' * 20}\n\n\n{body}\n")
    header = (
        f"{SINGLE_FILE_HEADER} from its modules {', '.join(BUNDLES[name])}.\n"
        "# Do not edit: change the package and run `memdistill bundle --write`.\n"
        f'"""Self-contained `{name}` of diffusers_memdistill, loadable with\n'
        '`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` where the package is not installed."""\n'
    )
    imports = [f"import {name_}" for name_ in sorted(plain_imports)]
    imports += [f"from {mod} import {', '.join(names)}" for mod, names in sorted(from_imports.items())]
    return header + "\n" + "\n".join(imports) + "\n\n\n" + "\n\n\n".join(bodies)


def _defined_names(node):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [t.id for t in targets if isinstance(t, ast.Name)]
    return []


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="pipelines", help="Folder of the single-file pipelines.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="(Re)write the files (the default).")
    mode.add_argument("--check", action="store_true", help="Exit with 1 if a file is missing or out of date.")


def main(args) -> int:
    stale = []
    for name in BUNDLES:
        path = os.path.join(args.output_dir, name + ".py")
        text = render(name)
        current = Path(path).read_text(encoding="utf-8") if os.path.isfile(path) else None
        if current == text:
            continue
        if args.check:
            stale.append(path)
        else:
            os.makedirs(args.output_dir, exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print("out of date: " + ", ".join(stale) + " (run `memdistill bundle --write`)", file=sys.stderr)
        return 1
    return 0
