"""The transformers engine: the model in PyTorch, one sequence per request, one token at a
time (``--engine transformers``). Slower on a CPU than the onnx engine, but it loads any
causal LM transformers can, on any device torch supports."""
from __future__ import annotations

import inspect
import threading
import time
from typing import Any, Iterator

import torch

from app.worker.chat_model import context_length
from app.worker.generation import Generation


class TransformersEngine:
    name = "transformers"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        self.context_length = context_length(model.config)
        parameters = sum(p.numel() for p in model.parameters())
        self.summary = f"{parameters / 1e6:.0f}M parameters, " \
            f"{str(model.dtype).replace('torch.', '')}"
        self.device = next(model.parameters()).device
        # transformers 5 renamed past_key_values to cache (and warns on the old name).
        self._cache = "cache" if "cache" in inspect.signature(model.forward).parameters \
            else "past_key_values"

    def generate(self, generation: Generation,
                 cancel: threading.Event) -> Iterator[dict[str, Any]]:
        timeline = generation.job.timeline
        timeline.started = time.time()
        with torch.inference_mode():
            output = self.model(input_ids=torch.tensor([generation.job.input_ids],
                                                       device=self.device), use_cache=True)
            timeline.prompt_done = time.time()
            generation.add_prompt_scores(output.logits[0])
            while True:
                if cancel.is_set():
                    return
                frame = generation.step(output.logits[0, -1])
                if generation.finish is not None:
                    break
                if frame is not None:
                    yield frame
                output = self.model(
                    input_ids=torch.tensor([[generation.last_token]], device=self.device),
                    use_cache=True, **{self._cache: output[self._cache]})
        yield generation.final_frame()
