"""Reliability: bad input fails loudly with a message naming the problem, half precision stays finite and close to
float32, long inputs run in linear memory / constant cache, writers are atomic, loading runs no code, the shipped
model files import nothing unexpected, and CPU runs are bit-reproducible."""

import ast
import copy
import json
import os
import subprocess
import weakref
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, MambaConfig

import hmamba
import hmamba.conversion.checkpoints as conv
from hmamba import HMambaConfig, HMambaForCausalLM
from hmamba.atomic import atomic_output_dir, atomic_write
from hmamba.conversion import export

from conftest import tiny_config, tiny_model

PACKAGE = Path(hmamba.__file__).parent


def files_of(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


# ---- bad input to the model -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_id", [-1, 64, 1000])
def test_token_ids_out_of_range(model, bad_id):
    ids = torch.randint(0, 64, (2, 6))
    ids[1, 3] = bad_id
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, vocab_size=64\), got ids from .*{bad_id}"):
        model(ids)


@pytest.mark.parametrize("shape", [(1, 0), (0, 5)])
def test_empty_input(model, shape):
    with pytest.raises(ValueError, match=r"empty input of shape \(batch, length\) = .*at least one token"):
        model(torch.zeros(shape, dtype=torch.long))
    with pytest.raises(ValueError, match="empty input"):
        model(inputs_embeds=torch.zeros(*shape, 16))


def test_input_ids_and_inputs_embeds_both_or_neither(model):
    ids = torch.randint(0, 64, (1, 4))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds, got both"):
        model(ids, inputs_embeds=model.get_input_embeddings()(ids))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds, got neither"):
        model()


def test_malformed_input_ids_and_inputs_embeds(model):
    with pytest.raises(ValueError, match=r"input_ids must be integer token ids of shape \(batch, length\)"):
        model(torch.randint(0, 64, (5,)))
    with pytest.raises(ValueError, match="input_ids must be integer token ids.*torch.float32"):
        model(torch.rand(1, 5))
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \(batch, length, hidden_size=16\), got \(1, 5, 8\)"):
        model(inputs_embeds=torch.rand(1, 5, 8))


def test_labels_of_the_wrong_shape(model):
    ids = torch.randint(0, 64, (2, 6))
    with pytest.raises(ValueError, match=r"labels must have the shape of the input .* = \(2, 6\), got \(2, 5\)"):
        model(ids, labels=ids[:, 1:])
    assert torch.isfinite(model(ids, labels=ids).loss)  # the right shape works (shifted inside)
    with pytest.raises(ValueError, match="logits_to_keep=1 keeps 1 of 6: pass logits_to_keep=0"):
        model(ids, labels=ids, logits_to_keep=1)


def test_attention_mask_values_and_shape(model):
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, 0] = 2
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0 \(padding\) and 1 \(real token\)"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        model(ids, attention_mask=torch.full((2, 6), 0.5))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, length\) = \(2, 6\), got \(2, 7\)"):
        model(ids, attention_mask=torch.ones(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask must have shape .* got \(1, 6\)"):
        model(ids, attention_mask=torch.ones(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask must have shape .* got \(6,\)"):
        model(ids[:1], attention_mask=torch.ones(6, dtype=torch.long))
    bool_mask = torch.ones(2, 6, dtype=torch.bool)  # bool and float 0/1 masks are fine
    torch.testing.assert_close(model(ids, attention_mask=bool_mask).logits, model(ids, attention_mask=mask.clamp(max=1.0).float()).logits)


def test_cache_from_another_config_or_class_is_refused(model):
    ids = torch.randint(0, 64, (2, 4))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache_params
        for other in (tiny_model(chunk_size=4), tiny_model(num_out_layers=2), tiny_model(state_size=8)):
            with pytest.raises(ValueError, match="cache_params was built for another config"):
                other(ids[:, :1], cache_params=cache, use_cache=True)
        with pytest.raises(ValueError, match="cache_params holds 2 rows but the input has 1"):
            model(ids[:1, :1], cache_params=cache, use_cache=True)
        with pytest.raises(TypeError, match="cache must be the HMambaCache .* got DynamicCache"):
            model(ids, cache_params=DynamicCache(), use_cache=True)


def test_continuing_with_a_full_length_attention_mask_works(model):
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :6], use_cache=True)
        rest = model(ids[:, 6:], cache_params=first.cache_params, attention_mask=torch.ones_like(ids), use_cache=True)
    torch.testing.assert_close(rest.logits, full[:, 6:], atol=1e-4, rtol=0)
    mask = torch.ones_like(ids)
    mask[1, 7] = 0  # padding among the new tokens: the step path would ignore it
    with pytest.raises(ValueError, match="padding among the new tokens"):
        model(ids[:, 6:], cache_params=first.cache_params, attention_mask=mask, use_cache=True)


# ---- bad configs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,needle", [
    (dict(chunk_size=0), "chunk_size=0 is invalid: chunk_size must be an integer >= 1"),
    (dict(chunk_size=-3), "chunk_size=-3 is invalid"),
    (dict(num_low_layers=0, num_high_layers=0, num_out_layers=2), "num_low_layers \\+ num_high_layers=0 is invalid"),
    (dict(expand=1.5), "expand=1.5 is invalid: expand must be an integer >= 1"),
    (dict(hidden_size=0), "hidden_size=0 is invalid"),
])
def test_invalid_configs_name_the_field(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        tiny_config(**overrides)


def test_odd_hidden_sizes_need_no_divisibility():
    # Mamba-1 has no divisibility constraint (d_inner = expand * hidden_size with an integer expand; no heads),
    # so odd widths are valid; the property suite runs hidden sizes 3, 5 and 13 through every guarantee.
    model = tiny_model(hidden_size=7, expand=1, state_size=3, time_step_rank=2)
    assert model(torch.randint(0, 64, (1, 5))).logits.shape == (1, 5, 64)


# ---- loading -----------------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    model = tiny_model(chunk_size=3)
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


@pytest.mark.parametrize("overrides", [dict(num_low_layers=1, num_high_layers=3), dict(num_out_layers=2),
                                       dict(num_low_layers=3, num_high_layers=1, num_out_layers=1)])
def test_another_layer_split_is_a_mismatch_error(saved, overrides):
    _, folder = saved
    with pytest.raises(ValueError, match=r"weights in .* do not match an HMamba with num_low_layers=.*(missing|unexpected) keys"):
        HMambaForCausalLM.from_pretrained(folder, **overrides)


def test_another_chunk_size_or_pooling_is_a_mismatch_error(saved):
    model, folder = saved
    with pytest.raises(ValueError, match="saved with another structure \\(chunk_size: saved 3, requested 4\\)"):
        HMambaForCausalLM.from_pretrained(folder, chunk_size=4)
    with pytest.raises(ValueError, match="pooling: saved 'last', requested 'mean'"):
        HMambaForCausalLM.from_pretrained(folder, config=tiny_config(chunk_size=3, pooling="mean"))
    loaded = HMambaForCausalLM.from_pretrained(folder)  # as saved: fine, and exact
    ids = torch.randint(0, 64, (1, 7))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_another_width_is_a_mismatch_error(saved):
    _, folder = saved
    with pytest.raises((ValueError, RuntimeError), match="(?i)mismatch|size"):
        HMambaForCausalLM.from_pretrained(folder, hidden_size=32)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupted_safetensors(saved, damage):
    _, folder = saved
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 64)
    with pytest.raises(OSError, match="cannot read the weights of .*truncated or corrupted"):
        HMambaForCausalLM.from_pretrained(folder)
    with pytest.raises(OSError, match="truncated or corrupted"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_config_json_of_another_model_is_refused(tmp_path):
    MambaConfig(hidden_size=16, num_hidden_layers=2, vocab_size=64).save_pretrained(tmp_path / "mamba")
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 16}))
    (tmp_path / "ssm").mkdir()
    (tmp_path / "ssm" / "config.json").write_text(json.dumps({"d_model": 16, "n_layer": 2, "vocab_size": 64}))
    for name, model_type in (("mamba", "'mamba'"), ("gpt", "'gpt2'"), ("ssm", "None")):
        with pytest.raises(ValueError, match=f"model_type={model_type}, not 'hmamba': it is not an HMamba config"):
            HMambaConfig.from_pretrained(tmp_path / name)
        with pytest.raises(ValueError, match="not an HMamba config"):
            HMambaForCausalLM.from_pretrained(tmp_path / name)
    with pytest.raises(ValueError, match="hmamba convert"):  # a Mamba checkpoint: the error says how to convert it
        HMambaConfig.from_pretrained(tmp_path / "ssm")


def test_malicious_pickle_is_refused_by_from_pretrained(saved, tmp_path):
    _, folder = saved
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))  # runs at unpickling if the loader executes code

    os.remove(folder / "model.safetensors")  # a .bin-only folder
    torch.save({"backbone.embeddings.weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="refusing to load .*pickle would run code"):
        HMambaForCausalLM.from_pretrained(folder)
    with pytest.raises(conv.CheckpointError, match="refusing to load"):
        conv.load_state_dict(folder)
    assert not marker.exists()
    torch.load(folder / "pytorch_model.bin", weights_only=False)  # control: the payload is live ...
    assert marker.is_dir()  # ... so the refusals above are what kept it from running


# ---- atomic writers ------------------------------------------------------------------------------------------

def test_interrupted_save_pretrained_leaves_the_previous_checkpoint(saved, monkeypatch):
    model, folder = saved
    (folder / "tokenizer.json").write_text("{}")  # other files in the folder are kept by a save
    before = files_of(folder)
    import transformers.modeling_utils as mu

    real = mu.safe_save_file
    parent_while_saving = []

    def interrupted(tensors, filename, *args, **kwargs):
        parent_while_saving.append(sorted(os.listdir(folder.parent)))
        real(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])  # half-written ...
        raise KeyboardInterrupt  # ... when the run is killed

    monkeypatch.setattr(mu, "safe_save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_model(seed=1, chunk_size=3).save_pretrained(folder)
    assert files_of(folder) == before
    assert sorted(os.listdir(folder.parent)) == ["model"]  # no temporary folder left behind
    assert parent_while_saving == [["model"]]  # staged inside the folder: a read-only parent is never written
    monkeypatch.undo()

    (folder / "pytorch_model.bin").write_bytes(b"stale weights of an older save")
    new = tiny_model(seed=1, chunk_size=3)
    new.save_pretrained(folder)
    assert "tokenizer.json" in os.listdir(folder) and "pytorch_model.bin" not in os.listdir(folder)
    ids = torch.randint(0, 64, (1, 5))
    assert torch.equal(HMambaForCausalLM.from_pretrained(folder)(ids).logits, new(ids).logits)
    assert oct(folder.stat().st_mode & 0o777) != oct(0o700)  # an ordinary folder, not mkdtemp's private one


def test_save_pretrained_on_a_rank_that_does_not_save_leaves_the_folder_alone(saved):
    model, folder = saved  # rank 0 saved it; every rank calls save_pretrained (accelerate's pattern)
    before = files_of(folder)
    tiny_model(seed=1, chunk_size=3).save_pretrained(folder, is_main_process=False)
    tiny_model(seed=1, chunk_size=3).save_pretrained(folder, False)  # transformers' positional order
    assert files_of(folder) == before
    assert sorted(os.listdir(folder.parent)) == ["model"]


def test_save_pretrained_refuses_a_file_and_writes_through_a_symlink(tmp_path):
    model = tiny_model(chunk_size=3)
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(FileExistsError, match="afile is a file, not a folder"):
        model.save_pretrained(tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "keep me"

    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    model.save_pretrained(tmp_path / "link")  # an empty folder behind a link
    assert (tmp_path / "link").is_symlink() and "model.safetensors" in os.listdir(tmp_path / "target")
    with atomic_output_dir(tmp_path / "link", overwrite=True) as tmp:  # convert/export --overwrite onto the link
        (tmp / "new.txt").write_text("new")
    assert (tmp_path / "link").is_symlink() and os.listdir(tmp_path / "target") == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["afile", "link", "target"]  # no temporary folder left behind


def test_interrupted_export_leaves_the_previous_output(tmp_path, monkeypatch):
    src = tmp_path / "flat"
    tiny_model(chunk_size=1).save_pretrained(src)
    out = tmp_path / "exported"
    export(src, out)
    before = files_of(out)

    def interrupted(config, layers, embedding, norm_f, lm_head, folder):
        (folder / "config.json").write_text("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "_write_hf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(src, out, overwrite=True)
    assert files_of(out) == before
    assert sorted(os.listdir(tmp_path)) == ["exported", "flat"]


def test_an_interrupt_between_the_swap_renames_puts_the_previous_output_back(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    real, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # OUT is moved aside, the new folder not yet in: SIGTERM or Ctrl-C lands here
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("second")
    monkeypatch.undo()
    assert (out / "a.txt").read_text() == "first" and os.listdir(tmp_path) == ["run"]


def test_overwriting_the_folder_the_shell_is_in_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "run"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("first")
    for cwd in (out, out / "sub"):  # `hmamba convert SRC . --overwrite`, or from a folder inside OUT
        monkeypatch.chdir(cwd)
        with pytest.raises(FileExistsError, match="holds the current folder"), atomic_output_dir(out, overwrite=True):
            pass
        assert os.getcwd() == os.path.realpath(cwd) and (out / "a.txt").read_text() == "first"
    monkeypatch.chdir(tmp_path)  # from outside it, OUT is replaced
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("second")
    assert os.listdir(out) == ["a.txt"]


def test_atomic_output_dir_and_atomic_write(tmp_path):
    out = tmp_path / "run"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert os.listdir(out) == ["a.txt"] and (out.stat().st_mode & 0o777) == (0o777 & ~_umask())
    with pytest.raises(RuntimeError), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("second, half")
        raise RuntimeError("interrupted")
    assert (out / "a.txt").read_text() == "first"

    results = tmp_path / "eval" / "results.json"
    with atomic_write(results) as f:
        json.dump({"ppl": 1.0}, f)
    with pytest.raises(RuntimeError), atomic_write(results) as f:
        f.write('{"ppl": ')
        raise RuntimeError("interrupted")
    assert json.loads(results.read_text()) == {"ppl": 1.0}
    assert os.listdir(results.parent) == ["results.json"]
    assert (results.stat().st_mode & 0o777) == (0o666 & ~_umask())
    (tmp_path / "latest.json").symlink_to(results)  # a link is written through, as atomic_dir does
    with atomic_write(tmp_path / "latest.json") as f:
        json.dump({"ppl": 2.0}, f)
    assert (tmp_path / "latest.json").is_symlink() and json.loads(results.read_text()) == {"ppl": 2.0}


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- half precision ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_and_generate_close_to_float32(dtype):
    model = tiny_model(hidden_size=32, chunk_size=3)
    half = copy.deepcopy(model).to(dtype)
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        ref, out = model(ids).logits, half(ids).logits
        gen = half.generate(ids[:, :8], attention_mask=torch.ones_like(ids[:, :8]), max_new_tokens=24,
                            min_new_tokens=24, do_sample=False, pad_token_id=0, output_logits=True,
                            return_dict_in_generate=True)
        steps = torch.stack(gen.logits, 1)  # cached half-precision decoding (raw logits) ...
        teacher = model(gen.sequences).logits[:, 7:-1]  # ... against float32 on the same tokens
    forward_err = (out - ref).abs().max().item()
    decode_err = (steps - teacher).abs().max().item()
    scale = ref.abs().max().item()
    print(f"\n{dtype}: forward max|err| {forward_err:.2e}, cached decode max|err| {decode_err:.2e}, "
          f"logit scale {scale:.2f}")
    assert torch.isfinite(out).all() and torch.isfinite(steps).all()
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.01  # ~8 vs ~11 mantissa bits
    assert forward_err < tolerance * max(1.0, scale) and decode_err < tolerance * max(1.0, scale)


def test_residual_in_fp32_keeps_the_stream_in_float32():
    ids = torch.randint(0, 64, (1, 10))
    for residual_in_fp32, stream_dtype in ((True, torch.float32), (False, torch.bfloat16)):
        model = tiny_model(residual_in_fp32=residual_in_fp32).to(torch.bfloat16)
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states
            out = model(ids[:, :9], use_cache=True)
            step = model(ids[:, 9:], cache_params=out.cache_params, use_cache=True, output_hidden_states=True)
        assert [h.dtype for h in hidden[:-1]] == [stream_dtype] * 5  # every block's output, L, H (fused), out
        assert [h.dtype for h in step.hidden_states[:-1]] == [stream_dtype] * 5
    fp32 = [tiny_model(residual_in_fp32=r)(ids).logits for r in (True, False)]
    assert torch.equal(*fp32)  # in float32 the flag changes nothing


def test_float16_saturates_instead_of_nan_where_mamba_overflows():
    # Large Mamba models reach activations beyond float16's 65504 in the residual stream and out_proj. With the
    # residual in float32 (the default), the norm reads it in float32 and the mixer's float16 output saturates.
    model = tiny_model(hidden_size=32, chunk_size=3, tie_word_embeddings=False)
    with torch.no_grad():
        emb = model.backbone.embeddings.weight
        emb.copy_(torch.randn_like(emb).clamp(-2, 2) * 3.2e4)
        for name, p in model.named_parameters():
            if name.endswith("out_proj.weight"):
                p.mul_(1e6)
        ids = torch.randint(0, 64, (2, 30))
        stream = max(h.abs().max().item() for h in model(ids, output_hidden_states=True).hidden_states[:-1])
        ref, out = model(ids).logits, copy.deepcopy(model).half()(ids).logits
    assert stream > 1e5  # the float32 model's stream really is beyond float16's range
    assert torch.isfinite(out).all()
    print(f"\nfloat16 with a residual stream up to {stream:.0f}: max|err| {(out - ref).abs().max().item():.2e}")
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


# ---- long input ------------------------------------------------------------------------------------------------

PREFILL_MEMORY = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_model
torch.set_num_threads(1)  # tiny tensors: thread hand-offs only add noise on a shared machine
def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))
model = tiny_model(hidden_size=8, state_size=2, num_low_layers=1, num_high_layers=1, num_out_layers=1, chunk_size=4)
peaks = {{}}
for length in (8192, 32768):
    ids = torch.randint(0, 64, (1, length))
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    base = status("VmRSS")
    with torch.no_grad():
        out = model(ids, use_cache=True, logits_to_keep=1)
    assert torch.isfinite(out.logits).all() and int(out.cache_params.position) == length
    peaks[length] = status("VmHWM") - base
print(json.dumps(peaks))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux /proc/self/clear_refs")
def test_prefill_32k_tokens_in_linear_memory():
    # a fresh process with a fixed mmap threshold, so that every tensor's memory is returned when freed and the
    # peak RSS of each run measures that run alone
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", PREFILL_MEMORY.format(tests=str(Path(__file__).parent))],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = {int(k): v for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    print("\nprefill length | peak extra memory | bytes per token")
    for length, peak in peaks.items():
        print(f"{length:>14} | {peak / 2**20:>13.1f} MiB | {peak / length:>15.0f}")
    ratio = peaks[32768] / peaks[8192]
    print(f"peak(32k) / peak(8k) = {ratio:.2f} (linear: 4, quadratic: 16)")
    assert ratio < 6
    assert peaks[32768] / 32768 < 4096  # a few hundred bytes of activations per token, not a T x T matrix


@pytest.mark.parametrize("output_hidden_states", [False, True])
def test_a_pass_frees_each_layer_output_unless_hidden_states_are_asked_for(output_hidden_states):
    """Memory linear in T with a small constant: without output_hidden_states the full-sequence pass keeps only the
    tensors it still needs, not every layer's (B, T, D) output until the end."""
    model = tiny_model(num_low_layers=2, num_high_layers=2, num_out_layers=3, chunk_size=2).eval()
    outputs, alive = [], []
    blocks = [*model.backbone.low_layers, *model.backbone.high_layers, *model.backbone.out_layers]
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(weakref.ref(o))) for b in blocks]
    hooks.append(model.backbone.norm_f.register_forward_pre_hook(
        lambda m, i: alive.append(sum(r() is not None for r in outputs))))
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 32)), output_hidden_states=output_hidden_states)
    for h in hooks:
        h.remove()
    assert len(outputs) == len(blocks)
    # alive when norm_f runs: without hidden states the L-stack output (the fusion's input), the last H output
    # (chunk rate) and the stream; with them also every other token-rate layer output (2 L + 3 out + the last H)
    assert alive == ([6] if output_hidden_states else [3])


def test_decode_10k_tokens_with_a_constant_cache():
    model = tiny_model(hidden_size=8, state_size=2, num_low_layers=1, num_high_layers=1, num_out_layers=0,
                       chunk_size=4, pooling="mean")
    ids = torch.randint(0, 64, (1, 10_007))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = model(ids[:, :7], use_cache=True)
            cache, size, last = out.cache_params, out.cache_params.nbytes(), []
            for start in range(7, ids.shape[1], 1000):  # 10k single-token steps, fed 1000 per call
                out = model(ids[:, start : start + 1000], cache_params=cache, use_cache=True)
                assert out.cache_params is cache and cache.nbytes() == size
                last = out.logits[:, -1]
            full = model(ids, logits_to_keep=1).logits[:, -1]
    finally:
        torch.set_num_threads(threads)
    assert int(cache.position) == ids.shape[1]
    print(f"\ncache: {size} bytes, constant over 10,000 decoded tokens")
    torch.testing.assert_close(last, full, atol=1e-3, rtol=0)  # still the uncached model after 10k steps


# ---- determinism -------------------------------------------------------------------------------------------------

def test_same_seed_same_logits_and_generation_bit_for_bit():
    ids = torch.randint(0, 64, (2, 12))
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        model = HMambaForCausalLM(tiny_config(chunk_size=3, pooling="mean")).eval()
        with torch.no_grad():
            logits = model(ids).logits
            greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                    pad_token_id=0)
            torch.manual_seed(7)
            sampled = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=True,
                                     top_k=0, pad_token_id=0)
        runs.append((logits, greedy, sampled))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- trust_remote_code files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["modeling_hmamba.py", "configuration_hmamba.py"])
def test_shipped_model_files_import_only_torch_transformers_and_the_stdlib(name):
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers"}
    tree = ast.parse((PACKAGE / name).read_text())
    imported, lazy = [], []  # module level; inside functions
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            roots = ([a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import)
                     else ["." + node.module if node.level else node.module.split(".")[0]])
            (imported if node in tree.body else lazy).extend(roots)
    assert imported, "the parser found no imports"
    siblings = {".configuration_hmamba"} if name == "modeling_hmamba.py" else set()
    assert set(imported) <= allowed | siblings, sorted(set(imported) - allowed - siblings)
    # the one exception: the CUDA kernels, imported inside the dispatch function for CUDA tensors only
    kernels = {"mamba_ssm", "causal_conv1d"} if name == "modeling_hmamba.py" else set()
    assert set(lazy) <= allowed | siblings | kernels, sorted(set(lazy) - allowed - siblings - kernels)
    assert "torch" in imported or name == "configuration_hmamba.py"
    source = (PACKAGE / name).read_text()  # and no dynamic imports that the parse above would miss
    assert not any(word in source for word in ("importlib", "__import__", "exec(", "eval(")), name
