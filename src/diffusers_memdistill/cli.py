"""The ``memdistill`` command line.

Each sub-command is a module (or ``module:Object``) exposing ``add_arguments(parser)`` and ``main(args) -> int``;
it is imported only when its sub-command runs, so ``memdistill --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "demo": (
        "diffusers_memdistill.demo",
        "Train a memorizing teacher on the built-in digits, distil a consistency and a DMD student, audit all three "
        "(CPU, minutes).",
    ),
    "evaluate": (
        "diffusers_memdistill.evaluation.command",
        "Sample saved models with shared seeds and measure quality and memorization (text-to-image models prompt by "
        "prompt); writes metrics.json and report.md.",
    ),
    "theory": (
        "diffusers_memdistill.analysis.theory_cli",
        "Reproduce the random-feature analysis of consistency distillation (spectra, leakage, per-mode responses).",
    ),
    "dmd-toys": (
        "diffusers_memdistill.analysis.dmd_toys",
        "Reproduce the low-dimensional DMD copying study (chessboard, moons, Gaussian ring): teacher, DMD student, ΔE, figures.",
    ),
    "dmd-sweep": (
        "diffusers_memdistill.analysis.dmd_sweep",
        "DMD students of one teacher at several training lengths (003 §4.2.2): ΔE, δ(z)–D(z), memorization, figures.",
    ),
    "matched-quality": (
        "diffusers_memdistill.analysis.matched_quality_cli",
        "Teacher, CD, DMD, PD and the +refine controls on the digits, audited together; per method the checkpoint of "
        "the teacher's quality (000 Tables 1 and 4, App. A): table, memorization vs quality and during distillation.",
    ),
    "push": (
        "diffusers_memdistill.hub:PushCommand",
        "Audit a saved model for memorization, then upload it with its model card, figures and metrics to the "
        "Hugging Face Hub in one commit (--dry_run writes the folder instead; --metrics uses an earlier audit).",
    ),
    "card": (
        "diffusers_memdistill.hub:CardCommand",
        "Write the model card of a saved model from its training records and the metrics.json of memdistill evaluate.",
    ),
    "bundle": (
        "diffusers_memdistill.utils.bundle",
        "Write or check the single-file pipelines in pipelines/ that saved models ship for trust_remote_code loading.",
    ),
}


def _load(target: str):
    module_name, _, attribute = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attribute) if attribute else module


def build_parser(load_modules: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memdistill",
        description="Distil diffusion models into few-step students and measure what they memorize.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if load_modules:
            _load(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Only the chosen sub-command's module is imported.
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in SUBCOMMANDS:
        parser = build_parser(load_modules=False)
        if not argv or command is None:
            parser.print_help()
            return 0 if any(a in ("-h", "--help") for a in argv) or not argv else 2
        parser.parse_args(argv)  # prints the usage error and exits with 2
        return 2
    module = _load(SUBCOMMANDS[command][0])
    parser = argparse.ArgumentParser(prog="memdistill")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser(command, help=SUBCOMMANDS[command][1], description=SUBCOMMANDS[command][1])
    module.add_arguments(p)
    args = parser.parse_args(argv)
    return int(module.main(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
