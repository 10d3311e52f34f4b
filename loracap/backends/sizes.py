"""The side a model's image processor resizes to: what images are decoded at. No torch: an engine that
decodes elsewhere than the model (Ray) reads it from the processor's saved settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def image_side(image_processor: Any) -> int:
    """The side an image processor resizes to (0 when it does not say), so that the pipeline decodes
    images no larger than needed for it.

    Reads `size`, else `crop_size`: a dict or a transformers SizeDict, with height / width (the exact
    size: its longer side) or a longest_edge / shortest_edge bound.
    """
    for attribute in ("size", "crop_size"):
        if isinstance(image_processor, Mapping):  # its saved settings (preprocessor_config.json)
            size = image_processor.get(attribute)
        else:
            size = getattr(image_processor, attribute, None)
        if isinstance(size, int):
            return size
        size = dict(size or {})  # a SizeDict lists only its set keys
        if "height" in size:
            return max(size["height"], size.get("width", 0))
        side = size.get("longest_edge", size.get("shortest_edge", 0))
        if side:
            return side
    return 0
