"""A burst of batch-1 text_tower requests, all in flight at once, and what the server made of it."""
from __future__ import annotations

import threading

import numpy as np


def inference_stats(client, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) of ``model`` by the server's statistics."""
    s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))  # JSON omits zeros


def text_tower_burst(grpc_url: str, requests: int) -> tuple[int, int]:
    """Send ``requests`` batch-1 requests to text_tower at once (tritonclient callbacks); returns the
    server's (inferences, executions) for them. Every request must succeed within 60 s."""
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(grpc_url.removeprefix("grpc://"))
    try:
        before = inference_stats(client, "text_tower")
        ids = np.array([[0, 1, 2, 3]], dtype=np.int64)  # within every vocabulary
        done, errors = threading.Semaphore(0), []

        def callback(result, error):
            if error is not None:
                errors.append(error)
            done.release()

        for _ in range(requests):
            inputs = []
            for name, x in (("input_ids", ids), ("attention_mask", np.ones_like(ids))):
                i = tg.InferInput(name, list(x.shape), "INT64")
                i.set_data_from_numpy(x)
                inputs.append(i)
            client.async_infer("text_tower", inputs, callback)
        for _ in range(requests):
            assert done.acquire(timeout=60)
        assert not errors, errors[:3]
        after = inference_stats(client, "text_tower")
        return after[0] - before[0], after[1] - before[1]
    finally:
        client.close()
