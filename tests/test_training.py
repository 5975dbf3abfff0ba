"""Training: data packing, Trainer (loss, resume, checkpoints, gradient checkpointing, bf16), per-stack
freezing, PEFT LoRA, multi-process accelerate, the `hmamba train` CLI."""

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, MambaConfig, MambaForCausalLM

from hmamba.cli import main as cli_main
from hmamba.data import default_tokenizer, embedded_corpus, load_documents, pack, split_blocks
from hmamba.train import (
    add_lora,
    lora_target_modules,
    parameter_group,
    set_trainable,
    train,
)

TINY = {"hidden_size": 24, "state_size": 4, "num_low_layers": 1, "num_high_layers": 1, "num_out_layers": 1,
        "chunk_size": 2}
FAST = dict(config_overrides=TINY, block_size=32, batch_size=4, max_eval_blocks=4, logging_steps=1,
            learning_rate=3e-3, warmup_steps=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "shakespeare.txt"
    path.write_text(embedded_corpus()[100_000:130_000])
    return str(path)


def losses(output_dir):
    state = sorted(Path(output_dir).glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name[11:]))[-1]
    return {h["step"]: h["loss"] for h in json.loads(state.read_text())["log_history"] if "loss" in h}


# ---- data ---------------------------------------------------------------------------------------------------


def test_embedded_corpus_is_real_text_without_notices():
    text = embedded_corpus()
    assert len(text) > 5_000_000 and "To be, or not to be" in text
    assert "<<THIS ELECTRONIC VERSION" not in text


def test_documents_from_file_folder_and_saved_dataset(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second")
    (tmp_path / "docs" / "a.txt").write_text("first")
    assert load_documents(str(tmp_path / "docs"))[0] == ["first", "second"]
    assert load_documents(str(tmp_path / "docs" / "a.txt"))[0] == ["first"]

    import datasets

    datasets.Dataset.from_dict({"body": ["x y", "z"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_documents(str(tmp_path / "ds"), text_column="body")[0] == ["x y", "z"]
    with pytest.raises(ValueError, match="no column 'text'.*--text-column"):
        load_documents(str(tmp_path / "ds"))
    with pytest.raises(FileNotFoundError, match="could not be loaded as a Hub dataset"):
        load_documents("no/such-dataset-here")


def test_default_tokenizer_is_byt5s_ids_without_an_appended_eos():
    from transformers import ByT5Tokenizer

    tok, byt5 = default_tokenizer(), ByT5Tokenizer(extra_ids=0)
    assert len(tok) == len(byt5) == 259
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    for text in ("In the beginning", "h\u00e9llo w\u00f6rld \u2713 \U0001F600", "  two  spaces\n\tTab", "a</s>b", ""):
        ids = tok(text)["input_ids"]  # add_special_tokens=True, the default: nothing is added
        assert ids == byt5(text, add_special_tokens=False)["input_ids"] == byt5.encode(text)[:-1], text
        assert tok.decode(ids) == text
    assert tok.decode([1, ord("a") + 3, 0], skip_special_tokens=True) == "a"


def test_pack_puts_eos_between_documents_and_holds_out_the_end():
    tok = default_tokenizer()
    blocks = pack(["ab", "cd"], tok, block_size=3)  # a b eos c d eos
    eos = tok.eos_token_id
    assert blocks.tolist() == [[ord("a") + 3, ord("b") + 3, eos], [ord("c") + 3, ord("d") + 3, eos]]
    train_blocks, held_out = split_blocks(torch.arange(100).view(50, 2), 0.1)
    assert held_out.tolist() == torch.arange(90, 100).view(5, 2).tolist() and len(train_blocks) == 45
    with pytest.raises(ValueError, match="too few for two blocks"):
        pack(["abc"], tok, block_size=64)


# ---- Trainer ------------------------------------------------------------------------------------------------


def test_train_lowers_held_out_loss_and_saves_a_loadable_model(tmp_path, corpus):
    out = tmp_path / "run"
    summary = train(str(out), data=corpus, max_steps=30, **FAST)
    assert summary["eval_loss"] < math.log(259) - 1  # a nat below uniform over the byte vocabulary
    assert json.loads((out / "train_results.json").read_text())["eval_loss"] == summary["eval_loss"]
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "HMambaForCausalLM" and model.config.chunk_size == 2
    assert (out / "tokenizer_config.json").exists()


def test_resume_from_checkpoint_gives_the_uninterrupted_loss_curve(tmp_path, corpus):
    run = dict(data=corpus, max_steps=8, save_steps=4, **FAST)
    train(str(tmp_path / "full"), **run)
    from hmamba.train import StopAtStep

    train(str(tmp_path / "cut"), callbacks=[StopAtStep(4)], **run)
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-4"]
    summary = train(str(tmp_path / "cut"), resume=True, **run)
    assert summary["resumed_from_step"] == 4 and summary["tokens_trained"] == 8 * 4 * 32
    assert summary["tokens_per_second"] == pytest.approx(4 * 4 * 32 / summary["train_seconds"])  # this call's steps
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(full) == sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), step
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full", trust_remote_code=True).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "cut", trust_remote_code=True).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_interrupted_checkpoint_save_leaves_no_partial_checkpoint(tmp_path, corpus, monkeypatch):
    from hmamba.train import AtomicCheckpointTrainer

    saves = []

    def failing_rng_save(self, output_dir):
        saves.append(output_dir)
        if len(saves) == 2:
            raise KeyboardInterrupt("simulated kill during the second checkpoint")
        return original(self, output_dir)

    original = AtomicCheckpointTrainer._save_rng_state
    monkeypatch.setattr(AtomicCheckpointTrainer, "_save_rng_state", failing_rng_save)
    with pytest.raises(KeyboardInterrupt):
        train(str(tmp_path / "run"), data=corpus, max_steps=6, save_steps=2, **FAST)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]
    assert (tmp_path / "run" / "checkpoint-2" / "rng_state.pth").exists()
    monkeypatch.undo()
    train(str(tmp_path / "run"), data=corpus, max_steps=6, save_steps=2, resume=True, **FAST)  # picks up at step 2
    assert losses(tmp_path / "run").keys() == set(range(1, 7))


def test_best_checkpoint_is_recorded_at_its_final_path(tmp_path, corpus):
    from transformers import TrainingArguments

    from hmamba.train import AtomicCheckpointTrainer, BlockDataset, build_model

    model, tok = build_model(config_overrides=TINY)
    blocks = pack([Path(corpus).read_text()[:4000]], tok, 32)
    args = TrainingArguments(str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, eval_strategy="steps",
                             eval_steps=2, save_strategy="steps", save_steps=2, save_total_limit=1,
                             load_best_model_at_end=True, metric_for_best_model="eval_loss", use_cpu=True,
                             report_to="none")
    trainer = AtomicCheckpointTrainer(model=model, args=args, train_dataset=BlockDataset(blocks[:-4]),
                                      eval_dataset=BlockDataset(blocks[-4:]))
    trainer.train()  # loads the best checkpoint at the end: it must be where it was moved
    best = trainer.state.best_model_checkpoint
    assert best == str(tmp_path / "run" / f"checkpoint-{trainer.state.best_global_step}") and os.path.isdir(best)
    state = json.loads((Path(best) / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == best


def test_trainer_label_smoothing_shifts_the_labels(tmp_path):
    import torch.nn.functional as F
    from transformers import Trainer, TrainingArguments

    model = tiny_model().train()
    ids = torch.randint(3, 64, (2, 12))
    args = TrainingArguments(str(tmp_path), label_smoothing_factor=0.1, use_cpu=True, report_to="none")
    loss = Trainer(model=model, args=args).compute_loss(model, {"input_ids": ids, "labels": ids.clone()})
    logits = model(ids).logits[:, :-1]  # position t predicts token t + 1
    shifted = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), label_smoothing=0.1)
    assert loss.item() == pytest.approx(shifted.item(), rel=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model().train()
    ids = torch.randint(3, 64, (2, 11))
    grads = []
    for enable in (False, True):
        m = copy.deepcopy(model)
        if enable:
            m.gradient_checkpointing_enable()
        m(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_trainer_with_gradient_checkpointing_and_bf16_on_cpu(tmp_path, corpus):
    summary = train(str(tmp_path / "run"), data=corpus, max_steps=4, gradient_checkpointing=True, bf16=True, **FAST)
    assert torch.isfinite(torch.tensor(summary["train_loss"])) and torch.isfinite(torch.tensor(summary["eval_loss"]))


def test_report_to_tensorboard_writes_events(tmp_path, corpus):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (it is in hmamba[test])")
    train(str(tmp_path / "run"), data=corpus, max_steps=2, report_to="tensorboard", **FAST)
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))


# ---- what trains ------------------------------------------------------------------------------------------


def test_train_only_the_high_stack_leaves_everything_else_bit_identical(tmp_path, corpus):
    from hmamba.train import build_model

    torch.manual_seed(0)
    before, _ = build_model(config_overrides=TINY)
    before = {k: v.clone() for k, v in before.state_dict().items()}
    train(str(tmp_path / "run"), data=corpus, max_steps=3, train_only=("high",), seed=0, **FAST)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run", trust_remote_code=True).state_dict()
    for name, value in after.items():
        if parameter_group(name) == "high":
            continue
        assert torch.equal(before[name], value), f"{name} changed although only the H-stack trains"
    assert any(not torch.equal(before[n], after[n]) for n in after if parameter_group(n) == "high")


def test_set_trainable_rejects_unknown_or_empty_selections():
    with pytest.raises(ValueError, match=r"unknown parameter group\(s\) \['middle'\]"):
        set_trainable(tiny_model(), train_only=("middle",))
    with pytest.raises(ValueError, match="nothing left to train"):
        set_trainable(tiny_model(), freeze=("embeddings", "low", "high", "out", "norm_f"))


def test_lora_targets_per_stack():
    from peft import PeftModel

    peft_model = add_lora(tiny_model(), stacks=("high",))
    assert isinstance(peft_model, PeftModel)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    assert adapted and all(".high_layers." in n for n in adapted)
    assert len(adapted) == 4 * 2  # in_proj, x_proj, dt_proj, out_proj in both H layers
    with pytest.raises(ValueError, match="unknown LoRA stacks"):
        lora_target_modules(stacks=("middle",))


def test_every_lora_adapter_gets_a_gradient_and_changes_the_output(tmp_path):
    from peft import PeftModel

    base = tiny_model()
    ids = torch.randint(3, 64, (2, 13))
    reference = base(ids).logits
    model = add_lora(copy.deepcopy(base)).train()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 4 * 5  # A and B for 4 projections in 5 layers
    assert all(p.requires_grad for p in lora.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    optimizer = torch.optim.SGD(list(lora.values()), lr=0.5)
    for _ in range(2):  # lora_B starts at zero: lora_A's gradient is zero until B has moved once
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        dead = [n for n, p in lora.items() if p.grad is None or p.grad.abs().max() == 0]
        optimizer.step()
    assert not dead, f"adapters with no gradient: {dead}"
    model.eval()
    adapted = model(ids).logits
    assert (adapted - reference).abs().max() > 1e-3

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(ids).logits, adapted)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "HMambaForCausalLM"
    torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_train_with_lora_saves_adapters_or_the_merged_model(tmp_path, corpus):
    base = str(tmp_path / "base")
    os.makedirs(os.path.join(base, ".staging", "checkpoint-9"))  # a killed save's leftovers: not a non-empty OUT
    train(base, data=corpus, max_steps=1, **FAST)
    lora = dict(FAST, config_overrides=None, model=base, lora=True)
    with pytest.raises(ValueError, match="LoRA adapts a pretrained model: pass model"):
        train(str(tmp_path / "x"), data=corpus, max_steps=1, **dict(lora, model=None))  # random base, never saved
    train(str(tmp_path / "adapters"), data=corpus, max_steps=2, lora_stacks=("low",), **lora)
    assert (tmp_path / "adapters" / "adapter_model.safetensors").exists()
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert "low_layers" in config["target_modules"] and "high_layers" not in config["target_modules"]
    assert config["base_model_name_or_path"] == base
    from hmamba.generate import load

    adapted, _ = load(str(tmp_path / "adapters"))  # what `hmamba generate/eval --model ADAPTERS` loads
    assert any("lora" in n for n in adapted.state_dict())
    summary = train(str(tmp_path / "merged"), data=corpus, max_steps=2, merge_lora=True, **lora)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    assert not any("lora" in n for n in model.state_dict())
    adapters = add_lora(AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True))
    assert summary["trainable_parameters"] == adapters.num_parameters(only_trainable=True) > 0  # counted before merging
    assert summary["parameters"] == model.num_parameters()
    with pytest.raises(ValueError, match="LoRA already freezes"):
        train(str(tmp_path / "x"), data=corpus, max_steps=1, freeze=("low",), **lora)


# ---- multi-process and CLI --------------------------------------------------------------------------------


def test_accelerate_two_processes_end_with_the_same_model(tmp_path, corpus):
    # `--multi_gpu` selects accelerate's torchrun launcher; without CUDA the processes use gloo on the CPU
    script = Path(__file__).parent / "ddp_train.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path / "run"), corpus],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    digests = {p.name: p.read_text() for p in (tmp_path / "run").glob("rank*.sha256")}
    assert sorted(digests) == ["rank0.sha256", "rank1.sha256"], result.stdout[-2000:]
    assert len(set(digests.values())) == 1, digests
    summary = json.loads((tmp_path / "run" / "train_results.json").read_text())
    assert summary["tokens_trained"] == 3 * 4 * 2 * 32  # steps * batch * 2 ranks * block: both ranks trained


def test_cli_train(tmp_path, corpus, capsys):
    code = cli_main(["train", str(tmp_path / "run"), "--data", corpus, "--set", "hidden_size=16", "--set",
                     "chunk_size=3", "--max-steps", "2", "--block-size", "32", "--batch-size", "2",
                     "--max-eval-blocks", "2"])
    assert code == 0
    assert "summary: 2 steps" in capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "train_results.json").read_text())
    assert results["command"].startswith(f"hmamba train {tmp_path / 'run'} --data {corpus}")  # how it was made
    assert json.loads((tmp_path / "run" / "config.json").read_text())["chunk_size"] == 3
    assert cli_main(["train", str(tmp_path / "bad"), "--data", str(tmp_path / "missing.txt")]) == 2


def test_cli_errors_are_one_line_messages(tmp_path, capsys, monkeypatch):
    def error(argv):
        code = cli_main(argv)
        return code, capsys.readouterr().err

    tiny_model().save_pretrained(tmp_path / "no-tokenizer")
    (tmp_path / "empty").mkdir()
    capsys.readouterr()  # the save's progress bar
    assert error(["generate", "--model", str(tmp_path / "nope")]) == (
        2, f"hmamba generate: error: {tmp_path / 'nope'}: no such model folder (nor a Hub id such as owner/name)\n")
    code, err = error(["generate", "--model", str(tmp_path / "no-tokenizer")])
    assert code == 2 and "cannot load a tokenizer from" in err and "Pass --tokenizer" in err
    code, err = error(["generate", "--model", str(tmp_path / "empty")])  # transformers' OSError: no config.json
    assert code == 2 and err.startswith("hmamba generate: error:") and "config.json" in err
    code, err = error(["train", str(tmp_path / "run"), "--set", "chunksize=4"])
    assert code == 2 and "--set chunksize: not a config field" in err and "chunk_size" in err

    # refused before any work, leaving nothing behind
    MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2)).save_pretrained(tmp_path / "hf")
    for argv in (["generate", "--model", str(tmp_path / "hf")], ["train", str(tmp_path / "run"), "--model",
                                                                 str(tmp_path / "hf"), "--tokenizer", "x"]):
        code, err = error(argv)
        assert code == 2 and "holds a 'mamba' model, not an HMamba" in err and "hmamba convert" in err
    monkeypatch.chdir(tmp_path)  # `runs/kjv` where runs/ is a local folder: a mistyped path, not a Hub id to retry
    (tmp_path / "runs").mkdir()
    code, err = error(["generate", "--model", "runs/kjv"])
    assert code == 2 and "runs/kjv: no such model folder (not read as a Hub id: runs/ is a folder here)" in err
    code, err = error(["train", str(tmp_path / "runs"), "--resume"])
    assert code == 2 and "no checkpoint-N folder" in err
    code, err = error(["train", str(tmp_path / "no-tokenizer")])  # a folder with a model in it
    assert code == 2 and "is not empty: choose another folder, remove it, or pass --resume" in err
    code, err = error(["generate", "--save-dir", str(tmp_path / "no-tokenizer")])
    assert code == 2 and "--save-dir" in err and "is not empty" in err
    if importlib.util.find_spec("wandb") is None:
        code, err = error(["train", str(tmp_path / "w"), "--report-to", "wandb"])
        assert code == 2 and "report_to wandb: not installed here (pip install wandb)" in err
    assert sorted(os.listdir(tmp_path)) == ["empty", "hf", "no-tokenizer", "runs"]
    assert os.listdir(tmp_path / "runs") == []
    for argv, needle in ((["train", "out", "--block-size", "0"], "--block-size: 0 is below the minimum, 1"),
                         (["train", "out", "--lr", "-1"], "--lr: -1.0 must be > 0"),
                         (["generate", "--max-new-tokens", "0"], "--max-new-tokens: 0 is below the minimum, 1")):
        with pytest.raises(SystemExit) as exit_:
            cli_main(argv)
        assert exit_.value.code == 2 and needle in capsys.readouterr().err

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("hmamba.generate.run", interrupted)
    assert error(["generate"]) == (130, "\nhmamba generate: interrupted\n")  # Ctrl-C: one line, no traceback
    bad_devices = [("foo", "is not a torch device")] + ([] if torch.cuda.is_available() else [("cuda", "no CUDA")])
    for device, needle in bad_devices:
        with pytest.raises(SystemExit) as exit_:
            cli_main(["generate", "--device", device])
        assert exit_.value.code == 2 and needle in capsys.readouterr().err
    version = subprocess.run([sys.executable, "-m", "hmamba", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("hmamba 0.")


# ---- the shipped model and the main command -----------------------------------------------------------------


def test_shipped_model_is_small_hierarchical_trained_and_reproducible():
    from hmamba.eval.perplexity import block_perplexity
    from hmamba.generate import held_out_blocks, pretrained_dir
    from hmamba.modeling_hmamba import HMambaForCausalLM

    folder = pretrained_dir()
    assert (folder / "model.safetensors").stat().st_size < 8_000_000
    model = HMambaForCausalLM.from_pretrained(folder).eval()
    assert model.config.chunk_size > 1 and model.config.num_high_layers > 0
    tok = AutoTokenizer.from_pretrained(folder)  # what a user loads with it: the ids it was trained on, no eos added
    assert tok("And God said")["input_ids"] == default_tokenizer()("And God said")["input_ids"] == [
        ord(c) + 3 for c in "And God said"
    ]
    assert tok.eos_token_id == model.config.eos_token_id == model.generation_config.eos_token_id
    results = json.loads((folder / "train_results.json").read_text())
    assert results["command"].startswith("hmamba train ") and "--data kjv.txt" in results["command"]
    torch.manual_seed(0)
    untrained = HMambaForCausalLM(model.config).eval()
    description, blocks = held_out_blocks(default_tokenizer(), max_blocks=4)
    trained_ppl, untrained_ppl = (block_perplexity(m, blocks)["perplexity"] for m in (model, untrained))
    assert trained_ppl < untrained_ppl / 10, (description, trained_ppl, untrained_ppl)


def test_main_command_generates_with_the_shipped_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert cli_main(["generate", "--max-new-tokens", "2"]) == 0
    assert os.listdir(tmp_path / "tmp") == []  # the default save folder is removed at the end
    assert cli_main(["generate", "--save-dir", str(tmp_path / "m"), "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "--- 'In the beginning' ->" in out and "held-out perplexity on" in out
    assert {"modeling_hmamba.py", "configuration_hmamba.py", "model.safetensors"} <= set(os.listdir(tmp_path / "m"))
    assert "auto_map" in json.loads((tmp_path / "m" / "config.json").read_text())


def test_hierarchy_vs_flat_example_runs_end_to_end(tmp_path, corpus):
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    try:
        import hierarchy_vs_flat
    finally:
        sys.path.pop(0)
    hierarchy_vs_flat.main(["--data", corpus, "--out", str(tmp_path), "--hidden-size", "16", "--steps", "2",
                            "--batch-size", "2", "--block-size", "32", "--eval-blocks", "2", "--chunk-sizes", "4",
                            "--finetune-steps", "2"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["flat", "hmamba-c4"]
    assert len({r["parameters"] for r in results["runs"]}) == 1  # same parameter count
    assert results["finetune"]["before_bits_per_byte"] > 0 and (tmp_path / "hierarchy_vs_flat.png").stat().st_size
    assert "| flat | 6/0/0 | 1 |" in (tmp_path / "results.md").read_text()


def test_train_writes_a_model_card_and_pushes(tmp_path, corpus, hub, monkeypatch, capsys):
    import yaml

    train(str(tmp_path / "run"), data=corpus, max_steps=2, push_to_hub="me/hmamba-shakespeare",
          command="hmamba train run", **FAST)
    card = (tmp_path / "run" / "README.md").read_text()
    assert "hmamba train run" in card and "held-out loss" in card
    (repo, files, _), = hub.commits
    assert repo == "me/hmamba-shakespeare"
    assert {"README.md", "config.json", "model.safetensors", "modeling_hmamba.py", "tokenizer_config.json"} <= set(files)
    assert not any(f.startswith("checkpoint-") for f in files)
    assert "hmamba" in yaml.safe_load(card.split("---\n")[1])["tags"]
    with pytest.raises(ValueError, match="not a Hub repo id"):
        train(str(tmp_path / "x"), data=corpus, max_steps=1, push_to_hub="no-owner", **FAST)
    with pytest.raises(ValueError, match="--merge-lora"):
        train(str(tmp_path / "x"), data=corpus, max_steps=1, push_to_hub="me/x", model=str(tmp_path / "run"),
              lora=True, **dict(FAST, config_overrides=None))

    class ConnectError(Exception):  # what huggingface_hub's HTTP client raises offline: no OSError, no RuntimeError
        pass

    def offline(self, repo_id, **kwargs):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", offline)
    with pytest.raises(ValueError, match=r"upload to me/y failed \(ConnectError: .*the model is saved in .*hf upload"):
        train(str(tmp_path / "y"), data=corpus, max_steps=1, push_to_hub="me/y", **FAST)
    assert "summary: 1 steps" in capsys.readouterr().out and (tmp_path / "y" / "model.safetensors").exists()
