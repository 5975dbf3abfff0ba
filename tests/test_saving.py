"""save_pretrained / from_pretrained, in process and through trust_remote_code without hmamba installed."""

import json
import os

import torch
from transformers import AutoModel, AutoModelForCausalLM


from conftest import run_script, tiny_model


def test_save_writes_safetensors_and_code(tmp_path):
    model = tiny_model(chunk_size=4, pooling="mean")
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "modeling_hmamba.py", "configuration_hmamba.py"} <= files
    assert not any(f.endswith(".bin") for f in files)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_hmamba.HMambaConfig", "AutoModel": "modeling_hmamba.HMambaModel",
                        "AutoModelForCausalLM": "modeling_hmamba.HMambaForCausalLM"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert loaded.lm_head.weight is loaded.backbone.embeddings.weight


def test_base_model_loads_from_a_causal_lm_checkpoint_with_an_untied_head(tmp_path):
    model = tiny_model(tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)  # the checkpoint's lm_head.weight is not the backbone's
    assert type(base).__name__ == "HMambaModel"
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(base(ids).last_hidden_state, model.backbone(ids).last_hidden_state, atol=0, rtol=0)


def test_trust_remote_code_without_hmamba(tmp_path):
    model = tiny_model(chunk_size=3)
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    script = f"""
import sys, torch
sys.modules["hmamba"] = None  # any `import hmamba` now raises ImportError
from transformers import AutoModel, AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
base = AutoModel.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True).eval()  # the backbone alone
assert type(base).__name__ == "HMambaModel", type(base)
expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
with torch.no_grad():
    torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], atol=0, rtol=0)
    torch.testing.assert_close(base(expected["ids"]).last_hidden_state,
                               model.backbone(expected["ids"]).last_hidden_state, atol=0, rtol=0)
    out = model.generate(expected["ids"], attention_mask=torch.ones_like(expected["ids"]), max_new_tokens=5,
                         do_sample=False, pad_token_id=0)
assert out.shape == (2, 16)
print("remote code OK")
"""
    run_script(script, tmp_path, "remote code OK")
