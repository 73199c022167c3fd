"""clipmatch's PyTorch side: model definitions, checkpoints, ONNX and TensorRT export.

Installed with ``pip install 'clipmatch[export,cpu]'``; the SDK (``clipmatch``)
never imports it. Submodules are imported by name (``clipmatch_export.exporter``,
``clipmatch_export.models.heads``, ...) so that a light one, such as the tokenizer
builder, does not pull in torch and transformers.
"""
