"""Evaluation helpers."""

import math

import pytest
import torch

from hmamba.data import default_tokenizer
from hmamba.eval import perplexity, sliding_window_perplexity, text_perplexity

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


def _reference_sliding_window(model, ids, max_length, stride):
    """The transformers documentation's recipe: labels -100 on the context part of each window."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        window = ids[begin:end][None]
        labels = window.clone()
        labels[:, : -(end - prev_end)] = -100
        scored = (labels[:, 1:] != -100).sum().item()
        if scored:  # a 1-token last window scores nothing
            with torch.no_grad():
                nll += model(window, labels=labels).loss.item() * scored
        count += scored
        prev_end = end
        if end == len(ids):
            break
    return nll / count, count


@pytest.mark.parametrize("max_length,stride", [(8, 4), (8, 8), (29, 29), (10, 3), (64, 5)])
def test_sliding_window_perplexity_matches_the_reference_recipe(max_length, stride):
    model = tiny_model(chunk_size=3)
    ids = torch.randint(2, 64, (30,))
    nll, count = _reference_sliding_window(model, ids, max_length, stride)
    result = sliding_window_perplexity(model, ids, max_length=max_length, stride=stride)
    assert result["tokens"] == count == (29 if stride < max_length else 29 - len(range(max_length, 30, stride)))
    assert abs(result["nll"] - nll) < 1e-5
    if max_length >= len(ids):  # one window: the exact number
        assert abs(result["nll"] - perplexity(model, ids)["nll"]) < 1e-5


def test_sliding_window_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="stride must be in 1..max_length"):
        sliding_window_perplexity(model, torch.arange(2, 20), max_length=4, stride=5)
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        sliding_window_perplexity(model, torch.arange(2, 20), max_length=1, stride=1)


def test_text_perplexity_bits_per_byte_compare_across_rows():
    # byte-level ids: one byte per token, so bits/byte is each row's own nll in bits, whichever tokens it scores
    # (stride == max_length leaves every window's first token unscored; those bytes must not count as free)
    model, text = tiny_model(vocab_size=259, chunk_size=3), "And God said, Let there be light: and there was light."
    rows = text_perplexity(model, default_tokenizer(), text, max_length=8, strides=(4, 8))
    assert [r["tokens"] for r in rows] == [len(text) - 1, len(text) - 1, len(text) - 1 - len(range(8, len(text), 8))]
    for r in rows:
        assert r["bits_per_byte"] == pytest.approx(r["nll"] / math.log(2)), r["method"]
