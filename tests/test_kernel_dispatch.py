"""The one dispatch point `ops_for`: CUDA tensors get the mamba_ssm / causal_conv1d kernels per op (those that
import), everything else the PyTorch path, and wrapped projections force the unfused path.

No CUDA here, so stand-ins with the kernels' signatures are installed as the modules the dispatch imports; they
record their calls. Two sets: mamba_ssm's and causal_conv1d's own reference functions (selective_scan_ref,
mamba_inner_ref, ..., read from their installed sources: tests/mamba_ssm_refs.py), which check the dispatch's
arguments against the real kernels' signatures and its results against an independent implementation; and stand-ins
on the PyTorch ops, which need nothing installed. The real kernels are compared in test_cuda_kernels.py."""

import sys
import types
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from mamba_ssm_refs import MISSING, reference_kernels
from hmamba import modeling_hmamba as modeling
from hmamba.modeling_hmamba import TorchOps


class FlaggedCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: what ops_for looks at."""

    @property
    def is_cuda(self):
        return True


def pytorch_stand_ins(calls):
    """{op: stand-in} with the mamba_ssm / causal_conv1d signatures, computing with the PyTorch ops."""

    def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                         final_states_out=None, activation=None):
        calls["causal_conv1d"] += 1
        return TorchOps.causal_conv1d(x, weight, bias, activation)

    def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None):
        calls["causal_conv1d_update"] += 1
        return TorchOps.causal_conv1d_update(x, conv_state, weight, bias, activation)

    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
        calls["selective_scan"] += 1
        return TorchOps.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                               state_batch_indices=None):
        calls["selective_state_update"] += 1
        return TorchOps.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)

    def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                       out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None,
                       C_proj_bias=None, delta_softplus=True, checkpoint_lvl=1):
        calls["mamba_inner"] += 1  # as mamba_ssm's mamba_inner_ref, on the PyTorch ops
        rank, d_state = delta_proj_weight.shape[1], A.shape[-1]
        x, z = xz.chunk(2, dim=1)
        x = TorchOps.causal_conv1d(x, conv1d_weight.squeeze(1), conv1d_bias, "silu")
        x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)  # (B, L, rank + 2N)
        delta = (x_dbl[..., :rank] @ delta_proj_weight.t()).transpose(1, 2)
        B, C = x_dbl[..., rank:rank + d_state].transpose(1, 2), x_dbl[..., -d_state:].transpose(1, 2)
        y = TorchOps.selective_scan(x, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)

    return dict(causal_conv1d=causal_conv1d_fn, causal_conv1d_update=causal_conv1d_update,
                selective_scan=selective_scan_fn, selective_state_update=selective_state_update,
                mamba_inner=mamba_inner_fn)


def fake_kernel_modules(kernels):
    """Module name -> fake module holding `kernels` ({op: function}) where the dispatch imports them from."""
    conv = types.ModuleType("causal_conv1d")
    conv.causal_conv1d_fn, conv.causal_conv1d_update = kernels["causal_conv1d"], kernels["causal_conv1d_update"]
    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.selective_scan_fn, interface.mamba_inner_fn = kernels["selective_scan"], kernels["mamba_inner"]
    state_update = types.ModuleType("mamba_ssm.ops.triton.selective_state_update")
    state_update.selective_state_update = kernels["selective_state_update"]
    return {"causal_conv1d": conv, "mamba_ssm": types.ModuleType("mamba_ssm"),
            "mamba_ssm.ops": types.ModuleType("mamba_ssm.ops"), "mamba_ssm.ops.selective_scan_interface": interface,
            "mamba_ssm.ops.triton": types.ModuleType("mamba_ssm.ops.triton"),
            "mamba_ssm.ops.triton.selective_state_update": state_update}


STAND_INS = {"mamba_ssm references": reference_kernels, "pytorch stand-ins": pytorch_stand_ins}


@pytest.fixture(params=list(STAND_INS))
def kernels(request, monkeypatch):
    """Stand-in kernels importable, and every tensor routed as if on CUDA; yields the call counter."""
    calls = Counter()
    stand_ins = STAND_INS[request.param](calls)
    if stand_ins is None:
        pytest.skip(MISSING)
    for name, module in fake_kernel_modules(stand_ins).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(modeling, "_KERNEL_OPS", {})
    monkeypatch.setattr(modeling, "ops_for", lambda tensor: modeling.kernel_ops())
    return calls


def test_cpu_tensors_take_the_pytorch_path_without_importing_kernels(monkeypatch):
    def no_import(name):
        raise AssertionError(f"imported {name} for a CPU tensor")

    monkeypatch.setattr(modeling, "load_kernel", no_import)
    monkeypatch.setattr(modeling, "_KERNEL_OPS", {})
    assert modeling.ops_for(torch.zeros(1)) is TorchOps
    model = tiny_model(chunk_size=2)
    ids = torch.randint(2, 64, (1, 9))
    with torch.no_grad():
        out = model(ids[:, :5], use_cache=True)
        model(ids[:, 5:], cache_params=out.cache_params, use_cache=True)  # prefill and decode, no import


def test_cuda_tensors_get_each_kernel_that_imports(monkeypatch):
    modules = fake_kernel_modules(pytorch_stand_ins(Counter()))
    monkeypatch.setitem(sys.modules, "causal_conv1d", modules["causal_conv1d"])
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # as on a machine where mamba_ssm is missing
    monkeypatch.setattr(modeling, "_KERNEL_OPS", {})
    ops = modeling.ops_for(torch.zeros(1).as_subclass(FlaggedCuda))
    assert ops.causal_conv1d is modules["causal_conv1d"].causal_conv1d_fn
    assert ops.causal_conv1d_update is modules["causal_conv1d"].causal_conv1d_update
    assert ops.selective_scan is TorchOps.selective_scan  # mamba_ssm missing: that op stays PyTorch
    assert ops.selective_state_update is TorchOps.selective_state_update
    assert ops.mamba_inner is None


def pytorch_path(fn):
    """fn() with every tensor routed to the PyTorch ops, as on a machine without kernels."""
    modeling.ops_for, saved = (lambda tensor: TorchOps), modeling.ops_for
    try:
        return fn()
    finally:
        modeling.ops_for = saved


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_plain_projections_take_the_fused_kernel(kernels):
    model = tiny_model(chunk_size=3)
    ids = torch.randint(2, 64, (2, 10))
    logits, grads = loss_and_grads(model, ids)  # routed to the stand-ins: compared with the PyTorch path below
    assert kernels["mamba_inner"] == 5 and kernels["selective_scan"] == 0  # 5 layers, each fused
    ref_logits, ref_grads = pytorch_path(lambda: loss_and_grads(model, ids))
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_cached_prefill_and_decode_use_the_unfused_kernels(kernels):
    model = tiny_model(chunk_size=2)
    ids = torch.randint(2, 64, (1, 8))
    with torch.no_grad():
        full = model(ids).logits
        kernels.clear()
        out = model(ids[:, :5], use_cache=True)  # a fresh cache needs the final states: no fused kernel
        assert kernels["mamba_inner"] == 0 and kernels["selective_scan"] == 5 and kernels["causal_conv1d"] == 5
        steps = [out.logits]
        for t in range(5, 8):
            out = model(ids[:, t : t + 1], cache_params=out.cache_params, use_cache=True)
            steps.append(out.logits)
    assert kernels["causal_conv1d_update"] > 0 and kernels["selective_state_update"] == kernels["causal_conv1d_update"]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("target", ["x_proj", "dt_proj", "out_proj", "in_proj"])
def test_wrapped_projection_forces_the_unfused_path(kernels, target):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(chunk_size=3)
    ids = torch.randint(2, 64, (2, 9))
    with torch.no_grad():
        base = model(ids, use_cache=False).logits
    model = get_peft_model(model, LoraConfig(r=2, target_modules=[target], init_lora_weights=False))
    kernels.clear()
    with torch.no_grad():
        lora = model(ids, use_cache=False).logits
    assert kernels["mamba_inner"] == 0 and kernels["selective_scan"] == 5
    assert not torch.allclose(lora, base, atol=1e-4)  # the adapter took effect
    with torch.no_grad():
        torch.testing.assert_close(lora, pytorch_path(lambda: model(ids, use_cache=False).logits), atol=1e-5, rtol=1e-5)
