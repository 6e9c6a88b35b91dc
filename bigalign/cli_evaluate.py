"""Command line for evaluation (evaluate, evaluate-retrieval, curve). Filled in by issue 4."""

from __future__ import annotations


def add_commands(sub) -> dict:
    """Register subcommands on the argparse ``sub`` parsers; return {name: handler(args)}."""
    return {}
