"""Command-line entry points (``xapid`` and ``xe``); thin wrappers over the package."""
