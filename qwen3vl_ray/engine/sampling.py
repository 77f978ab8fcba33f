"""Choosing the next token: greedy, or temperature + top-p sampling with a per-request generator."""

from __future__ import annotations

import torch

from qwen3vl_ray.engine.requests import SamplingParams


class Sampler:
    """Stateless apart from the request's random generator (so a seed reproduces a sample)."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.generator = None
        if not params.greedy and params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """``logits``: (vocab,) for the last position."""
        if self.params.greedy:
            return int(torch.argmax(logits))
        # Shifted by the max first (softmax does not change) and the temperature kept >= float32's smallest
        # normal value: a tiny temperature such as 1e-300 (0 in float32) would otherwise divide by zero
        # into inf - inf = NaN probabilities. Shifted, the max stays 0 and the rest go to -inf: greedy.
        logits = logits.float()
        temperature = max(self.params.temperature, torch.finfo(torch.float32).tiny)
        scores = (logits - logits.max()) / temperature
        if self.params.top_p < 1.0:
            # Same rule as transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p,
            # always keeping the most likely token.
            sorted_scores, order = torch.sort(scores, descending=False)
            cum = sorted_scores.softmax(-1).cumsum(-1)
            remove = cum <= (1 - self.params.top_p)
            remove[-1] = False
            scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
        probs = scores.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
