"""Every error clipmatch raises on purpose.

    ClipmatchError
    ├── ModelError                 a model folder or export cannot be used
    │   ├── ModelNotFoundError     the folder or a file it needs is missing
    │   └── IncompatibleModelError the files are there but are not what clipmatch serves
    ├── InputError (ValueError)    a caller's input is unusable; names the item
    │   ├── ImageError             one image: unreadable, too small, NaN, bad shape
    │   ├── TextError              one text: empty, not a string
    │   ├── ShapeError             arrays or batches that do not fit together
    │   └── DatasetError           one record of a dataset file (index = line number)
    ├── ExportError                exporting a model failed
    │   └── ParityError            an exported graph disagrees with its PyTorch source
    ├── BackendError               the runtime underneath (onnxruntime, ...) failed
    ├── ExplainerError             an explainer cannot be set up (missing knowledge base, bad URL)
    └── DependencyError (ImportError)  an optional dependency is missing

Errors from libraries underneath are translated where they are caught, with
the original kept as ``__cause__``.
"""
from __future__ import annotations

__all__ = [
    "ClipmatchError",
    "ModelError",
    "ModelNotFoundError",
    "IncompatibleModelError",
    "InputError",
    "ImageError",
    "TextError",
    "ShapeError",
    "DatasetError",
    "ExportError",
    "ParityError",
    "BackendError",
    "ExplainerError",
    "DependencyError",
    "ConfigError",
    "StorageError",
    "IndexBusyError",
]


class ClipmatchError(Exception):
    """Base of every clipmatch error."""


class ModelError(ClipmatchError):
    """A model folder or export cannot be used."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """The model folder, or a file it must hold, does not exist."""


class IncompatibleModelError(ModelError):
    """The files exist but describe something clipmatch cannot serve."""


class ConfigError(ClipmatchError, ValueError):
    """A configuration object or option holds a value clipmatch cannot use (named in the message)."""


class InputError(ClipmatchError, ValueError):
    """An input given by the caller cannot be used.

    ``index`` is the position of the offending item in the caller's sequence,
    or None when the problem is with the call as a whole.
    """

    def __init__(self, message: str, *, index: int | None = None):
        self.index = index
        super().__init__(message if index is None else f"item {index}: {message}")


class ImageError(InputError):
    """One image cannot be used (unreadable, too small, NaN, wrong layout)."""


class TextError(InputError):
    """One text cannot be used (empty, not a string)."""


class ShapeError(InputError):
    """Arrays or batches whose sizes do not fit together."""


class DatasetError(InputError):
    """One record of a dataset file cannot be used; ``index`` is its 1-based line number."""

    def __init__(self, message: str, *, index: int | None = None, path: str | None = None):
        self.path = path
        where = f"{path}:{index}" if path and index is not None else (f"line {index}" if index is not None else path)
        ClipmatchError.__init__(self, f"{where}: {message}" if where else message)
        self.index = index


class ExportError(ClipmatchError):
    """Exporting a model failed."""


class ParityError(ExportError):
    """An exported graph's outputs differ from its PyTorch source beyond tolerance."""


class BackendError(ClipmatchError):
    """The runtime underneath (onnxruntime, a server) failed on a valid request."""


class StorageError(ClipmatchError, OSError):
    """Reading or writing clipmatch's own files failed (a full disk, a permission); what was
    committed before stays as it was."""


class IndexBusyError(ClipmatchError):
    """Another process is writing the same index folder."""


class DependencyError(ClipmatchError, ImportError):
    """An optional dependency needed for this call is not installed."""


class ExplainerError(ClipmatchError):
    """An explainer cannot be set up: its knowledge base is missing or malformed, its URL is invalid.
    A failed or empty explanation at run time is not an error: the result says so."""
