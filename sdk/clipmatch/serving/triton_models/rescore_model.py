"""Triton Python-backend model ``rescore``: one query, its explanation and K cached candidates in one request.

Copied as ``model.py`` into the ``rescore`` model of every generated
repository. It calls the served ``text_tower``, ``entity_query``,
``entity_pair`` and ``dcsm`` through Triton's business-logic scripting (BLS):
an ensemble cannot do this job, because its steps share one batch size and
here the query is one row and the candidates are K.

Inputs: ``input_ids`` / ``attention_mask`` (1, T), ``explanation_ids`` /
``explanation_mask`` (1, E), ``functional_ids`` (1, T), ``image_tokens``
(K, P, D) and ``vision_experts`` (K, Ke, D), both cached per image. Outputs,
(K,) each: ``cosine``, ``match_prob``, ``entity_score``, ``dcsm_logit``. The
feeds are built exactly as ``clipmatch.Matcher.rescore`` builds them, so the
scores equal the in-process ones.
"""
from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

_QUERY_PART = ("text_star", "text_experts", "text_gate", "explanation_keys", "explanation_values")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.dcsm_length = int(json.loads(params["clipmatch_sizes"])["dcsm_text_length"])

    def _call(self, model, feeds, outputs):
        request = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=list(outputs),
            inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in feeds.items()])
        response = request.exec()
        if response.has_error():
            raise pb_utils.TritonModelException(f"{model}: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}

    def execute(self, requests):
        responses = []
        for request in requests:
            get = lambda name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()  # noqa: E731
            try:
                ids, mask, functional = get("input_ids"), get("attention_mask"), get("functional_ids")
                e_ids, e_mask = get("explanation_ids"), get("explanation_mask")
                image_tokens, vision_experts = get("image_tokens"), get("vision_experts")
                k = image_tokens.shape[0]
                if k == 0:
                    raise pb_utils.TritonModelException("image_tokens has no candidates (K = 0)")
                query = self._call("text_tower", {"input_ids": ids, "attention_mask": mask},
                                   ("text_embeds", "text_tokens"))
                expl = self._call("text_tower", {"input_ids": e_ids, "attention_mask": e_mask}, ("text_tokens",))
                cosine = image_tokens[:, 0] @ query["text_embeds"][0]
                part = self._call("entity_query", {
                    "text_tokens": query["text_tokens"], "text_mask": mask,
                    "explanation_tokens": expl["text_tokens"], "explanation_mask": e_mask,
                }, _QUERY_PART)
                entity = self._call("entity_pair", {
                    "image_cls": image_tokens[:, 0], "vision_experts": vision_experts, **part,
                    "explanation_mask": e_mask,
                }, ("match_prob", "entity_score"))
                length = min(int(mask[0].sum()), self.dcsm_length)  # the query cut to its own length
                dcsm = self._call("dcsm", {
                    "image_tokens": image_tokens, "text_tokens": query["text_tokens"][:, :length],
                    "text_mask": mask[:, :length], "functional_ids": functional[:, :length],
                }, ("dcsm_logit",))
                tensors = [pb_utils.Tensor("cosine", cosine.astype(np.float32)),
                           pb_utils.Tensor("match_prob", entity["match_prob"].reshape(k)),
                           pb_utils.Tensor("entity_score", entity["entity_score"].reshape(k)),
                           pb_utils.Tensor("dcsm_logit", dcsm["dcsm_logit"].reshape(k))]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as exc:  # noqa: BLE001 - the message goes back to the client
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses
