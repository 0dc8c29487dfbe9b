"""The library versions this project is tested with, and a cheap check of what is installed.

The ranges are exactly what the version matrix in docs/compatibility.md ran (oldest and newest
tested release of each library; ``make test`` runs the full suite on the newest and the
``compat`` subset on the oldest transformers/peft). pyproject.toml states the same ranges
(a test keeps them equal). Reading installed versions uses package metadata only, so the
check costs milliseconds and imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib.metadata as md

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

#: pip specifiers, one per library (the newest tested minor series is the upper bound).
SUPPORTED: dict[str, str] = {
    "torch": ">=2.11,<2.15",
    "transformers": ">=4.57.6,<5.25",
    "peft": ">=0.18.0,<0.22",
    "accelerate": ">=1.15.0,<1.16",
    "bitsandbytes": ">=0.50.2,<0.51",
}


def installed_version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def check_versions() -> list[tuple[str, str | None, str, bool]]:
    """(package, installed version or None, tested range, inside it) for each supported library."""
    rows = []
    for pkg, spec in SUPPORTED.items():
        got = installed_version(pkg)
        try:
            ok = got is not None and Version(got) in SpecifierSet(spec, prereleases=True)
        except InvalidVersion:
            ok = False
        rows.append((pkg, got, spec, ok))
    return rows


def untested_warning() -> str | None:
    """One line naming every installed library outside its tested range, or None."""
    bad = [f"{pkg} {got or 'missing'} (tested {spec})" for pkg, got, spec, ok in check_versions() if not ok]
    if not bad:
        return None
    return "untested library versions: " + "; ".join(bad) + " - results may differ; see `phi4mm-lora doctor`"
