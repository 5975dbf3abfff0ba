"""On CUDA with mamba_ssm / causal_conv1d installed: the kernel path equals the PyTorch path (forward, backward,
cached decode), and chunk_size=1 HMamba equals mamba_ssm's MambaLMHeadModel on the same weights."""

import importlib.util

import pytest
import torch

from conftest import tiny_model
from hmamba import modeling_hmamba as modeling
from hmamba.modeling_hmamba import TorchOps


def _kernels_importable():
    if not torch.cuda.is_available():
        return False
    try:
        import causal_conv1d  # noqa: F401
        import mamba_ssm  # noqa: F401
    except Exception:
        return False
    return True


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(
        not (importlib.util.find_spec("mamba_ssm") and importlib.util.find_spec("causal_conv1d"))
        or not _kernels_importable(),
        reason="mamba_ssm / causal_conv1d not importable (pip install 'hmamba[cuda]', see README 'CUDA kernels')",
    ),
]

TOLERANCE = {torch.float32: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


def pytorch_path(monkeypatch):
    monkeypatch.setattr(modeling, "ops_for", lambda tensor: TorchOps)


def cuda_model(dtype, **overrides):
    overrides = {"hidden_size": 64, "state_size": 16, **overrides}
    return tiny_model(**overrides).to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_is_picked(dtype):
    ops = modeling.ops_for(torch.zeros(1, device="cuda", dtype=dtype))
    for op in modeling.KERNELS:
        assert getattr(ops, op) is not getattr(TorchOps, op), f"{op} fell back to PyTorch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_match_the_pytorch_path(dtype, monkeypatch):
    model = cuda_model(dtype).train()
    ids = torch.randint(2, 64, (2, 33), device="cuda")
    results = []
    for use_kernels in (True, False):
        if not use_kernels:
            pytorch_path(monkeypatch)
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.float(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (logits_k, grads_k), (logits_t, grads_t) = results
    torch.testing.assert_close(logits_k, logits_t, **TOLERANCE[dtype])
    for name in grads_t:
        scale = grads_t[name].abs().max().clamp(min=1e-6)
        torch.testing.assert_close(grads_k[name] / scale, grads_t[name] / scale, **TOLERANCE[dtype], msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 3])
def test_cached_decode_matches_the_pytorch_path(dtype, chunk_size, monkeypatch):
    model = cuda_model(dtype, chunk_size=chunk_size)
    ids = torch.randint(2, 64, (2, 20), device="cuda")

    def decode():
        with torch.no_grad():
            out = model(ids[:, :7], use_cache=True)
            steps = [out.logits]
            for t in range(7, ids.shape[1]):
                out = model(ids[:, t : t + 1], cache_params=out.cache_params, use_cache=True)
                steps.append(out.logits)
        return torch.cat(steps, 1).float()

    kernels = decode()
    pytorch_path(monkeypatch)
    torch.testing.assert_close(kernels, decode(), **TOLERANCE[dtype])


def test_chunk_size_1_matches_mamba_ssm_lm_head_model():
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    from conftest import flat_mamba_to_hmamba

    torch.manual_seed(0)
    reference = MambaLMHeadModel(MambaConfig(d_model=64, n_layer=4, vocab_size=64, ssm_cfg={"layer": "Mamba1"},
                                             rms_norm=True, residual_in_fp32=True, fused_add_norm=False,
                                             pad_vocab_size_multiple=1), device="cuda").eval()
    model = tiny_model(hidden_size=64, state_size=16, chunk_size=1, num_low_layers=2, num_high_layers=2,
                       num_out_layers=0).to("cuda").eval()
    # mamba_ssm names: backbone.layers.i.{norm,mixer}, backbone.embedding, backbone.norm_f, lm_head
    state = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in reference.state_dict().items()}
    missing, unexpected = model.load_state_dict(flat_mamba_to_hmamba(state, 2, 2), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(2, 64, (2, 40), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, reference(ids).logits.float(),
                                   atol=2e-3, rtol=2e-3)
