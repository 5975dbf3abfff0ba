"""The model: config validation, flat-Mamba equivalence, causality, chunk rate, scan, HF conventions."""

import random
import threading

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, MambaConfig, MambaForCausalLM

from hmamba import HMambaConfig, HMambaForCausalLM, HMambaModel
from hmamba.modeling_hmamba import causal_conv1d, causal_conv1d_update, linear, selective_scan

from conftest import flat_mamba_to_hmamba, tiny_config, tiny_model


# ---- config ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,needle", [
    ("chunk_size", 0, "chunk_size=0 is invalid: chunk_size must be an integer >= 1"),
    ("chunk_size", -2, "chunk_size must be an integer >= 1"),
    ("num_low_layers", -1, "num_low_layers must be an integer >= 0"),
    ("pooling", "max", "pooling must be one of ('last', 'mean')"),
    ("hidden_size", 0, "hidden_size must be an integer >= 1"),
    ("time_step_rank", 0, "time_step_rank"),
    ("intermediate_size", 100, "intermediate_size=100 is invalid: intermediate_size must be expand"),
])
def test_config_rejects_invalid_values(field, value, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(**{field: value})


def test_config_accepts_the_derived_intermediate_size():  # as a MambaConfig-style dict may hold it
    assert tiny_config(intermediate_size=32).intermediate_size == 32


def test_config_needs_a_layer():
    with pytest.raises(ValueError, match="needs a layer"):
        tiny_config(num_low_layers=0, num_high_layers=0, num_out_layers=0)


def test_config_fields_are_checked_whenever_they_are_set(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="chunk_size=0 is invalid"):
        AutoConfig.from_pretrained(tmp_path, chunk_size=0)  # from_pretrained's overrides are set after __init__
    config = AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pooling='max' is invalid"):
        config.pooling = "max"
    config.num_low_layers = config.num_high_layers = 0  # each valid alone; together no L or H layer is left
    with pytest.raises(ValueError, match="needs an L or H layer"):
        HMambaForCausalLM(config)


def test_num_hidden_layers_and_intermediate_size_are_derived():
    config = tiny_config(num_low_layers=2, num_high_layers=1, num_out_layers=1)
    assert config.num_hidden_layers == 4
    config.hidden_size = 24
    assert config.intermediate_size == 48 and HMambaForCausalLM(config).backbone.low_layers[0].mixer.D.shape == (48,)
    assert tiny_config(num_low_layers=2, num_high_layers=2, num_out_layers=0, num_hidden_layers=4).num_hidden_layers == 4
    with pytest.raises(ValueError, match="num_hidden_layers=3: it is num_low_layers \\+ num_high_layers"):
        AutoConfig.for_model("hmamba", num_low_layers=2, num_high_layers=2, num_hidden_layers=3)


def test_config_round_trip(tmp_path):
    config = tiny_config(chunk_size=5, pooling="mean", time_step_rank="auto")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, HMambaConfig)
    assert (loaded.chunk_size, loaded.pooling, loaded.time_step_rank, loaded.intermediate_size) == (5, "mean", 1, 32)


# ---- chunk_size=1 is a flat Mamba -----------------------------------------------------------------------

@pytest.mark.parametrize("split", [(2, 3, 0), (0, 5, 0), (5, 0, 0), (1, 2, 2)])
def test_chunk_size_1_equals_transformers_mamba(split):
    nl, nh, no = split
    torch.manual_seed(0)
    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=5,
                                         expand=2, conv_kernel=4)).eval()
    with torch.no_grad():
        for name, p in mamba.named_parameters():
            if name.endswith(("A_log", "D", "norm.weight")):
                p.add_(0.3 * torch.randn_like(p))
    hm = HMambaForCausalLM(tiny_config(num_low_layers=nl, num_high_layers=nh, num_out_layers=no, chunk_size=1)).eval()
    hm.load_state_dict(flat_mamba_to_hmamba(mamba.state_dict(), nl, nh), strict=True)
    ids = torch.randint(0, 64, (2, 23))
    with torch.no_grad():
        ref = mamba(ids, output_hidden_states=True)
        out = hm(ids, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    assert len(out.hidden_states) == len(ref.hidden_states) == 6
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---- causality and chunk rate ---------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size,pooling", [(1, "last"), (2, "mean"), (3, "last"), (4, "mean"), (5, "last")])
def test_strict_causality(chunk_size, pooling):
    model = tiny_model(chunk_size=chunk_size, pooling=pooling)
    rng = random.Random(chunk_size)
    for _ in range(6):
        length = rng.randint(2, 4 * chunk_size + 3)
        t = rng.randrange(length - 1)
        ids = torch.randint(0, 64, (2, length))
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(0, 64, (2, length - t - 1))
        with torch.no_grad():
            a, b = model(ids).logits, model(changed).logits
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=0, rtol=0)
        assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 0  # the future does reach later positions


def test_future_tokens_reach_the_h_stack_only_after_their_chunk_completes():
    # a token's change reaches the tokens' H update only once its chunk (positions 4..7) is complete
    model = tiny_model(chunk_size=4, num_low_layers=1, num_high_layers=2, num_out_layers=0)
    ids = torch.randint(0, 64, (1, 12))
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % 64
    with torch.no_grad():
        a, b = model(ids, output_hidden_states=True), model(changed, output_hidden_states=True)
    h_a, h_b = a.hidden_states[2], b.hidden_states[2]  # after H layer 1, token rate
    l_a, l_b = a.hidden_states[0], b.hidden_states[0]
    # the H update differs from position 7 (end of chunk 1) on, not at 5 or 6
    upd_a, upd_b = h_a - l_a, h_b - l_b
    torch.testing.assert_close(upd_a[:, :7], upd_b[:, :7], atol=1e-6, rtol=0)  # (x + u) - x rounds
    assert (upd_a[:, 7:] - upd_b[:, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("length,chunk_size", [(17, 4), (16, 4), (3, 4), (25, 1), (9, 3)])
def test_h_stack_runs_on_complete_chunks_only(length, chunk_size):
    model = tiny_model(chunk_size=chunk_size)
    seen = []
    model.backbone.high_layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        model(torch.randint(0, 64, (2, length)))
    expected = length // chunk_size
    assert seen == ([expected] if expected else [])
    assert expected <= -(-length // chunk_size) and (chunk_size == 1 or expected < length)


def test_mean_and_last_pooling_differ():
    ids = torch.randint(0, 64, (1, 12))
    a = tiny_model(pooling="last")
    b = tiny_model(pooling="mean")
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    torch.testing.assert_close(la[:, :2], lb[:, :2])  # before the first complete chunk, no H update at all
    assert (la[:, 2:] - lb[:, 2:]).abs().max() > 1e-4


# ---- selective scan -------------------------------------------------------------------------------------

def reference_scan(u, delta, A, B, C, D, z, h0=None):
    """The Mamba recurrence, one step at a time, plain autograd (layouts as mamba_ssm)."""
    delta = F.softplus(delta)
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1]) if h0 is None else h0
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1) + u * D[:, None]
    return y * F.silu(z), h


@pytest.mark.parametrize("length", [1, 7, 300])
def test_selective_scan_matches_reference_forward_and_backward(length):
    torch.manual_seed(length)
    b, d, n = 2, 6, 3
    inputs = dict(u=torch.randn(b, d, length), delta=torch.randn(b, d, length), A=-torch.rand(d, n) * 3,
                  B=torch.randn(b, n, length), C=torch.randn(b, n, length), D=torch.randn(d), z=torch.randn(b, d, length))
    h0 = torch.randn(b, d, n)
    ref_inputs = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    ref_h0 = h0.clone().requires_grad_()
    our_inputs = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    our_h0 = h0.clone().requires_grad_()
    y_ref, h_ref = reference_scan(**ref_inputs, h0=ref_h0)
    y, h = selective_scan(**our_inputs, delta_softplus=True, return_last_state=True, initial_state=our_h0)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-4)
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    ((y_ref * gy).sum() + (h_ref * gh).sum()).backward()
    ((y * gy).sum() + (h * gh).sum()).backward()
    for k in inputs:
        torch.testing.assert_close(our_inputs[k].grad, ref_inputs[k].grad, atol=1e-4, rtol=1e-3, msg=k)
    torch.testing.assert_close(our_h0.grad, ref_h0.grad, atol=1e-4, rtol=1e-3)


def test_interleaved_scans_keep_their_own_gradients():
    """The scan's block buffers are a workspace shared by every call in a thread: a second forward between a
    forward and its backward (as in any multi-layer model) must not change the first one's gradients."""
    torch.manual_seed(0)
    b, d, n, length = 1, 4, 3, 40

    def inputs():
        return dict(u=torch.randn(b, d, length), delta=torch.randn(b, d, length), A=-torch.rand(d, n) * 3,
                    B=torch.randn(b, n, length), C=torch.randn(b, n, length), D=torch.randn(d),
                    z=torch.randn(b, d, length))

    first, second = inputs(), inputs()
    grads = []
    for run in ("alone", "interleaved"):
        ours = {k: v.clone().requires_grad_() for k, v in first.items()}
        y = selective_scan(**ours, delta_softplus=True)
        if run == "interleaved":
            other = {k: v.clone().requires_grad_() for k, v in second.items()}
            selective_scan(**other, delta_softplus=True).sum().backward()
        y.square().sum().backward()
        grads.append({k: v.grad for k, v in ours.items()})
    for k in first:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=0, atol=0, msg=k)


def test_ops_accept_channel_and_token_major_layouts():
    """in_proj's output reaches the ops as a (B, D, T) view of token-major memory; the results must not depend on
    the layout, and the conv must equal torch's depthwise causal conv and its one-step update."""
    torch.manual_seed(0)
    b, d, length, width = 2, 5, 9, 4
    x_token_major = torch.randn(b, length, d)
    weight, bias = torch.randn(d, width), torch.randn(d)
    reference = F.silu(F.conv1d(x_token_major.transpose(1, 2), weight[:, None], bias, padding=width - 1, groups=d)[
        ..., :length])
    for x in (x_token_major.transpose(1, 2), x_token_major.transpose(1, 2).contiguous()):
        torch.testing.assert_close(causal_conv1d(x, weight, bias, "silu"), reference)
    state = torch.zeros(b, d, width)
    steps = [causal_conv1d_update(x_token_major[:, t], state, weight, bias, "silu") for t in range(length)]
    torch.testing.assert_close(torch.stack(steps, -1), reference)

    n = 3
    u, delta = torch.randn(b, length, d), torch.randn(b, length, d)
    A, B, C = -torch.rand(d, n), torch.randn(b, n, length), torch.randn(b, n, length)
    channel_major = selective_scan(u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A, B, C,
                                   delta_softplus=True)
    token_major = selective_scan(u.transpose(1, 2), delta.transpose(1, 2), A, B, C, delta_softplus=True)
    torch.testing.assert_close(token_major, channel_major)


@pytest.mark.parametrize("shape", [(1, 1024), (3, 1, 1024), (16, 1024), (17, 1024), (2, 40, 1024)])
@pytest.mark.parametrize("bias", [False, True])
def test_row_split_linear_equals_the_module(monkeypatch, shape, bias):
    """Few-row float32 products on CPU run as one batched product over row blocks, one per thread (decode streams
    every weight at the memory's bandwidth that way): same result as the module, and taken exactly when it
    should be (few rows, a large plain nn.Linear, several threads)."""
    torch.manual_seed(0)
    module = torch.nn.Linear(1024, 1024, bias=bias)
    x = torch.randn(*shape)
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or bmm(*a))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = linear(module, x)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(y, module(x), atol=1e-5, rtol=1e-5)
    rows = x.numel() // x.shape[-1]
    assert len(calls) == (1 if rows <= 16 else 0)
    calls.clear()
    torch.set_num_threads(1)
    try:
        torch.testing.assert_close(linear(module, x), module(x))
    finally:
        torch.set_num_threads(threads)
    assert not calls  # one thread: nothing to split


def test_row_split_linear_leaves_hooked_modules_and_empty_inputs_to_the_module(monkeypatch):
    module, seen = torch.nn.Linear(1024, 1024), []
    module.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: pytest.fail("a hooked module must run its own forward"))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        linear(module, torch.randn(1, 1024))
        monkeypatch.setattr(torch, "bmm", bmm)
        assert linear(torch.nn.Linear(1024, 1024), torch.randn(0, 1024)).shape == (0, 1024)
    finally:
        torch.set_num_threads(threads)
    assert seen == [(1, 1024)]


def test_inference_mode_then_training_in_the_same_thread():
    """The scan's workspace outlives a call: one made under torch.inference_mode must not make later ordinary
    passes (training, no_grad) fail on an in-place update to an inference tensor."""
    errors = []

    def run():  # a fresh thread: a fresh workspace, first allocated under inference mode
        try:
            model = tiny_model()
            ids = torch.randint(0, 64, (2, 24))
            with torch.inference_mode():
                model(ids)
            with torch.no_grad():
                model(ids)
            model(ids, labels=ids).loss.backward()
        except Exception as e:  # noqa: BLE001  (reported to the test's thread)
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert not errors, errors


# ---- transformers conventions ---------------------------------------------------------------------------

def test_loss_is_shifted_cross_entropy(model):
    ids = torch.randint(0, 64, (2, 11))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_logits_to_keep_and_return_dict(model):
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
        picked = model(ids, logits_to_keep=torch.tensor([0, 4])).logits
        as_tuple = model(ids, return_dict=False, use_cache=False)
    assert last.shape == (2, 1, 64)
    torch.testing.assert_close(last, full[:, -1:])
    torch.testing.assert_close(picked, full[:, [0, 4]])
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], full)


def test_inputs_embeds_equals_input_ids(model):
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        a = model(ids).logits
        b = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids, inputs_embeds=model.get_input_embeddings()(ids))


def test_tied_embeddings_and_init(model):
    assert model.lm_head.weight is model.backbone.embeddings.weight
    fresh = HMambaForCausalLM(tiny_config(state_size=5))
    mixer = fresh.backbone.high_layers[0].mixer
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1, 6.0)).expand(32, -1))
    torch.testing.assert_close(mixer.D, torch.ones(32))
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6  # dt in [time_step_min, time_step_max]
    assert set(fresh._no_split_modules) == {"HMambaBlock"} and fresh.supports_gradient_checkpointing
    assert fresh.config_class is HMambaConfig and fresh.base_model_prefix == "backbone"


def test_auto_classes():
    kwargs = {k: v for k, v in tiny_config().to_diff_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("hmamba", **kwargs)
    assert isinstance(AutoModel.from_config(config), HMambaModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), HMambaForCausalLM)


def _saved_bytes(model, ids):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids).loss.backward()
    return total


def test_gradient_checkpointing_same_gradients_less_memory():
    model = tiny_model(num_low_layers=3, num_high_layers=3, num_out_layers=2).train()
    ids = torch.randint(0, 64, (2, 40))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, plain_bytes = grads(), _saved_bytes(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed, ckpt_bytes = grads(), _saved_bytes(model, ids)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert ckpt_bytes < 0.5 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_no_mamba_ssm_import_on_cpu():
    import sys

    assert "mamba_ssm" not in sys.modules and "causal_conv1d" not in sys.modules
