"""Perplexity of a long token stream with a recurrent model: exact, in constant memory."""

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, input_ids, segment_length=2048):
    """Perplexity of a 1-D token tensor. The stream is fed in segments of `segment_length` tokens with the
    recurrent cache carried across, so every token is scored with its whole left context (no sliding-window
    approximation) while memory stays bounded by one segment. Returns {"nll": mean nats per token,
    "perplexity": exp(nll), "tokens": number of scored tokens}."""
    ids = torch.as_tensor(input_ids).reshape(1, -1).to(model.device)
    if ids.shape[1] < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.shape[1]}")
    if segment_length < 1:
        raise ValueError(f"segment_length must be >= 1, got {segment_length}")
    total, cache, previous_last = 0.0, None, None
    for start in range(0, ids.shape[1], segment_length):
        segment = ids[:, start : start + segment_length]
        out = model(segment, cache_params=cache, use_cache=True)
        cache = out.cache_params
        logits = out.logits.float()[0]
        if previous_last is not None:  # the previous segment's last logits predict this segment's first token
            logits = torch.cat([previous_last, logits])
            targets = segment[0]
        else:
            targets = segment[0, 1:]
        previous_last = logits[-1:]
        total += F.cross_entropy(logits[: len(targets)], targets, reduction="sum").item()
    count = ids.shape[1] - 1
    return {"nll": total / count, "perplexity": math.exp(total / count), "tokens": count}
