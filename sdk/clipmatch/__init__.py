"""clipmatch: image-text matching with CLIP towers and entity-aware / compositional rescoring.

    >>> import clipmatch
    >>> m = clipmatch.Local("exports/tiny")  # doctest: +SKIP
    >>> r = m.rescore("a red cube left of a blue ball", ["a.png", "b.png"])  # doctest: +SKIP

Importing clipmatch never imports torch.
"""
from . import aio
from .config import RuntimeConfig
from .errors import (BackendError, ClipmatchError, DependencyError, ExplainerError, ExportError, ImageError,
                     IncompatibleModelError, InputError, ModelError, ModelNotFoundError, ParityError,
                     ShapeError, TextError)
from .explainers import (CachedExplainer, Explanation, KnowledgeBaseExplainer, OpenAIExplainer,
                         TransformersExplainer)
from .local import Local
from .matcher import Matcher
from .results import ImageEncoding, RescoreResult, TextEncoding
from .triton_executor import Remote, TritonOptions, connect

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "CachedExplainer",
    "ClipmatchError",
    "DependencyError",
    "ExplainerError",
    "Explanation",
    "ExportError",
    "ImageEncoding",
    "ImageError",
    "IncompatibleModelError",
    "InputError",
    "KnowledgeBaseExplainer",
    "Local",
    "Matcher",
    "ModelError",
    "ModelNotFoundError",
    "OpenAIExplainer",
    "ParityError",
    "Remote",
    "RescoreResult",
    "RuntimeConfig",
    "ShapeError",
    "TextEncoding",
    "TransformersExplainer",
    "TritonOptions",
    "connect",
    "__version__",
    "aio",
]
