"""Hub: the transformers version check of the remote code, model cards, uploads captured offline (exact files and
metadata), and the captured upload loaded back without hmamba (AutoModelForCausalLM and pipeline)."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from transformers import pipeline

import hmamba
from hmamba import modeling_hmamba
from hmamba.cli import main
from hmamba.data import default_tokenizer
from hmamba.hub import check_hub_folder, push_folder_to_hub, push_to_hub, write_model_card

from conftest import run_script, tiny_model
from test_conversion import make_mamba, write_mamba_ssm

PACKAGE = Path(hmamba.__file__).parent
SAVED_FILES = {"config.json", "configuration_hmamba.py", "generation_config.json", "model.safetensors",
               "modeling_hmamba.py"}


# ---------------------------------------------------------------------------------------------------------------
# the transformers version check of the remote code


@pytest.mark.parametrize("version", ["5.22.3", "5.25.0.dev0", "5.25.0", "6.0.0", "4.57.6"])
def test_unsupported_transformers_versions_are_refused(version):
    with pytest.raises(ImportError, match=rf"supports transformers>=5.23,<5.25, but transformers {version} is "
                                          r"installed\. Install a supported version"):
        modeling_hmamba.check_transformers_version(version)


@pytest.mark.parametrize("version", ["5.23.0", "5.23.2", "5.24.0", "5.24.1rc1", transformers.__version__])
def test_supported_transformers_versions_pass(version):
    modeling_hmamba.check_transformers_version(version)


def test_importing_the_model_code_under_an_unsupported_transformers_fails(monkeypatch):
    monkeypatch.setattr(transformers, "__version__", "5.22.0")
    spec = importlib.util.spec_from_file_location("hmamba._version_probe", PACKAGE / "modeling_hmamba.py")
    with pytest.raises(ImportError, match="transformers 5.22.0 is installed"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_cache_goes_by_both_names():
    """transformers 5.23's generate() passes and reads the cache as `cache_params`, 5.24's as `cache`."""
    model = tiny_model(chunk_size=3)
    ids = torch.randint(2, 64, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :5], use_cache=True)
        assert "cache" in first and "cache_params" in first
        assert first.cache is first.cache_params is first["cache_params"] is first.get("cache_params") is not None
        assert len(first.to_tuple()) == 2  # logits, cache: the alias is not a second entry
        step = model(ids[:, 5:6], cache=first.cache).logits
        rest = model(ids[:, 6:], cache_params=first.cache).logits  # the same cache object, advanced by one token
    torch.testing.assert_close(torch.cat([first.logits, step, rest], 1), full, atol=1e-4, rtol=0)


def test_package_requirement_matches_the_model_code():
    setup_py = (Path(__file__).parents[1] / "setup.py").read_text()  # the source tree or an unpacked sdist
    assert modeling_hmamba.TRANSFORMERS_REQUIREMENT == "transformers>=5.23,<5.25"
    assert f'"{modeling_hmamba.TRANSFORMERS_REQUIREMENT}"' in setup_py


# ---------------------------------------------------------------------------------------------------------------
# uploads, captured at HfApi.create_commit: the call both transformers' push_to_hub and push_folder_to_hub end in


def front_matter(readme):
    text = Path(readme).read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


def test_model_push_to_hub_uploads_a_loadable_repo(hub):
    model = tiny_model()
    model.push_to_hub("me/tiny")
    assert hub.created == [("me/tiny", {"private": None, "token": None, "exist_ok": True})]
    [(repo, files, _)] = hub.commits
    assert set(files) == SAVED_FILES | {"README.md"}
    config = json.loads((hub.repos["me/tiny"] / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_hmamba.HMambaConfig",
                                  "AutoModel": "modeling_hmamba.HMambaModel",
                                  "AutoModelForCausalLM": "modeling_hmamba.HMambaForCausalLM"}
    assert (hub.repos["me/tiny"] / "modeling_hmamba.py").read_text() == (PACKAGE / "modeling_hmamba.py").read_text()


def byte_model_and_tokenizer():
    return tiny_model(vocab_size=259, chunk_size=3, pooling="mean"), default_tokenizer()  # the shipped byte tokenizer


def test_push_to_hub_uploads_complete_folder_with_card(hub):
    model, tokenizer = byte_model_and_tokenizer()
    command = "hmamba convert state-spaces/mamba-130m out --chunk-size 3"
    commit = push_to_hub(model, tokenizer, "me/tiny-hmamba", base_model="state-spaces/mamba-130m", command=command,
                         private=True)
    assert commit.commit_url.startswith("https://huggingface.co/me/tiny-hmamba/")
    assert hub.created == [("me/tiny-hmamba", {"private": True, "token": None, "exist_ok": True})]
    [(repo, files, kwargs)] = hub.commits
    assert set(files) == SAVED_FILES | {"README.md", "tokenizer.json", "tokenizer_config.json"}
    assert kwargs["commit_message"] == "Upload HMamba model"

    metadata, card = front_matter(hub.repos[repo] / "README.md")
    assert metadata == {"library_name": "transformers", "pipeline_tag": "text-generation", "license": "apache-2.0",
                        "base_model": "state-spaces/mamba-130m",
                        "tags": ["hmamba", "mamba", "ssm", "hierarchical", "custom_code"]}
    for text in ["| L-stack (token rate) | 2 Mamba layers |",
                 "| H-stack (chunk rate) | 2 Mamba layers, one step per chunk of 3 tokens |",
                 "| out layers (token rate) | 1 Mamba layer |", "| chunk size / pooling | 3 / mean |",
                 f"| parameters | {model.num_parameters():,} |",
                 "Converted from the pretrained Mamba [state-spaces/mamba-130m]", "fine-tune before use",
                 f"```bash\n{command}\n```", 'AutoModelForCausalLM.from_pretrained("me/tiny-hmamba", trust_remote_code=True)',
                 "transformers>=5.23,<5.25"]:
        assert text in card, text


def test_card_for_a_trained_model(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    write_model_card(tmp_path, datasets=["roneneldan/TinyStories"], command="hmamba train --steps 10",
                     notes="2,000 steps, final loss 1.23.")
    metadata, card = front_matter(tmp_path / "README.md")
    assert metadata["datasets"] == ["roneneldan/TinyStories"] and "base_model" not in metadata
    assert "2,000 steps, final loss 1.23.\n\nMade with:\n\n```bash\nhmamba train --steps 10\n```" in card
    assert "Trained from scratch on [roneneldan/TinyStories](https://huggingface.co/datasets/roneneldan/TinyStories)" \
        in card
    assert f'from_pretrained("{tmp_path.name}"' in card  # no repo id given: the folder's name
    with pytest.raises(ValueError, match="'not a hub id!' is not a Hugging Face Hub id"):
        write_model_card(tmp_path, base_model="not a hub id!")


def test_incomplete_folders_are_not_uploaded(tmp_path, hub):
    model, tokenizer = byte_model_and_tokenizer()
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"lacks: tokenizer files \(tokenizer.save_pretrained.*; README.md"):
        push_folder_to_hub(tmp_path, "me/x")
    tokenizer.save_pretrained(tmp_path)
    write_model_card(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["auto_map"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.remove(tmp_path / "modeling_hmamba.py")
    with pytest.raises(ValueError, match=r"lacks: auto_map .*; modeling_hmamba.py \(import hmamba"):
        push_folder_to_hub(tmp_path, "me/x")
    with pytest.raises(ValueError, match="not a Hub repo id: use OWNER/NAME"):
        push_folder_to_hub(tmp_path, "no-owner")
    assert hub.created == [] and hub.commits == []


# ---------------------------------------------------------------------------------------------------------------
# hmamba convert: the card on local saves, --tokenizer, --push-to-hub


@pytest.fixture
def mamba_ssm_source(tmp_path):
    write_mamba_ssm(make_mamba(), tmp_path / "src", vocab=61)  # state-spaces layout: no tokenizer files
    default_tokenizer().save_pretrained(tmp_path / "tok")
    return tmp_path / "src"


def test_convert_writes_upload_ready_folder_and_pushes(tmp_path, mamba_ssm_source, hub, capsys):
    out = tmp_path / "out"
    argv = ["convert", str(mamba_ssm_source), str(out), "--chunk-size", "2", "--tokenizer", str(tmp_path / "tok"),
            "--base-model", "state-spaces/mamba-130m", "--push-to-hub", "me/mamba-h2"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "uploaded" in capsys.readouterr().out
    [(repo, files, _)] = hub.commits
    assert repo == "me/mamba-h2" and files == sorted(SAVED_FILES | {"README.md", "tokenizer.json", "tokenizer_config.json"})
    assert files == check_hub_folder(out)
    metadata, card = front_matter(hub.repos[repo] / "README.md")
    assert metadata["base_model"] == "state-spaces/mamba-130m"
    assert (f"hmamba convert {mamba_ssm_source} out --low-layers 2 --out-layers 0 --chunk-size 2 --pooling last "
            f"--tokenizer {tmp_path / 'tok'}") in card
    assert 'from_pretrained("me/mamba-h2"' in card and "fine-tune before use" in card


def test_convert_without_tokenizer_saves_locally_but_refuses_to_push(tmp_path, mamba_ssm_source, hub, capsys,
                                                                     monkeypatch):
    assert main(["convert", str(mamba_ssm_source), str(tmp_path / "a")]) == 0
    metadata, card = front_matter(tmp_path / "a" / "README.md")
    assert "base_model" not in metadata and "exactly what the original model computes" not in card  # no base model
    assert "| chunk size / pooling | 1 / last |" in card
    capsys.readouterr()
    assert main(["convert", str(mamba_ssm_source), str(tmp_path / "b"), "--push-to-hub", "me/b"]) == 2
    err = capsys.readouterr().err
    assert "hmamba convert: error:" in err and "has no tokenizer" in err and "--tokenizer" in err
    assert hub.commits == [] and not (tmp_path / "b").exists()  # refused before converting
    assert main(["convert", str(mamba_ssm_source), str(tmp_path / "c"), "--tokenizer", str(tmp_path / "nope")]) == 2
    assert "--tokenizer" in capsys.readouterr().err and not (tmp_path / "c").exists()
    assert main(["convert", str(mamba_ssm_source), str(tmp_path / "d"), "--push-to-hub", "no-owner"]) == 2
    assert "not a Hub repo id" in capsys.readouterr().err and not (tmp_path / "d").exists()

    class ConnectError(Exception):  # what huggingface_hub's HTTP client raises offline: no OSError, no RuntimeError
        pass

    def offline(self, repo_id, **kwargs):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", offline)
    argv = ["convert", str(mamba_ssm_source), str(tmp_path / "e"), "--tokenizer", str(tmp_path / "tok"), "--push-to-hub",
            "me/e"]
    assert main(argv) == 2  # one line, not a traceback; the converted folder stays for `hf upload`
    err = capsys.readouterr().err
    assert "upload to me/e failed (ConnectError" in err and f"hf upload me/e {tmp_path / 'e'}" in err


# ---------------------------------------------------------------------------------------------------------------
# download side: the captured upload, loaded where hmamba cannot be imported


def test_uploaded_repo_loads_and_generates_without_hmamba(tmp_path, hub):
    model, tokenizer = byte_model_and_tokenizer()
    push_to_hub(model, tokenizer, "me/tiny-hmamba")
    repo = hub.repos["me/tiny-hmamba"]
    ids = torch.randint(3, 259, (2, 10))
    with torch.no_grad():
        logits = model(ids).logits
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator("In the beginning", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert len(text) > len("In the beginning")
    torch.save({"ids": ids, "logits": logits, "text": text}, tmp_path / "expected.pt")
    script = f"""
import sys, torch
sys.modules["hmamba"] = None  # any `import hmamba` now raises ImportError
from transformers import AutoModelForCausalLM, pipeline
expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
model = AutoModelForCausalLM.from_pretrained({str(repo)!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    torch.testing.assert_close(model(expected["ids"]).logits, expected["logits"], atol=0, rtol=0)
generator = pipeline("text-generation", model={str(repo)!r}, trust_remote_code=True)
assert type(generator.model).__module__.startswith("transformers_modules")
text = generator("In the beginning", max_new_tokens=12, do_sample=False)[0]["generated_text"]
assert text == expected["text"], (text, expected["text"])
print("download OK")
"""
    run_script(script, tmp_path, "download OK")
