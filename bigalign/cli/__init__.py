"""The command line: one module per command group; parses, calls bigalign.commands,
prints. ``app`` holds the parser, the shared options and fit/apply/info/status.
"""

from .app import add_storage_option, build_parser, main, storage_options  # noqa: F401

__all__ = ["main", "build_parser", "storage_options", "add_storage_option"]
