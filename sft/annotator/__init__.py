"""Annotators: a model behind one small interface (`base`), a model on this machine (`local`: a training
workdir or a Hugging Face folder), an OpenAI-compatible server (`endpoint`), and the SQLite cache of
their answers (`cache`).

    from sft.annotator import AnnotationCache, CachedAnnotator, Decoding, open_annotator

    annotator = CachedAnnotator(open_annotator("/tmp/sft-quickstart"), AnnotationCache("/tmp/ann.sqlite"), "fill")
    annotator.generate([[{"role": "user", "content": "What does json.dumps do?"}]], Decoding(max_new_tokens=64))

`base` and `cache` need no JAX: the data builder and its worker processes import them. `open_annotator`
and `LocalAnnotator` load `local` (JAX, the model) when first named, `open_endpoint` and
`EndpointAnnotator` load `endpoint` (and it `openai` on first use), so importing the package stays light.
"""

import importlib

from sft.annotator.base import Annotator, AnnotatorError, Chat, Decoding, Generation, check_count
from sft.annotator.cache import AnnotationCache, CachedAnnotator, cache_key

_LAZY = {
    "LocalAnnotator": "sft.annotator.local", "open_annotator": "sft.annotator.local",
    "EndpointAnnotator": "sft.annotator.endpoint", "open_endpoint": "sft.annotator.endpoint",
}

__all__ = [
    "AnnotationCache", "Annotator", "AnnotatorError", "CachedAnnotator", "Chat", "Decoding", "EndpointAnnotator",
    "Generation", "LocalAnnotator", "cache_key", "check_count", "open_annotator", "open_endpoint",
]


def __getattr__(name):
  if name in _LAZY:
    # By name, on first use: `local` sits above the serving stack, this package below the data builder.
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'sft.annotator' has no attribute {name!r}")
