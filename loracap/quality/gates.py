"""`--fail-on` rules: turn report numbers into a pass/fail for CI.

    missing-caption        fail when the count is above 0
    truncated>5            fail when the count is above 5
    clip<20                fail when any pair scores below 20
    mean-clip<25           fail when the mean CLIP score is below 25
    itm<0.5                fail when any pair's ITM match probability is below 0.5 (needs --itm-model)
    mean-itm<0.8           fail when the mean ITM match probability is below 0.8

Rules are checked against the names the report knows before any work starts, so a typo fails in a
second, not after an hour of scoring.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["CHECKS", "NEEDS_ITM", "NEEDS_TOKENS", "Rule", "evaluate", "parse_rules"]

# name -> what the count is; these are the keys of DatasetReport.checks.
CHECKS: dict[str, str] = {
    "missing-caption": "images with no caption",
    "orphan-caption": "captions whose image does not exist",
    "caption-error": "caption files or entries that could not be read",
    "empty-caption": "captions with no text",
    "truncated": "captions longer than the text encoder's window",
    "t5-truncated": "captions longer than the T5 window (when a T5 tokenizer is given)",
    "duplicate-caption": "groups of identical captions",
    "near-duplicate-caption": "groups of near-identical captions",
    "duplicate-image": "groups of duplicate or near-duplicate images",
    "small-image": "images below the minimum side",
    "image-error": "images that could not be decoded",
    "single-image-bucket": "aspect buckets holding a single image",
    "common-tag": "tags in nearly every caption (learned into the trigger)",
    "sensitive-term": "occurrences of sensitive terms",
    "no-trigger": "captions without the trigger (needs --trigger)",
    "fused-trigger": "captions where the tokenizer fuses the trigger with its neighbours (needs --trigger)",
    "clip-error": "pairs that could not be scored",
    "itm-error": "pairs the image-text matching model could not score (needs --itm-model)",
}
NEEDS_TRIGGER = frozenset({"no-trigger", "fused-trigger"})
NEEDS_CLIP = frozenset({"clip-error"})
NEEDS_ITM = frozenset({"itm-error"})
# Scores rather than counts: NAME<LIMIT fails when a pair (or the mean) is below the limit.
CLIP_RULES = ("clip", "mean-clip")
ITM_RULES = ("itm", "mean-itm")  # match probabilities, in [0, 1]
# Counted with the tokenizer; without one (--no-clip, no --tokenizer, none cached) the report has no number.
NEEDS_TOKENS = frozenset({"truncated", "t5-truncated", "fused-trigger"})

_RULE = re.compile(r"^\s*(?P<name>[a-z0-9-]+)\s*(?:(?P<op>[<>])\s*(?P<value>\d+(?:\.\d+)?|\.\d+))?\s*$")


@dataclass(frozen=True)
class Rule:
    name: str
    """A CHECKS name, or "clip" / "mean-clip" / "itm" / "mean-itm"."""
    limit: float
    """Counts fail above it; the score rules ("clip", "mean-clip", "itm", "mean-itm") fail below it."""

    def __str__(self) -> str:
        if self.name in (*CLIP_RULES, *ITM_RULES):
            return f"{self.name}<{self.limit:g}"
        return self.name if self.limit == 0 else f"{self.name}>{self.limit:g}"


def parse_rules(
    specs: Iterable[str], *, trigger: bool = True, clip: bool = True, tokens: bool = True, itm: bool = True
) -> list[Rule]:
    """Parse rules given as repeated options and/or comma-separated lists. Raises ValueError for an
    unknown name, a wrong comparison, or a rule the report will not have numbers for."""
    rules: list[Rule] = []
    for spec in specs:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            match = _RULE.match(part)
            if not match:
                raise ValueError(
                    f"cannot read --fail-on rule {part!r}: expected NAME, NAME>N, clip<SCORE or itm<P"
                )
            name, op, value = match["name"], match["op"], match["value"]
            if name in CLIP_RULES:
                if op != "<":
                    raise ValueError(f"--fail-on {part!r}: write {name}<SCORE, e.g. {name}<20")
                if not clip:
                    raise ValueError(f"--fail-on {part!r} needs CLIP scores, which --no-clip turns off")
            elif name in ITM_RULES:
                if op != "<" or float(value) > 1:
                    raise ValueError(
                        f"--fail-on {part!r}: write {name}<P with P a match probability from 0 to 1, "
                        f"e.g. {name}<0.5"
                    )
                if not itm:
                    raise ValueError(f"--fail-on {part!r} needs ITM scores: pass --itm-model ID_OR_FOLDER")
            elif name in CHECKS:
                if op == "<":
                    raise ValueError(f"--fail-on {part!r}: counts take NAME or NAME>N, e.g. {name}>3")
                if name in NEEDS_TRIGGER and not trigger:
                    raise ValueError(f"--fail-on {part!r} needs --trigger")
                if name in NEEDS_CLIP and not clip:
                    raise ValueError(f"--fail-on {part!r} needs CLIP scores, which --no-clip turns off")
                if name in NEEDS_ITM and not itm:
                    raise ValueError(f"--fail-on {part!r} needs ITM scores: pass --itm-model ID_OR_FOLDER")
                if name in NEEDS_TOKENS and not tokens:
                    raise ValueError(
                        f"--fail-on {part!r} needs token counts: pass --tokenizer ID_OR_FOLDER "
                        "(with --no-clip, --clip-model's is used only when already on this machine)"
                    )
            else:
                known = ", ".join([*CHECKS, "clip<SCORE", "mean-clip<SCORE", "itm<P", "mean-itm<P"])
                raise ValueError(f"unknown --fail-on rule {name!r}; known: {known}")
            rules.append(Rule(name, float(value) if value is not None else 0.0))
    return rules


def evaluate(
    rules: Sequence[Rule],
    checks: Mapping[str, int],
    scores: Sequence[float],
    itm: Sequence[float] = (),
) -> list[str]:
    """One line per broken rule, e.g. "truncated: 4 captions longer than ... (limit 0)". `scores`: the CLIP
    scores of the pairs that have one; `itm`: the ITM match probabilities of those that have one."""
    failures = []
    for rule in rules:
        if rule.name == "clip":
            below = sum(s < rule.limit for s in scores)
            if below:
                failures.append(f"{rule}: {below} pair(s) score below {rule.limit:g}")
        elif rule.name == "mean-clip":
            mean = sum(scores) / len(scores) if scores else 0.0
            if mean < rule.limit:
                failures.append(f"{rule}: mean CLIP score {mean:.1f} is below {rule.limit:g}")
        elif rule.name == "itm":
            below = sum(p < rule.limit for p in itm)
            if below:
                failures.append(f"{rule}: {below} pair(s) with a match probability below {rule.limit:g}")
        elif rule.name == "mean-itm":
            mean = sum(itm) / len(itm) if itm else 0.0
            if mean < rule.limit:
                failures.append(f"{rule}: mean match probability {mean:.3f} is below {rule.limit:g}")
        else:
            # parse_rules only accepts CHECKS names: a missing one is a report bug, never a silent pass.
            count = checks[rule.name]
            if count > rule.limit:
                failures.append(f"{rule}: {count} {CHECKS[rule.name]} (allowed {rule.limit:g})")
    return failures
