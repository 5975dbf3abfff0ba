import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the Hub

import hmamba  # noqa: E402  (registers the Auto classes)
from hmamba import HMambaConfig, HMambaForCausalLM  # noqa: E402

# Hypothesis profiles (tests/test_properties.py): "ci" (default) keeps the property suite well under a minute on
# 2 cores; HYPOTHESIS_PROFILE=thorough searches much longer. No deadline: CPU timings on shared machines vary.
settings.register_profile("ci", max_examples=25, deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Replaces the Hub: create_repo records its arguments, create_commit copies every uploaded file into
    hub.repos[repo_id] (a folder) and records the commit."""
    state = types.SimpleNamespace(repos={}, created=[], commits=[])

    def create_repo(self, repo_id, **kwargs):
        state.created.append((repo_id, kwargs))
        return types.SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        folder = state.repos.setdefault(repo_id, tmp_path / "hub" / repo_id.replace("/", "--"))
        for op in operations:
            target = folder / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(Path(op.path_or_fileobj).read_bytes())  # the source may be a temp dir: copy now
        state.commits.append((repo_id, sorted(op.path_in_repo for op in operations), kwargs))
        return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return state


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device and the mamba_ssm / causal_conv1d kernels")


def run_script(script, cwd, expect):
    """Run `script` in a fresh Python (offline, its own remote-code module cache) and check it printed `expect`."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(Path(cwd) / "modules"))
    result = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert expect in result.stdout
