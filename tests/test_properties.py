"""Property-based tests: random valid configs and inputs try to break the model's core guarantees.

Configs: 0..2 layers per stack (0 H layers included, never 0 L and 0 H), chunk_size 1..16, both poolings, odd
and even hidden sizes, residual in float32 or not; batch 1..4; lengths 1..3*chunk_size+1. The number of examples
comes from the Hypothesis profile (tests/conftest.py: "ci" by default, HYPOTHESIS_PROFILE=thorough for more).
"""

import tempfile

import torch
from hypothesis import given
from hypothesis import strategies as st

from hmamba import HMambaForCausalLM

from conftest import tiny_model

VOCAB = 64


@st.composite
def models(draw):
    low, high = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    if low + high == 0:  # the config requires an L or H layer
        high = 1
    return tiny_model(
        seed=draw(st.integers(0, 2**16)),
        vocab_size=VOCAB,
        hidden_size=draw(st.sampled_from([3, 5, 8, 13])),
        state_size=draw(st.integers(1, 4)),
        expand=draw(st.integers(1, 2)),
        conv_kernel=draw(st.integers(2, 4)),
        num_low_layers=low,
        num_high_layers=high,
        num_out_layers=draw(st.integers(0, 1)),
        chunk_size=draw(st.integers(1, 16)),
        pooling=draw(st.sampled_from(["last", "mean"])),
        residual_in_fp32=draw(st.booleans()),
    )


@st.composite
def model_and_ids(draw):
    model = draw(models())
    s = model.config.chunk_size
    batch, length = draw(st.integers(1, 4)), draw(st.integers(1, 3 * s + 1))
    seed = draw(st.integers(0, 2**16))
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    return model, ids


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@given(model_and_ids(), st.data())
def test_causality_future_tokens_never_change_the_past(case, data):
    model, ids = case
    t = data.draw(st.integers(0, ids.shape[1] - 1), label="first perturbed position")
    changed = ids.clone()
    changed[:, t:] = (ids[:, t:] + torch.randint(1, VOCAB, changed[:, t:].shape)) % VOCAB
    torch.testing.assert_close(logits(model, changed)[:, :t], logits(model, ids)[:, :t], atol=1e-6, rtol=0)


@given(model_and_ids(), st.data())
def test_cached_decoding_equals_uncached_forward(case, data):
    model, ids = case
    prompt = data.draw(st.integers(1, ids.shape[1]), label="prompt length")
    full = logits(model, ids)
    with torch.no_grad():
        first = model(ids[:, :prompt], use_cache=True)
        steps, cache = [first.logits], first.cache_params
        for t in range(prompt, ids.shape[1]):  # one token at a time
            out = model(ids[:, t : t + 1], cache_params=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.cache_params
        again = model(ids[:, :prompt], use_cache=True)
        rest = model(ids[:, prompt:], cache_params=again.cache_params, use_cache=True) if prompt < ids.shape[1] else None
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)
    multi = [again.logits] + ([rest.logits] if rest is not None else [])  # all new tokens in one call
    torch.testing.assert_close(torch.cat(multi, 1), full, atol=1e-4, rtol=0)


@given(model_and_ids(), st.data())
def test_left_padded_batch_equals_each_row_alone(case, data):
    model, ids = case
    batch, length = ids.shape
    lengths = data.draw(st.lists(st.integers(1, length), min_size=batch, max_size=batch), label="row lengths")
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, length - n :] = 1
    padded = ids.masked_fill(mask == 0, 0)
    nxt = torch.randint(0, VOCAB, (batch, 2))
    with torch.no_grad():
        out = model(padded, attention_mask=mask, use_cache=True)
        step1 = model(nxt[:, :1], cache_params=out.cache_params, use_cache=True)
        step2 = model(nxt[:, 1:], cache_params=step1.cache_params, use_cache=True)
    for row, n in enumerate(lengths):
        alone = logits(model, torch.cat([ids[row : row + 1, length - n :], nxt[row : row + 1]], 1))
        batched = torch.cat([out.logits[row : row + 1, length - n :], step1.logits[row : row + 1],
                             step2.logits[row : row + 1]], 1)
        torch.testing.assert_close(batched, alone, atol=1e-4, rtol=0)


@given(model_and_ids())
def test_save_then_load_gives_the_same_logits(case):
    model, ids = case
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = HMambaForCausalLM.from_pretrained(folder).eval()
    drop = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert drop(loaded.config.to_dict()) == drop(model.config.to_dict())
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    assert all(torch.equal(saved_state[k], loaded_state[k]) for k in saved_state)  # every weight bit for bit
    # logits to float rounding only: the loaded weights are memory-mapped at safetensors' 8-byte offsets, and the
    # CPU matmul kernels round differently for differently aligned (but equal) inputs (seen: 3e-8 at width 13)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-6, rtol=1e-6)


@given(model_and_ids())
def test_gradient_checkpointing_gives_the_plain_gradients(case):
    model, ids = case
    model.train()
    weights = torch.randn(*ids.shape, VOCAB, generator=torch.Generator().manual_seed(0))

    def gradients():
        model.zero_grad()
        (model(ids).logits * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.gradient_checkpointing_enable()
    checkpointed = gradients()
    # the H-stack runs (and learns) only once a chunk is complete; every other parameter always gets a gradient
    has_chunk = ids.shape[1] >= model.config.chunk_size
    expected = {n for n, _ in model.named_parameters() if has_chunk or ".high_layers." not in n}
    assert plain.keys() == checkpointed.keys() == expected
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
