"""Conversion of pretrained Mamba checkpoints (mamba_ssm and -hf layouts) into HMamba, export, bad input."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MambaConfig, MambaForCausalLM

from hmamba.cli import main
from hmamba.conversion import CheckpointError, convert, export, load_state_dict
from hmamba.conversion.checkpoints import format_summary


def make_mamba(d_model=16, n_layer=4, vocab=61, multiple=8, d_state=4, expand=2, d_conv=4, seed=0):
    """A random transformers MambaForCausalLM with the padded vocab, as the reference."""
    torch.manual_seed(seed)
    padded = vocab + (multiple - vocab % multiple) % multiple
    model = MambaForCausalLM(MambaConfig(vocab_size=padded, hidden_size=d_model, num_hidden_layers=n_layer,
                                         state_size=d_state, expand=expand, conv_kernel=d_conv)).eval()
    with torch.no_grad():  # mamba_ssm's init scales (torch-default projections, out_proj / sqrt(layers)) ...
        model.backbone.embeddings.weight.normal_(0, 0.02)
        for layer in model.backbone.layers:
            for m in (layer.mixer.in_proj, layer.mixer.x_proj, layer.mixer.out_proj, layer.mixer.conv1d):
                m.reset_parameters()
            layer.mixer.out_proj.weight /= n_layer**0.5
        for name, p in model.named_parameters():  # ... and no parameter left at a constant
            if name.endswith(("A_log", "D", "norm.weight", "norm_f.weight")):
                p.add_(0.3 * torch.randn_like(p))
    return model


def write_mamba_ssm(model, folder, vocab, multiple=8):
    """The state-spaces/mamba-* layout: config.json (d_model, n_layer, ssm_cfg, ...) + pytorch_model.bin."""
    c = model.config
    os.makedirs(folder, exist_ok=True)
    config = {"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers, "vocab_size": vocab,
              "ssm_cfg": {"d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand},
              "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": multiple, "tie_embeddings": True}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in model.state_dict().items()}
    assert "lm_head.weight" in state and "backbone.embedding.weight" in state
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    return state


@pytest.fixture
def mamba_ssm_ckpt(tmp_path):
    model = make_mamba()
    state = write_mamba_ssm(model, tmp_path / "mamba_ssm", vocab=61)
    (tmp_path / "mamba_ssm" / "tokenizer.json").write_text("{}")
    return model, state, tmp_path / "mamba_ssm"


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("low,out_layers", [(2, 0), (0, 0), (4, 0), (1, 2)])
def test_mamba_ssm_layout_chunk_1_equals_transformers(tmp_path, mamba_ssm_ckpt, low, out_layers):
    reference, _, src = mamba_ssm_ckpt
    summary = convert(src, tmp_path / "out", low_layers=low, out_layers=out_layers, chunk_size=1)
    assert summary["layout"] == "mamba_ssm"
    assert summary["layers"] == {"low": low, "high": 4 - low - out_layers, "out": out_layers}
    assert "tokenizer.json" in summary["files"] and "model.safetensors" in summary["files"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert model.config.vocab_size == 64 and model.config.num_low_layers == low
    ids = torch.randint(0, 61, (2, 19))
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=0)


def test_hf_layout_and_chunked_conversion(tmp_path):
    reference = make_mamba(n_layer=5)
    reference.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "flat", low_layers=2, chunk_size=1)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "flat", trust_remote_code=True).eval()
    ids = torch.randint(0, 61, (2, 17))
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=0)

    summary = convert(tmp_path / "hf", tmp_path / "h4", low_layers=2, out_layers=1, chunk_size=4, pooling="mean",
                      dtype="bfloat16")
    assert summary["dtype"] == "bfloat16" and summary["chunk_size"] == 4
    chunked = AutoModelForCausalLM.from_pretrained(tmp_path / "h4", trust_remote_code=True)
    assert (chunked.config.chunk_size, chunked.config.pooling, chunked.dtype) == (4, "mean", torch.bfloat16)
    # the layers are the pretrained ones, only regrouped
    torch.testing.assert_close(chunked.backbone.high_layers[1].mixer.in_proj.weight.float(),
                               reference.backbone.layers[3].mixer.in_proj.weight.bfloat16().float())


def test_mamba_130m_shapes_end_to_end(tmp_path):
    """Exactly mamba-130m's shapes: d_model 768, 24 layers, vocab 50277 padded to 50280, d_state 16, expand 2,
    d_conv 4; random weights in the mamba_ssm layout; HMamba chunk_size=1 logits == transformers' Mamba."""
    reference = make_mamba(d_model=768, n_layer=24, vocab=50277, d_state=16, expand=2, d_conv=4)
    assert reference.config.vocab_size == 50280
    write_mamba_ssm(reference, tmp_path / "mamba-130m", vocab=50277)
    assert main(["convert", str(tmp_path / "mamba-130m"), str(tmp_path / "out"), "--low-layers", "12",
                 "--chunk-size", "1"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert model.num_parameters() == reference.num_parameters()
    ids = torch.randint(0, 50277, (2, 24))
    diff = (logits(model, ids) - logits(reference, ids)).abs().max().item()
    print(f"mamba-130m shapes: max |HMamba - transformers Mamba| = {diff:.2e}")
    assert diff <= 1e-4


def test_export_round_trips_are_bit_identical(tmp_path, mamba_ssm_ckpt):
    reference, original, src = mamba_ssm_ckpt
    convert(src, tmp_path / "hm", low_layers=1, out_layers=1)
    export(tmp_path / "hm", tmp_path / "back_ssm", layout="mamba_ssm")
    back = torch.load(tmp_path / "back_ssm" / "pytorch_model.bin", weights_only=True)
    assert set(back) == set(original)
    for k in original:
        assert torch.equal(back[k], original[k]), k
    assert json.loads((tmp_path / "back_ssm" / "config.json").read_text())["n_layer"] == 4

    export(tmp_path / "hm", tmp_path / "back_hf", layout="hf")
    flat = MambaForCausalLM.from_pretrained(tmp_path / "back_hf").eval()
    ids = torch.randint(0, 61, (2, 9))
    torch.testing.assert_close(logits(flat, ids), logits(reference, ids), atol=0, rtol=0)
    convert(tmp_path / "back_hf", tmp_path / "hm2", low_layers=1, out_layers=1)
    a, b = load_file(tmp_path / "hm" / "model.safetensors"), load_file(tmp_path / "hm2" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_export_refuses_hierarchical_model(tmp_path, mamba_ssm_ckpt):
    _, _, src = mamba_ssm_ckpt
    convert(src, tmp_path / "h2", chunk_size=2)
    with pytest.raises(CheckpointError, match="chunk_size=2 and H layers: only chunk_size=1 .or no H layers. is a flat Mamba"):
        export(tmp_path / "h2", tmp_path / "flat")
    assert not (tmp_path / "flat").exists()


# ---- bad input ------------------------------------------------------------------------------------------

def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        convert(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="neither a mamba_ssm config .* model_type='gpt2'"):
        convert(tmp_path / "gpt2", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _rewrite(src, edit):
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    edit(state)
    torch.save(state, src / "pytorch_model.bin")


def test_missing_unexpected_and_misshapen_keys(tmp_path, mamba_ssm_ckpt):
    _, _, src = mamba_ssm_ckpt
    _rewrite(src, lambda s: s.pop("backbone.layers.1.mixer.D"))
    with pytest.raises(CheckpointError, match=r"missing \['backbone.low_layers.1.mixer.D'\]"):
        convert(src, tmp_path / "out", low_layers=2)
    _rewrite(src, lambda s: s.update({"backbone.layers.1.mixer.D": torch.ones(32), "backbone.extra": torch.ones(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys .*backbone.extra"):
        convert(src, tmp_path / "out")
    _rewrite(src, lambda s: (s.pop("backbone.extra"), s.update({"backbone.layers.2.mixer.D": torch.ones(31)})))
    with pytest.raises(CheckpointError, match=r"shape mismatch for backbone.high_layers.0.mixer.D: checkpoint \(31,\)"):
        convert(src, tmp_path / "out", low_layers=2)
    assert not (tmp_path / "out").exists()


def test_layer_split_out_of_range(tmp_path, mamba_ssm_ckpt):
    _, _, src = mamba_ssm_ckpt
    with pytest.raises(CheckpointError, match="--low-layers 5 is out of range: .* in 0..4"):
        convert(src, tmp_path / "out", low_layers=5)
    with pytest.raises(CheckpointError, match="--low-layers 3 is out of range: .*--out-layers 2 it must be in 0..2"):
        convert(src, tmp_path / "out", low_layers=3, out_layers=2)
    with pytest.raises(CheckpointError, match="--out-layers 4 is out of range: .*at least one must stay in the L or H"):
        convert(src, tmp_path / "out", low_layers=0, out_layers=4)


def test_non_empty_out_needs_overwrite_and_failed_runs_leave_it_intact(tmp_path, mamba_ssm_ckpt, monkeypatch):
    _, _, src = mamba_ssm_ckpt
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    with pytest.raises(FileExistsError, match="not empty: choose another folder or pass --overwrite"):
        convert(src, out)

    import hmamba.conversion.checkpoints as conv

    real_save = conv.save_hmamba

    def interrupted(*args, **kwargs):
        real_save(*args, **kwargs)  # the weights are half way into the temporary folder ...
        raise KeyboardInterrupt  # ... when the run is interrupted

    monkeypatch.setattr(conv, "save_hmamba", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, overwrite=True)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "previous"
    assert sorted(os.listdir(tmp_path)) == ["mamba_ssm", "out"]  # no temporary folder left behind
    monkeypatch.undo()
    convert(src, out, overwrite=True)
    assert "model.safetensors" in os.listdir(out) and "keep.txt" not in os.listdir(out)


def test_corrupted_and_malicious_weights_are_refused(tmp_path, mamba_ssm_ckpt):
    _, _, src = mamba_ssm_ckpt
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*pytorch_model.bin.*truncated or corrupted"):
        convert(src, tmp_path / "out")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"backbone.embedding.weight": Evil()}, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load|cannot read"):
        load_state_dict(src)
    assert not (tmp_path / "pwned").exists()

    hf = tmp_path / "hf"
    make_mamba().save_pretrained(hf)
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        convert(hf, tmp_path / "out")


def test_offline_hub_id_has_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not be downloaded from the Hugging Face Hub.*Offline"):
        convert("state-spaces/mamba-130m-does-not-exist-here", tmp_path / "out")


def test_cli_reports_errors_and_summary(tmp_path, mamba_ssm_ckpt, capsys):
    _, _, src = mamba_ssm_ckpt
    assert main(["convert", str(src), str(tmp_path / "o"), "--low-layers", "9"]) == 2
    assert "--low-layers 9 is out of range" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "o"), "--chunk-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "layers: {'low': 2, 'high': 2, 'out': 0}" in out and "fine-tune before use" in out
    assert main(["export", str(tmp_path / "o"), str(tmp_path / "e")]) == 2


# ---- sources the output must not destroy or misrepresent; upstream defaults ------------------------------


def test_out_that_holds_the_source_is_refused(tmp_path, mamba_ssm_ckpt):
    _, _, src = mamba_ssm_ckpt
    before = sorted(os.listdir(src))
    for out in (src, tmp_path):  # the source itself, or a folder holding it: --overwrite would delete it
        with pytest.raises(CheckpointError, match="holds the source checkpoint .*choose another output folder"):
            convert(src, out, overwrite=True)
    convert(src, tmp_path / "hm")
    with pytest.raises(CheckpointError, match="holds the source checkpoint"):
        export(tmp_path / "hm", tmp_path / "hm", overwrite=True)
    assert sorted(os.listdir(src)) == before and (tmp_path / "hm" / "model.safetensors").exists()


def test_functions_the_target_cannot_compute_are_refused(tmp_path, mamba_ssm_ckpt):
    gelu = make_mamba()
    gelu.config.hidden_act = "gelu"
    gelu.save_pretrained(tmp_path / "gelu")
    with pytest.raises(ValueError, match="hidden_act.*gelu"):
        convert(tmp_path / "gelu", tmp_path / "out")

    eps = make_mamba()
    eps.config.layer_norm_epsilon = 0.5
    eps.save_pretrained(tmp_path / "eps")
    convert(tmp_path / "eps", tmp_path / "hm")
    with pytest.raises(CheckpointError, match="layer_norm_epsilon=0.5: mamba_ssm's config has no such field"):
        export(tmp_path / "hm", tmp_path / "back", layout="mamba_ssm")
    export(tmp_path / "hm", tmp_path / "back", layout="hf")  # the -hf layout keeps it
    assert MambaForCausalLM.from_pretrained(tmp_path / "back").config.layer_norm_epsilon == 0.5

    _, _, src = mamba_ssm_ckpt
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "d_intermediate": 64}))
    with pytest.raises(CheckpointError, match="d_intermediate=64: checkpoints with an MLP"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_upstream_config_defaults_legacy_bin_and_damaged_json(tmp_path, mamba_ssm_ckpt):
    reference, state, src = mamba_ssm_ckpt
    torch.save(state, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)  # torch < 1.6's format
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "tie_embeddings"}))
    convert(src, tmp_path / "legacy", low_layers=2)  # tie_embeddings takes mamba_ssm's default (True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "legacy", trust_remote_code=True).eval()
    ids = torch.randint(0, 61, (1, 7))
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=0)

    hf = tmp_path / "hf"
    make_mamba(n_layer=32, d_model=8).save_pretrained(hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "num_hidden_layers"}))
    assert convert(hf, tmp_path / "hm", low_layers=16)["layers"]["high"] == 16  # transformers' default, 32 layers

    (hf / "config.json").write_text("{'not': json}")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        convert(hf, tmp_path / "out")


def test_tokenizer_replaces_the_sources_and_defaults_follow_out_layers(tmp_path, mamba_ssm_ckpt, capsys):
    from transformers import AutoTokenizer

    from hmamba.data import default_tokenizer

    _, _, src = mamba_ssm_ckpt
    (src / "special_tokens_map.json").write_text(json.dumps({"eos_token": "SRC_EOS"}))
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "pad_token_id": 1, "bos_token_id": 0,
                                                            "max_length": 77}))
    default_tokenizer().save_pretrained(tmp_path / "tok")
    summary = convert(src, tmp_path / "out", out_layers=2, tokenizer=str(tmp_path / "tok"))
    assert summary["layers"] == {"low": 1, "high": 1, "out": 2}  # default L: half of those not in out
    assert "special_tokens_map.json" not in summary["files"]
    assert AutoTokenizer.from_pretrained(tmp_path / "out").eos_token == "</s>"
    # the special-token ids are the new tokenizer's (eos 1, pad 0), not the source's (eos 0, pad 1); it has no bos,
    # so bos stays the source's
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for ids in (model.config, model.generation_config):
        assert (ids.eos_token_id, ids.pad_token_id, ids.bos_token_id) == (1, 0, 0)
    assert model.generation_config.max_length == 77  # the rest of the source's generation config stays

    assert main(["convert", str(src), str(tmp_path / "flat"), "--low-layers", "3", "--out-layers", "1",
                 "--chunk-size", "4", "--base-model", "state-spaces/mamba-130m"]) == 0  # no H layers: exact
    out = capsys.readouterr().out
    assert "exact: True" in out and "fine-tune before use" not in out
    card = (tmp_path / "flat" / "README.md").read_text()
    assert "computes exactly what the original model computes" in card and "fine-tune" not in card
    assert "exact: False" in format_summary(convert(src, tmp_path / "h4", chunk_size=4))
    assert main(["export", str(tmp_path / "flat"), str(tmp_path / "back")]) == 0
    untied = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, state_size=4,
                                          tie_word_embeddings=False))
    untied.save_pretrained(tmp_path / "untied")
    convert(tmp_path / "untied", tmp_path / "hm-untied")
    summary = export(tmp_path / "hm-untied", tmp_path / "back-untied")
    assert summary["parameters"] == MambaForCausalLM.from_pretrained(tmp_path / "back-untied").num_parameters()


def test_model_card_of_a_conversion_into_the_current_folder(tmp_path, mamba_ssm_ckpt, monkeypatch):
    _, _, src = mamba_ssm_ckpt
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    convert(src, ".")
    assert "README.md" in os.listdir(".")  # the current folder itself was written, not replaced
    card = (tmp_path / "here" / "README.md").read_text()
    assert 'from_pretrained("here"' in card and "hmamba convert" in card and ".tmp-" not in card


def test_failed_runs_leave_no_new_folders_and_sigterm_unwinds(tmp_path, mamba_ssm_ckpt, monkeypatch):
    import signal

    import hmamba.conversion.checkpoints as conv

    _, _, src = mamba_ssm_ckpt
    _rewrite(src, lambda s: s.pop("backbone.layers.1.mixer.D"))
    with pytest.raises(CheckpointError, match="key mismatch"):
        convert(src, tmp_path / "new" / "deep" / "out")
    with pytest.raises(CheckpointError, match="--base-model 'not a hub id!' is not a Hugging Face Hub id"):
        convert(src, tmp_path / "new2" / "out", base_model="not a hub id!")
    assert sorted(os.listdir(tmp_path)) == ["mamba_ssm"]

    _rewrite(src, lambda s: s.update({"backbone.layers.1.mixer.D": torch.ones(32)}))
    real_save = conv.save_hmamba

    def killed(*args, **kwargs):
        real_save(*args, **kwargs)
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)  # else the kill ends pytest itself
        os.kill(os.getpid(), signal.SIGTERM)  # `kill`, `timeout`, a scheduler ending the job mid-write

    monkeypatch.setattr(conv, "save_hmamba", killed)
    before = signal.getsignal(signal.SIGTERM)
    if before != signal.SIG_DFL:
        pytest.skip("the test runner handles SIGTERM itself; hmamba leaves a caller's handler alone")
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(src), str(tmp_path / "out")])
    assert exit_.value.code == 143 and sorted(os.listdir(tmp_path)) == ["mamba_ssm"]
    assert signal.getsignal(signal.SIGTERM) == before  # restored after the command
