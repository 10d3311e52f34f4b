"""Test kit: random-weight captioning models of the real architectures, built offline in well under a second.

loracap's tests (and its users' tests) cannot reach the model hub, so this package builds checkpoints locally:
the real model classes with tiny (or full-size) random weights, a tokenizer trained on the spot with the
`tokenizers` library, and the real processor, all written with `save_pretrained` so they load through
transformers' Auto classes exactly as a hub checkpoint would::

    from loracap.testing import make_tiny_model
    path = make_tiny_model("florence2", tmp_path / "florence2")

or from a shell: ``python -m loracap.testing blip /tmp/blip``.

Importing this package is cheap: torch and transformers load only when a model is built.
"""

from loracap.testing.chat_families import FAMILY_ARCHS
from loracap.testing.chat_models import CHAT_ARCHS
from loracap.testing.models import ARCHS, SIZES, make_tiny_model

__all__ = ["ARCHS", "CHAT_ARCHS", "FAMILY_ARCHS", "SIZES", "make_tiny_model"]
