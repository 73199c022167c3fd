"""Triton Python-backend model: runs the ONNX graph next to it with onnxruntime.

Copied as ``model.py`` into each model version folder of a ``python``-target
repository (``clipmatch repository --target python``). Self-contained: it needs
numpy and onnxruntime in the environment the backend stub runs in, not clipmatch.

Requests that Triton's dynamic batcher hands over together are run as one
onnxruntime call when their non-batch shapes agree (texts of one length),
else in groups of equal shapes, and each request gets its own rows back.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        folder = os.path.join(args["model_repository"], args["model_version"])
        options = ort.SessionOptions()
        # The same parameter the native onnxruntime backend reads; the environment
        # variable (set by `TritonServer(threads_per_model=...)`) overrides it.
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        threads = os.environ.get("CLIPMATCH_TRITON_THREADS") or params.get("intra_op_thread_count")
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(os.path.join(folder, "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])

    def execute(self, requests):
        feeds = [{name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs}
                 for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, f in enumerate(feeds):
            groups.setdefault(tuple(f[n].shape[1:] for n in self.inputs), []).append(i)
        responses = [None] * len(requests)
        for members in groups.values():
            batch = {n: np.concatenate([feeds[i][n] for i in members]) for n in self.inputs}
            try:
                results = self.session.run(self.outputs, batch)
            except Exception as exc:  # noqa: BLE001 - the message goes back to the client
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
                continue
            start = 0
            for i in members:
                rows = feeds[i][self.inputs[0]].shape[0]
                tensors = [pb_utils.Tensor(n, np.ascontiguousarray(v[start:start + rows]))
                           for n, v in zip(self.outputs, results)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += rows
        return responses
