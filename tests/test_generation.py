"""Incremental decoding: cache == uncached forward, generate() modes, constant cache size, left padding."""

import pickle
import random

import pytest
import torch

from conftest import tiny_model
from hmamba.eval.bench import has_cxx_compiler


@pytest.mark.parametrize("chunk_size,pooling,split", [
    (1, "last", (2, 2, 1)), (3, "last", (2, 2, 1)), (4, "mean", (1, 3, 0)), (2, "mean", (0, 2, 2)),
    (5, "last", (2, 0, 1)),
])
def test_cached_steps_equal_uncached_forward(chunk_size, pooling, split):
    nl, nh, no = split
    model = tiny_model(chunk_size=chunk_size, pooling=pooling, num_low_layers=nl, num_high_layers=nh,
                       num_out_layers=no)
    rng = random.Random(chunk_size)
    for _ in range(4):
        total = rng.randint(chunk_size + 2, 4 * chunk_size + 6)
        prompt = rng.randint(1, total - 1)  # crosses chunk boundaries at random offsets
        ids = torch.randint(2, 64, (2, total))
        with torch.no_grad():
            full = model(ids).logits
            out = model(ids[:, :prompt], use_cache=True)
            steps = [out.logits]
            for t in range(prompt, total):
                out = model(ids[:, t : t + 1], cache_params=out.cache_params, use_cache=True)
                steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)


def test_multi_token_continuation_from_cache():
    model = tiny_model(chunk_size=3)
    ids = torch.randint(2, 64, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :7], use_cache=True)
        rest = model(ids[:, 7:], cache_params=first.cache_params, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, atol=1e-4, rtol=0)
    with torch.no_grad():  # under transformers' usual name, as generate()'s outputs hold the cache
        first = model(ids[:, :7], use_cache=True)
        rest = model(ids[:, 7:], past_key_values=first.cache, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 4])
def test_greedy_generate_same_with_and_without_cache(chunk_size):
    model = tiny_model(chunk_size=chunk_size)
    ids = torch.randint(2, 64, (2, 6))
    kwargs = dict(max_new_tokens=15, min_new_tokens=15, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=True, **kwargs)
    uncached = model.generate(ids, attention_mask=torch.ones_like(ids), use_cache=False, **kwargs)
    assert cached.shape == (2, 21)
    assert torch.equal(cached, uncached)


def test_generate_from_inputs_embeds_equals_input_ids():
    model = tiny_model(chunk_size=3)
    ids = torch.randint(2, 64, (2, 7))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                  pad_token_id=0)
    from_ids = model.generate(ids, **kwargs)
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), **kwargs)  # the new tokens only
    assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])


def test_generate_continues_from_the_cache_it_returned():
    model = tiny_model(chunk_size=3)
    ids = torch.randint(2, 64, (2, 6))
    ids[:, 0], ids[1, 1] = 0, 0  # left padding in every row (pad_to_multiple_of): columns seen > real tokens
    mask = (ids != 0).long()
    kwargs = dict(do_sample=False, pad_token_id=0, min_new_tokens=7, max_new_tokens=7, output_scores=True,
                  return_dict_in_generate=True)
    whole = model.generate(ids, attention_mask=mask, **{**kwargs, "min_new_tokens": 14, "max_new_tokens": 14})

    def first_half():
        return model.generate(ids, attention_mask=mask, **kwargs)

    def full_mask(out):
        return torch.cat([mask, torch.ones_like(out.sequences[:, ids.shape[1]:])], dim=1)

    first = first_half()  # continued with the whole sequence, as generate() returned it
    rest = model.generate(first.sequences, attention_mask=full_mask(first), cache_params=first.past_key_values,
                          **kwargs)
    assert torch.equal(rest.sequences, whole.sequences)
    torch.testing.assert_close(torch.stack(rest.scores), torch.stack(whole.scores[7:]), atol=1e-5, rtol=0)

    first = first_half()  # continued with only the token the cache has not seen, and a mask for the whole sequence
    rest = model.generate(first.sequences[:, -1:], attention_mask=full_mask(first),
                          cache_params=first.past_key_values, **kwargs)
    assert torch.equal(rest.sequences[:, 1:], whole.sequences[:, -7:])
    torch.testing.assert_close(torch.stack(rest.scores), torch.stack(whole.scores[7:]), atol=1e-5, rtol=0)

    prefilled = model(ids, attention_mask=mask, use_cache=True).cache  # has seen every token of ids
    with pytest.raises(ValueError, match="the cache has seen 6 tokens and the input has 6: nothing new"):
        model.generate(ids, attention_mask=mask, cache_params=prefilled, max_new_tokens=2)


def test_generate_continues_an_unpadded_prompt_from_only_its_new_tokens():
    # generate() drops an all-ones mask; its width still says that the input holds only the new tokens
    model = tiny_model(chunk_size=3)
    ids = torch.randint(2, 64, (1, 4))
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True, output_scores=True)
    first = model.generate(ids, max_new_tokens=2, **kwargs)  # the cache has seen 5 of its 6 tokens
    for new in (first.sequences[:, -1:], torch.cat([first.sequences[:, -1:], torch.randint(2, 64, (1, 9))], 1)):
        sequence = torch.cat([first.sequences[:, :-1], new], 1)  # more new tokens than the cache has seen, too
        whole = model.generate(sequence, max_new_tokens=4, **kwargs)
        first = model.generate(ids, max_new_tokens=2, **kwargs)
        rest = model.generate(new, attention_mask=torch.ones_like(sequence), cache_params=first.past_key_values,
                              max_new_tokens=4, **kwargs)
        assert torch.equal(rest.sequences[:, new.shape[1]:], whole.sequences[:, sequence.shape[1]:])
        torch.testing.assert_close(torch.stack(rest.scores), torch.stack(whole.scores), atol=1e-5, rtol=0)


def test_generate_in_training_mode_with_gradient_checkpointing_keeps_its_cache():
    model = tiny_model(chunk_size=3)
    ids = torch.randint(2, 64, (2, 5))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True,
                  output_logits=True)
    expected = model.generate(ids, **kwargs)
    model.train()
    model.gradient_checkpointing_enable()
    got = model.generate(ids, **kwargs)  # as RL loops do: a model in training mode, generating under no_grad
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cannot be used in a gradient-checkpointed forward"):
        model(ids, cache_params=got.past_key_values)  # a backward would replay the steps and advance it twice
    model(ids, labels=ids).loss.backward()  # training itself runs without a cache


def test_output_attentions_is_refused_clearly():
    model = tiny_model()
    with pytest.raises(ValueError, match="no attention layers"):
        model.generate(torch.randint(2, 64, (1, 3)), max_new_tokens=2, pad_token_id=0, output_attentions=True,
                       return_dict_in_generate=True)


def test_cache_size_is_constant():
    model = tiny_model(chunk_size=4, pooling="mean")
    ids = torch.randint(2, 64, (1, 5))
    sizes = []
    for n in (10, 500):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        assert out.sequences.shape[1] == 5 + n
        cache = out.past_key_values  # generate() returns the cache_params object under this name
        sizes.append(cache.nbytes())
        assert int(cache.position[0]) in (5 + n - 1, 5 + n)  # the last token need not be fed back
    assert sizes[0] == sizes[1] > 0


@pytest.mark.parametrize("chunk_size,pooling,use_bias", [(3, "last", False), (4, "mean", False), (1, "last", False),
                                                       (5, "last", True)])
def test_left_padded_batch_equals_each_prompt_alone(chunk_size, pooling, use_bias):
    model = tiny_model(chunk_size=chunk_size, pooling=pooling, use_bias=use_bias)
    with torch.no_grad():  # with biases, an empty chunk slot's H output is not zero (the 3-token row has none yet)
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_()
    torch.manual_seed(1)
    prompts = [torch.randint(2, 64, (n,)) for n in (3, 8, 5, 11)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                  output_logits=True)
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    with torch.no_grad():
        padded_logits = model(ids, attention_mask=mask).logits
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kwargs)
        assert torch.equal(batched.sequences[i, width:], alone.sequences[0, len(p):]), i
        torch.testing.assert_close(torch.stack(batched.logits)[:, i], torch.stack(alone.logits)[:, 0], atol=1e-5,
                                   rtol=0)
        with torch.no_grad():
            alone_logits = model(p[None]).logits
        torch.testing.assert_close(padded_logits[i, width - len(p):], alone_logits[0], atol=1e-5, rtol=0)


def test_right_padded_prefill_into_cache_is_refused_but_scoring_works():
    model = tiny_model()
    ids = torch.randint(2, 64, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with pytest.raises(ValueError, match="left-padded"):
        model(ids, attention_mask=mask, use_cache=True)
    with torch.no_grad():  # eval-mode scoring of a right-padded batch (no cache asked for) just works
        out = model(ids, attention_mask=mask, labels=ids)
        alone = model(ids[:1, :4]).logits
    assert out.cache_params is None
    torch.testing.assert_close(out.logits[:1, :4], alone, atol=1e-5, rtol=0)


def test_sampling_and_num_return_sequences():
    model = tiny_model(chunk_size=2)
    ids = torch.randint(2, 64, (2, 5))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=9, min_new_tokens=9, do_sample=True,
                  top_k=20, temperature=1.3, num_return_sequences=3, pad_token_id=0)
    torch.manual_seed(7)
    a = model.generate(ids, **kwargs)
    torch.manual_seed(7)
    b = model.generate(ids, **kwargs)
    assert a.shape == (6, 14) and torch.equal(a, b)
    assert torch.equal(a[:, :5], ids.repeat_interleave(3, 0))
    assert len({tuple(r.tolist()) for r in a[:3]}) > 1  # samples differ


def test_beam_search_reorders_every_state():
    model = tiny_model(chunk_size=3, pooling="mean")
    ids = torch.randint(2, 64, (2, 7))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10, num_beams=3,
                  do_sample=False, pad_token_id=0, early_stopping=True)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_cache_from_another_batch_is_refused():
    model = tiny_model()
    out = model(torch.randint(2, 64, (2, 4)), use_cache=True)
    with pytest.raises(ValueError, match="cache_params holds 2 rows but the input has 3"):
        model(torch.randint(2, 64, (3, 1)), cache_params=out.cache_params)


def _left_padded_batch(lengths=(3, 8, 5)):
    torch.manual_seed(1)
    width = max(lengths)
    ids, mask = torch.zeros(len(lengths), width, dtype=torch.long), torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:], mask[i, width - n:] = torch.randint(2, 64, (n,)), 1
    return ids, mask


def _greedy_scores(model, ids, mask, tokens=10):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


def test_compile_decode_traces_one_graph_that_every_block_and_step_reuses():
    """compile_decode compiles HMambaBlock.step once: L, H and out blocks of one model, at every token (rows of a
    left-padded batch completing chunks at different steps included), run the same graph."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = tiny_model(chunk_size=3, pooling="mean")
    ids, mask = _left_padded_batch()
    eager = _greedy_scores(model, ids, mask)
    counter = CompileCounter()
    try:
        assert model.compile_decode(backend=counter) is model
        compiled = _greedy_scores(model, ids, mask)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1 and counter.op_count > 10
    assert torch.equal(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-6, rtol=0)
    copy = pickle.loads(pickle.dumps(model))  # torch.save / spawn: the compiled step is dropped, not pickled
    assert all(b.compiled_step is None for b in copy.backbone.modules() if hasattr(b, "compiled_step"))
    assert torch.equal(_greedy_scores(copy, ids, mask)[0], eager[0])
    model.compile_decode(False)
    assert all(b.compiled_step is None for b in model.backbone.modules() if hasattr(b, "compiled_step"))


def test_compile_decode_traces_the_row_split_product():
    """A weight of 2**20 elements splits over threads (`linear`); under compile_decode that bmm is in the one graph
    (the thread count is read as a constant), not a graph break around every projection."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    threads = torch.get_num_threads()
    torch._dynamo.reset()
    torch.set_num_threads(2)
    try:
        model = tiny_model(hidden_size=512, num_low_layers=1, num_high_layers=1, num_out_layers=0, chunk_size=1)
        assert model.backbone.low_layers[0].mixer.in_proj.weight.numel() == 2**20
        ids = torch.randint(2, 64, (1, 4))
        eager = _greedy_scores(model, ids, torch.ones_like(ids), tokens=4)
        compiled = _greedy_scores(model.compile_decode(backend=backend), ids, torch.ones_like(ids), tokens=4)
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    assert len(graphs) == 1
    assert any(node.target is torch.bmm for node in graphs[0].graph.nodes)
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-5, rtol=0)


def test_decode_steps_run_mixer_hooks():
    """Each generated token goes through the mixer's __call__, so forward hooks on it (activation capture, device
    placement) see every step. Under compile_decode a block with a hook inside steps eagerly: the one graph that
    serves every block does not guard on hooks, so a hook on one block would otherwise leak into the others (or be
    dropped)."""
    from torch._dynamo.testing import CompileCounter

    model = tiny_model(chunk_size=1)
    ids = torch.randint(2, 64, (2, 5))
    plain = _greedy_scores(model, ids, torch.ones_like(ids), tokens=6)[1]
    calls = []
    hook = model.backbone.low_layers[0].mixer.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    _greedy_scores(model, ids, torch.ones_like(ids), tokens=6)
    assert calls == [(2, 5, 16)] + [(2, 1, 16)] * 5  # the prompt, then one call per fed-back token
    hook.remove()
    model.backbone.low_layers[0].mixer.register_forward_hook(lambda m, args, out: 2 * out)
    eager = _greedy_scores(model, ids, torch.ones_like(ids), tokens=6)[1]
    counter = CompileCounter()
    torch._dynamo.reset()
    try:
        compiled = _greedy_scores(model.compile_decode(backend=counter), ids, torch.ones_like(ids), tokens=6)[1]
        model.backbone.out_layers[0].mixer.out_proj.register_forward_pre_hook(lambda m, args: (args[0] * 0,))
        eager_late = _greedy_scores(model.compile_decode(False), ids, torch.ones_like(ids), tokens=6)[1]
        compiled_late = _greedy_scores(model.compile_decode(backend=counter), ids, torch.ones_like(ids), tokens=6)[1]
    finally:
        torch._dynamo.reset()
    assert not torch.allclose(eager, plain, atol=1e-3) and not torch.allclose(eager_late, eager, atol=1e-3)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)
    torch.testing.assert_close(compiled_late, eager_late, atol=1e-6, rtol=0)  # a hook added after compiling
    assert counter.frame_count == 1  # the blocks without hooks still share one graph


def test_mixer_refuses_a_continuing_cache_without_its_states():
    model = tiny_model()
    cache = model(torch.randint(2, 64, (1, 4)), use_cache=True).cache_params
    with pytest.raises(ValueError, match="one token at a time"):
        model.backbone.low_layers[0].mixer(torch.randn(1, 1, 16), cache)


@pytest.mark.skipif(not has_cxx_compiler(),
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler: none on PATH or in CXX")
def test_compile_decode_with_inductor_equals_eager():
    """The real compiled kernels (inductor) give eager's logits at every generated token, through the H-stack's
    partial-batch path, and the same greedy tokens."""
    torch._dynamo.reset()
    model = tiny_model(chunk_size=2, pooling="last")
    ids, mask = _left_padded_batch((4, 7))
    eager = _greedy_scores(model, ids, mask)
    try:
        compiled = _greedy_scores(model.compile_decode(), ids, mask)
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-5, rtol=1e-5)


def test_compile_decode_runs_lora_wrapped_projections():
    """A PEFT LoRA projection is traced as itself inside the compiled step: its update changes the output, and the
    compiled step equals the eager one."""
    from peft import LoraConfig, get_peft_model
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = tiny_model(chunk_size=3)
    ids, mask = _left_padded_batch()
    plain = _greedy_scores(model, ids, mask)[1]
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["x_proj", "out_proj"], init_lora_weights=False))
    eager = _greedy_scores(lora, ids, mask)
    counter = CompileCounter()
    try:
        lora.base_model.model.compile_decode(backend=counter)
        compiled = _greedy_scores(lora, ids, mask)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1
    assert not torch.allclose(eager[1], plain, atol=1e-3)
    assert torch.equal(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-6, rtol=0)
