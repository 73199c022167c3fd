"""clipmatch: image-text matching with CLIP towers and entity-aware / compositional rescoring.

    >>> import clipmatch
    >>> m = clipmatch.Local("exports/tiny")  # doctest: +SKIP
    >>> r = m.rescore("a red cube left of a blue ball", ["a.png", "b.png"])  # doctest: +SKIP

Importing clipmatch never imports torch.
"""
from clipmatch import aio
from clipmatch.backends.local import Local
from clipmatch.backends.triton import Remote, TritonOptions, connect
from clipmatch.config import RuntimeConfig
from clipmatch.errors import (
    BackendError,
    ClipmatchError,
    ConfigError,
    DependencyError,
    ExplainerError,
    ExportError,
    ImageError,
    IncompatibleModelError,
    IndexBusyError,
    InputError,
    ModelError,
    ModelNotFoundError,
    ParityError,
    ShapeError,
    StorageError,
    TextError,
)
from clipmatch.explain.explainers import (
    CachedExplainer,
    Explanation,
    KnowledgeBaseExplainer,
    OpenAIExplainer,
    TransformersExplainer,
)
from clipmatch.matcher import Matcher
from clipmatch.results import ImageEncoding, RescoreResult, TextEncoding
from clipmatch.retrieval.index import GalleryIndex, build_index
from clipmatch.retrieval.search import Searcher, SearchHit, SearchResult

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "CachedExplainer",
    "ClipmatchError",
    "ConfigError",
    "DependencyError",
    "ExplainerError",
    "Explanation",
    "ExportError",
    "GalleryIndex",
    "SearchHit",
    "ImageEncoding",
    "ImageError",
    "IncompatibleModelError",
    "IndexBusyError",
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
    "SearchResult",
    "Searcher",
    "ShapeError",
    "StorageError",
    "TextEncoding",
    "TextError",
    "TransformersExplainer",
    "TritonOptions",
    "__version__",
    "aio",
    "build_index",
    "connect",
]
