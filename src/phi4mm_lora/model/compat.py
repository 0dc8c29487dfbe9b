"""The few names that differ across the supported transformers releases (docs/compatibility.md).

Everything else the project uses has the same name and behaviour from the oldest to the
newest supported release; this module is the one place that knows otherwise.
"""

from __future__ import annotations

try:  # transformers >= 5.x with the torchvision backend classes
    from transformers import Phi4MultimodalImageProcessor
except ImportError:  # transformers 5.0-5.x: only the "fast" (torchvision) image processor exists
    from transformers import Phi4MultimodalImageProcessorFast as Phi4MultimodalImageProcessor

__all__ = ["Phi4MultimodalImageProcessor"]
