"""What produced an output: model, adapter, precision and project version, as one dict.

Every scoring output (the ``score`` and ``evaluate`` terminal lines, their JSON, report.md,
the HTTP service) carries this dict, so a number can always be traced back to the weights
that made it. A score from the tiny random model must never be mistaken for a real one, so
the tiny model is named as such.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=1)
def project_version() -> str:
    """The installed phi4mm-lora version (``unknown`` when running from an uninstalled tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("phi4mm-lora")
    except PackageNotFoundError:
        return "unknown"


def _tiny_label(folder: Any) -> str:
    """`` (tiny random test model)`` / `` (tiny pretrained demo base)`` for a tiny model folder, else ``""``."""
    marker = Path(folder) / "phi4mm_lora_tiny.json" if folder is not None else None
    if marker is None or not marker.is_file():
        return ""
    from phi4mm_lora.config import TINY_NAMES

    try:
        base = json.loads(marker.read_text()).get("base", "random")
    except (OSError, ValueError, AttributeError):
        base = "random"
    return f" ({TINY_NAMES.get(base, TINY_NAMES['random'])})"


def provenance(loaded: Any, cfg: Any | None = None) -> dict[str, Any]:
    """``{"model", "model_id", "model_revision", "layout", "adapter", "adapter_mode", "precision", "device",
    "phi4mm_lora_version", "adapter_merged", "merge_note"}`` for a :class:`~phi4mm_lora.model.load.Loaded` model.

    ``cfg`` (the :class:`~phi4mm_lora.config.RunConfig` it was loaded with) adds the hub
    revision and the adapter folder; without it the adapter is taken from the loaded state.
    """
    folder = getattr(loaded, "path", None)
    path = str(folder) if folder is not None else ""
    tiny = _tiny_label(folder)
    adapters = getattr(loaded, "adapters", None)
    plan = getattr(loaded, "plan", None)
    merge = getattr(loaded, "merge", None)
    return {
        "model": path + tiny,
        "model_id": getattr(getattr(cfg, "model", None), "path", None),  # as given: a hub id, a folder, None = tiny
        "model_revision": getattr(getattr(cfg, "model", None), "revision", None),
        "layout": getattr(loaded, "layout", None),
        "adapter": getattr(getattr(cfg, "adapter", None), "init_from", None),
        "adapter_mode": getattr(getattr(cfg, "adapter", None), "mode", None),
        "active_adapters": list(adapters.active) if adapters is not None else None,
        "precision": getattr(plan, "name", None),
        "device": str(getattr(plan, "device", "")) or None,
        "phi4mm_lora_version": project_version(),
        # merged into the weights for inference (model.inference); None: not loaded for inference
        "adapter_merged": merge.merged if merge is not None else None,
        "merge_note": merge.reason if merge is not None else None,
    }


def provenance_line(prov: dict[str, Any]) -> str:
    """One human line, e.g. for the terminal: ``model X; adapter Y (fresh); precision fp32; phi4mm-lora 0.1.0``."""
    adapter = prov.get("adapter") or "none (the checkpoint's own adapters: " + ", ".join(prov.get("active_adapters") or []) + ")"
    mode = f" ({prov['adapter_mode']} mode)" if prov.get("adapter") and prov.get("adapter_mode") else ""
    rev = f"@{prov['model_revision']}" if prov.get("model_revision") else ""
    merged = {True: " (merged)", False: f" (unmerged: {prov.get('merge_note')})"}.get(prov.get("adapter_merged"), "")
    return (f"model {prov.get('model')}{rev}; adapter {adapter}{mode}{merged}; precision {prov.get('precision')} "
            f"on {prov.get('device')}; phi4mm-lora {prov.get('phi4mm_lora_version')}")


__all__ = ["project_version", "provenance", "provenance_line"]
