"""Under-represented tags, and prompts to make more images of them.

`rare_tags(counts, below)`: the tags (or, for prose, the words) in fewer than `below` captions, rarest
first. `balance_prompts(...)`: one neutral caption per missing image, in the dataset's own style (a tag
list for tag captions, a short phrase for prose), with the trigger first where the dataset uses one, so
`loracap generate --prompts-file FILE --n 1 --captions` makes each image and captions it with the prompt
it came from.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["balance_prompts", "rare_tags"]


def rare_tags(counts: Mapping[str, int], below: int) -> list[tuple[str, int]]:
    """(tag, captions it is in) for the tags in fewer than `below` captions, rarest first, then by name."""
    if below < 1:
        raise ValueError(f"--rare-below must be at least 1, not {below}")
    return sorted(((t, n) for t, n in counts.items() if n < below), key=lambda tn: (tn[1], tn[0]))


def balance_prompts(rare: list[tuple[str, int]], below: int, *, tags: bool, trigger: str | None) -> list[str]:
    """`below - count` prompts for each rare tag: "TRIGGER, TAG" for tag datasets ("TAG" without a trigger),
    "a photo of TRIGGER with TAG" ("a photo with TAG") for prose."""
    prompts = []
    for tag, count in rare:
        if tags:
            prompt = f"{trigger}, {tag}" if trigger else tag
        else:
            prompt = f"a photo of {trigger} with {tag}" if trigger else f"a photo with {tag}"
        prompts += [prompt] * (below - count)
    return prompts
