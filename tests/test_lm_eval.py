"""lm-eval harness integration: `--model hmamba` and `--model hf` on HMamba checkpoints, batched requests equal
one-at-a-time ones, the shipped offline tasks end to end, `hmamba eval`."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason="lm-eval (the hmamba[eval] extra) is not installed")

from lm_eval.api.instance import Instance  # noqa: E402
from transformers import ByT5Tokenizer, MambaConfig, MambaForCausalLM  # noqa: E402

from hmamba.cli import main  # noqa: E402
from hmamba.eval.harness import evaluate, run  # noqa: E402
from hmamba.eval.lm import HMambaLM  # noqa: E402

from conftest import tiny_model  # noqa: E402

CONTEXTS = ["In the beginning", "And God said, Let there be light", "Shall I compare thee", "O", "To be or not"]
CONTINUATIONS = [" God", ": and there was light.", " to a summer's day?", " Romeo", " to be"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hmamba-byt5")
    tiny_model(vocab_size=259, chunk_size=3, pooling="mean").save_pretrained(folder)
    ByT5Tokenizer(extra_ids=0).save_pretrained(folder)
    return str(folder)


def requests(kind, arguments):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(arguments)]


def lm(model_dir, batch_size, **kwargs):
    return HMambaLM(pretrained=model_dir, batch_size=batch_size, device="cpu", dtype="float32", **kwargs)


# --- registration ----------------------------------------------------------------------------------------


def test_hmamba_is_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("hmamba") is HMambaLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models are still found


def test_import_hmamba_does_not_import_lm_eval_but_registers_when_it_is_loaded():
    code = ("import sys, hmamba; assert 'lm_eval' not in sys.modules, 'import hmamba imported lm_eval'; "
            "import lm_eval.api.registry as r; import importlib; importlib.reload(hmamba); "
            "print(r.get_model('hmamba').__name__, r.get_model('hf').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["HMambaLM", "HFLM"]


# --- request types, batch size 1 vs batched ------------------------------------------------------------


def test_loglikelihood_matches_the_model_and_is_batch_invariant(model_dir):
    single = lm(model_dir, 1)
    pairs = list(zip(CONTEXTS, CONTINUATIONS))
    one = single.loglikelihood(requests("loglikelihood", pairs))
    four = lm(model_dir, 4).loglikelihood(requests("loglikelihood", pairs))
    for (a, greedy_a), (b, greedy_b) in zip(one, four):  # right-padded batches == batch size 1
        assert abs(a - b) < 1e-4 and greedy_a == greedy_b

    tok, model = single.tokenizer, single.model  # an independent computation of the first request
    ctx, cont = tok.encode(CONTEXTS[0], add_special_tokens=False), tok.encode(CONTINUATIONS[0], add_special_tokens=False)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0, :-1], -1)
    expected = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert abs(one[0][0] - expected) < 1e-4


def test_loglikelihood_rolling_is_batch_invariant_and_exact_in_one_window(model_dir):
    docs = [("The quick brown fox jumps over the lazy dog. " * 3,), ("Shall I compare thee to a summer's day?",),
            ("Hi",)]
    one = lm(model_dir, 1, max_length=32).loglikelihood_rolling(requests("loglikelihood_rolling", docs))
    three = lm(model_dir, 3, max_length=32).loglikelihood_rolling(requests("loglikelihood_rolling", docs))
    assert all(abs(a - b) < 1e-4 for a, b in zip(one, three))

    whole = lm(model_dir, 1, max_length=1024)  # one window: sum of log p(token | EOS prefix and earlier tokens)
    tok = whole.tokenizer
    ids = [tok.eos_token_id] + tok.encode(docs[1][0], add_special_tokens=False)
    with torch.no_grad():
        logp = F.log_softmax(whole.model(torch.tensor([ids])).logits[0, :-1], -1)
    expected = logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
    assert abs(whole.loglikelihood_rolling(requests("loglikelihood_rolling", docs[1:2]))[0] - expected) < 1e-3


def test_generate_until_left_padded_batch_equals_one_prompt_at_a_time(model_dir):
    args = [(c, {"until": ["\n\n"], "max_gen_toks": 7, "do_sample": False}) for c in CONTEXTS]
    one = lm(model_dir, 1).generate_until(requests("generate_until", args))
    batched = lm(model_dir, 5).generate_until(requests("generate_until", args))
    assert batched == one
    assert len(set(one)) > 1  # the prompts lead somewhere different: the comparison is not vacuous


# --- the harness end to end -------------------------------------------------------------------------------


def test_offline_tasks_end_to_end_through_hmamba_and_hf_models(model_dir):
    results = evaluate(model_dir, "hmamba_offline", batch_size=2, limit=3)["results"]
    assert set(results) >= {"hmamba_lastword", "hmamba_arc_easy", "hmamba_sonnets"}
    assert 0 <= results["hmamba_lastword"]["acc,none"] <= 1 and results["hmamba_lastword"]["perplexity,none"] > 1
    assert 0 <= results["hmamba_arc_easy"]["acc,none"] <= 1
    # random weights: about 8 bits per byte of text (uniform over 259 bytes would be log2(259) = 8.02)
    assert 6 < results["hmamba_sonnets"]["bits_per_byte,none"] < 11
    # the stock route: lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True,add_bos_token=False
    # (add_bos_token=False: the byte tokenizer would otherwise append EOS to every context; HMambaLM's default)
    hf = evaluate(model_dir, "hmamba_lastword,hmamba_sonnets", model_type="hf", batch_size=1, limit=3,
                  model_args=dict(add_bos_token=False))["results"]
    assert math.isclose(hf["hmamba_lastword"]["perplexity,none"], results["hmamba_lastword"]["perplexity,none"],
                        rel_tol=1e-4)
    assert math.isclose(hf["hmamba_sonnets"]["bits_per_byte,none"], results["hmamba_sonnets"]["bits_per_byte,none"],
                        rel_tol=1e-4)


def test_python_m_hmamba_eval_is_lm_evals_cli_with_hmamba_registered(model_dir, tmp_path, capsys):
    from hmamba.eval.harness import lm_eval_main

    argv = ["--model", "hmamba", "--model_args", f"pretrained={model_dir}", "--tasks", "hmamba_lastword",
            "--limit", "2", "--device", "cpu", "--output_path", str(tmp_path / "out")]
    assert lm_eval_main(argv) == 0
    assert "hmamba_lastword" in capsys.readouterr().out
    assert list((tmp_path / "out").rglob("results_*.json"))


def test_hmamba_eval_cli_writes_json_and_perplexity_table(model_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("From fairest creatures we desire increase,\nThat thereby beauty's rose might never die.\n" * 2)
    out = tmp_path / "results" / "eval.json"
    argv = ["eval", model_dir, "--tasks", "hmamba_lastword", "--limit", "2", "--text", str(text),
            "--max-length", "64", "--stride", "16,32", "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "exact (state carried across segments)" in printed and "sliding window 64, stride 16" in printed
    report = json.loads(out.read_text())
    assert "hmamba_lastword" in report["lm_eval"]["results"]
    rows = report["perplexity"]["rows"]
    assert [r["method"] for r in rows][1:] == ["sliding window 64, stride 16", "sliding window 64, stride 32"]
    assert all(r["tokens"] == len(text.read_bytes()) - 1 for r in rows)  # byte tokenizer: one token per byte
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left behind


# --- errors ---------------------------------------------------------------------------------------------


def test_hub_tasks_offline_fail_naming_the_hub(model_dir):
    with pytest.raises(ValueError, match="Hugging Face Hub.*offline tasks hmamba_lastword"):
        evaluate(model_dir, "lambada_openai,hellaswag,piqa,arc_easy,arc_challenge,winogrande")


def test_bad_eval_input(model_dir, tmp_path, capsys, monkeypatch):
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        evaluate(model_dir, "no_such_task")
    with pytest.raises(ValueError, match="nothing to evaluate"):
        run(model_dir)
    with pytest.raises(FileNotFoundError, match="no such file"):
        run(model_dir, text=str(tmp_path / "missing.txt"))
    assert main(["eval", model_dir, "--tasks", "hmamba_lastword", "--stride", "a,b"]) == 2
    assert "hmamba eval: error: --stride 'a,b'" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ValueError, match=r"lm-eval harness, which is not installed: pip install 'hmamba\[eval\]'"):
        run(model_dir, tasks="hmamba_lastword")
    monkeypatch.undo()
    with pytest.raises(IsADirectoryError, match="--output .* is a folder"):  # before the evaluation, not after
        run(model_dir, tasks="hmamba_lastword", output=str(tmp_path))
    MambaForCausalLM(MambaConfig(vocab_size=259, hidden_size=16, num_hidden_layers=2)).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="holds a 'mamba' model, not an HMamba"):
        run(str(tmp_path / "hf"), tasks="hmamba_lastword")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        run(str(tmp_path), tasks="hmamba_lastword", model_type="hf")  # stock HFLM takes any model, but a model
