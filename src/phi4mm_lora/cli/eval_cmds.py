"""Placeholder until this workflow lands."""


def register(subparsers) -> None:
    return None
