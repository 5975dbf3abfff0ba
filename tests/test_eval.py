"""Evaluation helpers."""

import math

import pytest
import torch

from hmamba.eval import perplexity

from conftest import tiny_model


@pytest.mark.parametrize("segment_length", [1, 5, 7, 100])
def test_segmented_perplexity_equals_one_forward(segment_length):
    model = tiny_model(chunk_size=3, pooling="mean")
    ids = torch.randint(2, 64, (40,))
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss.item()
    result = perplexity(model, ids, segment_length=segment_length)
    assert result["tokens"] == 39
    assert abs(result["nll"] - loss) < 1e-5
    assert abs(result["perplexity"] - math.exp(loss)) < 1e-3


def test_perplexity_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, torch.tensor([3]))
    with pytest.raises(ValueError, match="segment_length must be >= 1"):
        perplexity(model, torch.tensor([3, 4, 5]), segment_length=0)
