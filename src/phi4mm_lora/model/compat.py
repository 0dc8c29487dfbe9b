"""The few names that differ across the supported transformers releases (docs/compatibility.md).

Everything else the project uses has the same name and behaviour from the oldest to the
newest supported release; this module is the one place that knows otherwise.
"""

from __future__ import annotations

try:  # transformers >= 5.x with the torchvision backend classes
    from transformers import Phi4MultimodalImageProcessor
except ImportError:  # transformers 5.0-5.x: only the "fast" (torchvision) image processor exists
    from transformers import Phi4MultimodalImageProcessorFast as Phi4MultimodalImageProcessor



def rope_kwargs(rope: dict) -> dict:
    """Config keyword arguments for a rope setting ``{"rope_type", "rope_theta", "partial_rotary_factor",
    ...factors}``: one ``rope_parameters`` dict on transformers 5.x, top-level keys on 4.x.

    5.0 overwrites the dict's partial_rotary_factor with a top-level one that defaults to 1.0
    (then the longrope factors have the wrong length), so 5.x also gets it at the top level.
    """
    import inspect

    from transformers import Phi4MultimodalConfig

    if "rope_parameters" in inspect.signature(Phi4MultimodalConfig.__init__).parameters:
        return {"rope_parameters": dict(rope), "partial_rotary_factor": rope.get("partial_rotary_factor", 1.0)}
    rest = dict(rope)
    theta, partial = rest.pop("rope_theta", 10000.0), rest.pop("partial_rotary_factor", 1.0)
    return {"rope_theta": theta, "partial_rotary_factor": partial,
            "rope_scaling": {"type": rest.pop("rope_type", "longrope"), **rest}}


def fast_tokenizer_class():
    """The tokenizer class Phi4MultimodalProcessor accepts: any fast tokenizer on 5.x, GPT2's on 4.x."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return transformers.PreTrainedTokenizerFast
    return transformers.GPT2TokenizerFast


__all__ = ["Phi4MultimodalImageProcessor", "fast_tokenizer_class", "rope_kwargs"]
