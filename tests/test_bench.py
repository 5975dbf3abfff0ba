"""`hmamba bench`: the models it compares share weights, its FLOP and memory accounting, and the report files."""

import importlib.util
import json
import os

import pytest
import torch
from torch import nn

from hmamba.cli import main
from hmamba.eval.bench import (PeakMemory, anchor_model, format_tables, hmamba_from_anchor, matmul_flops, time_ratio,
                                run)


def test_hmamba_from_anchor_chunk_size_1_computes_the_anchor():
    anchor = anchor_model(vocab=64, width=16, layers=4).eval()
    ours = hmamba_from_anchor(anchor, 1).eval()
    ids = torch.randint(0, 64, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, use_cache=False).logits, anchor(ids, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_matmul_flops_count_every_linear_call(chunk_size):
    anchor = anchor_model(vocab=64, width=16, layers=4)
    model = hmamba_from_anchor(anchor, chunk_size).eval()
    counted = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: counted.append(2 * inp[0].numel() // mod.in_features
                                                                          * mod.in_features * mod.out_features))
             for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 32)), use_cache=False)
    for h in hooks:
        h.remove()
    assert matmul_flops(model, 32) == sum(counted)
    assert matmul_flops(anchor, 32) >= matmul_flops(model, 32)


def test_peak_memory_sees_a_cpu_tensor_allocation():
    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(16 * 2**20)  # 64 MiB, written so that it is resident
        del x
    if mem.bytes is None:
        pytest.skip("peak memory needs Linux /proc/self/clear_refs, which this system lacks")
    assert 60 * 2**20 < mem.bytes < 200 * 2**20


def test_quick_bench_writes_table_json_and_png(tmp_path):
    lines = []
    result = run(out_dir=tmp_path, preset="quick", chunk_sizes=(1, 2), lengths=(8, 16), batch_sizes=(1, 2),
                 decode_tokens=(1, 3), train_lengths=(8,), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    data = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    models = ["transformers Mamba", "hmamba s=1", "hmamba s=2"]
    cells = {(r["section"], r["model"], r["x"]) for r in data["records"]}
    for m in models:
        assert {("prefill", m, 8), ("prefill", m, 16), ("decode", m, 1), ("decode", m, 2), ("train", m, 8),
                ("decode_memory", m, 1), ("decode_memory", m, 3)} <= cells
    # generate()'s prefill (cache, last-position logits): HMamba's chunk sizes only, compared in the hierarchy table
    assert {(s, m) for s, m, _ in cells if s == "prefill_last"} == {("prefill_last", m) for m in models[1:]}
    assert set(data["floors"]["prefill"]) == set(models) and data["floors"]["gemm_flops_per_s"] > 0
    assert all(r["tokens_per_s"] > 0 for r in data["records"] if "tokens_per_s" in r)
    # every timed round kept (decode: each round's step latency), so that the tables can pair models round by round
    timed = [r for r in data["records"] if r["section"] in ("prefill", "prefill_last", "decode", "train")]
    assert timed and all(len(r["round_seconds"]) == data["settings"]["repeat"] for r in timed)
    tables = result["tables"]
    for title in ("prefill: tokens/s", "decode: latency", "decode memory", "training step", "floors:", "peak memory:"):
        assert title in tables
    assert "| 16 | " in tables and "x) |" in tables  # a length row with ratios against the anchor
    hierarchy = tables.split("hierarchy:")[1].split("\nfloors:")[0]
    assert all(f"| {section} | {x} | " in hierarchy for section in ("prefill", "prefill, last logits") for x in (8, 16))
    assert format_tables(data) == tables  # bench.json read back renders the same tables
    assert any(line.startswith("summary:") for line in lines)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bench_compile_decode_adds_compiled_decode_columns_only(tmp_path):
    """--compile-decode: decode rows for 'hmamba s=N compiled' (the same model with compile_decode on, on the same
    weights); prefill rows stay without them. The CompileCounter backend stands in for inductor (no C++ build)."""
    from torch._dynamo.testing import CompileCounter

    from hmamba.modeling_hmamba import HMambaPreTrainedModel

    counter, compile_decode = CompileCounter(), HMambaPreTrainedModel.compile_decode
    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HMambaPreTrainedModel, "compile_decode", lambda self: compile_decode(self, backend=counter))
        result = run(out_dir=tmp_path, preset="quick", sections=("prefill", "decode"), chunk_sizes=(1, 2), lengths=(8,),
                     batch_sizes=(1,), decode_tokens=(1, 3), compile_decode=True, log=lambda *a, **k: None)
    torch._dynamo.reset()
    cells = {(r["section"], r["model"]) for r in result["records"]}
    assert ("decode", "hmamba s=1 compiled") in cells and ("prefill", "hmamba s=1 compiled") not in cells
    assert counter.frame_count == 1
    assert "hmamba s=1 compiled" in result["tables"]
    hierarchy = result["tables"].split("hierarchy:")[1].split("\nfloors:")[0]
    assert "hmamba s=2" in hierarchy and "compiled" not in hierarchy  # the hierarchy table compares chunk sizes only


def test_bench_compile_decode_without_a_compiler_fails_before_running(monkeypatch):
    monkeypatch.setattr("hmamba.eval.bench.shutil.which", lambda name: None)
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        run(preset="quick", compile_decode=True, log=lambda *a, **k: None)


def test_bench_bad_input(tmp_path, capsys):
    assert main(["bench", "--quick", "--only", "prefill,nap", "--out-dir", str(tmp_path)]) == 2
    assert "hmamba bench: error: unknown section(s) ['nap']" in capsys.readouterr().err
    assert main(["bench", "--quick", "--decode-tokens", "4", "--out-dir", str(tmp_path)]) == 2
    assert "two or more" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--lengths", "x"])
    with pytest.raises(ValueError, match="repeat must be >= 1"):
        run(out_dir=tmp_path, preset="quick", repeat=0)
    assert main(["bench", "--quick", "--only", "", "--out-dir", str(tmp_path)]) == 2
    assert "no sections to run" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["bench", "--quick", "--out-dir", str(tmp_path / "file")]) == 2  # refused before the run
    err = capsys.readouterr()
    assert "--out-dir" in err.err and "is a file" in err.err and "prefill" not in err.out


def test_bench_without_matplotlib_writes_the_json(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    logged = []
    result = run(out_dir=tmp_path, preset="quick", sections=("prefill",), log=lambda *a, **k: logged.append(a[0]))
    assert result["png"] is None and os.listdir(tmp_path) == ["bench.json"]
    assert any("matplotlib is not installed" in line for line in logged)


def test_hierarchy_ratio_pairs_the_rounds():
    """A machine that drifts between rounds: the per-round ratios cancel the drift, a ratio of medians does not."""
    flat = dict(seconds=1.1, round_seconds=[1.0, 1.1, 2.0])
    chunked = dict(seconds=1.3, round_seconds=[0.7, 1.4, 1.3])  # per round: 0.70, 1.27, 0.65
    assert time_ratio(chunked, flat) == pytest.approx(0.7)
    old = dict(seconds=1.3)  # a bench.json from before the rounds were kept: the ratio of the medians
    assert time_ratio(old, flat) == pytest.approx(1.3 / 1.1)


def test_speed_up_over_the_anchor_pairs_the_rounds():
    """The tables' ratio to the anchor, as the hierarchy's: per round, then the median (here 2.0, 1.5, 2.5x: 2.0x;
    the ratio of the medians would read 1.5x)."""
    records = [dict(section="decode", model="transformers Mamba", x=1, seconds=0.06, latency_ms=60, tokens_per_s=1 / 0.06,
                    round_seconds=[0.04, 0.06, 0.10]),
               dict(section="decode", model="hmamba s=1", x=1, seconds=0.04, latency_ms=40, tokens_per_s=1 / 0.04,
                    round_seconds=[0.02, 0.04, 0.04])]
    tables = format_tables(dict(records=records, memory_method="none"))
    assert "| 1 | 60.0 ms, 16.7 tok/s | 40.0 ms, 25.0 tok/s (2.00x) |" in tables


def test_timed_rounds_run_outside_the_memory_probe(monkeypatch):
    """The probe trims the heap (malloc_trim), so the run after it pays page faults: timed runs must not follow it.
    Each function: a warm-up, `repeat` timed runs in interleaved rounds, then one probed run for its peak."""
    from hmamba.eval import bench

    probing, calls = [False], []

    class Probe:
        def __init__(self, device):
            self.bytes = 7

        def __enter__(self):
            probing[0] = True
            return self

        def __exit__(self, *exc):
            probing[0] = False

    monkeypatch.setattr(bench, "PeakMemory", Probe)
    fns = {k: (lambda k=k: calls.append((k, probing[0]))) for k in ("a", "b")}
    result = bench._timed_rounds(fns, torch.device("cpu"), repeat=3)
    assert calls == [("a", False), ("b", False)] * 4 + [("a", True), ("b", True)]
    assert all(peak == 7 and len(rounds) == 3 for _, peak, rounds in result.values())
