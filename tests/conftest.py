import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the Hub

import hmamba  # noqa: E402  (registers the Auto classes)
from hmamba import HMambaConfig, HMambaForCausalLM  # noqa: E402


def tiny_config(**overrides):
    kwargs = dict(vocab_size=64, hidden_size=16, state_size=4, expand=2, conv_kernel=4, num_low_layers=2,
                  num_high_layers=2, num_out_layers=1, chunk_size=3, pooling="last", pad_token_id=0,
                  eos_token_id=1, bos_token_id=None)
    kwargs.update(overrides)
    return HMambaConfig(**kwargs)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = HMambaForCausalLM(tiny_config(**overrides)).eval()
    # random (not init-time) A_log, D and norms so that every parameter matters in comparisons
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "D", "norm.weight", "norm_f.weight")):
                p.add_(0.3 * torch.randn_like(p))
    return model


def flat_mamba_to_hmamba(state, num_low, num_high):
    """transformers MambaForCausalLM state dict -> HMamba names (layers split into L, H, out)."""
    out = {}
    for key, value in state.items():
        if key.startswith("backbone.layers."):
            i, rest = key[len("backbone.layers."):].split(".", 1)
            i = int(i)
            stack, j = (("low_layers", i) if i < num_low else ("high_layers", i - num_low) if i < num_low + num_high
                        else ("out_layers", i - num_low - num_high))
            out[f"backbone.{stack}.{j}.{rest}"] = value
        else:
            out[key] = value
    return out


@pytest.fixture
def model():
    return tiny_model()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device and the mamba_ssm / causal_conv1d kernels")
