"""Placeholder: commands are being written."""


def register(app) -> None:
    """Add eval, caption, compare and demo to the root app."""
