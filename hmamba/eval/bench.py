"""`hmamba bench`: speed and memory of HMamba side by side with transformers' MambaForCausalLM (the anchor) on the
same weights, in one run, on this machine.

Rows: prefill throughput over sequence lengths, decode latency per token and tokens/s over batch sizes, peak memory
(prefill over length, decode over generated tokens), a training step (forward+backward) over lengths, and the floors
this machine allows: the model's matmul FLOPs over the measured GEMM rate (prefill) and the weight bytes read per
token over the measured copy bandwidth (decode). HMamba runs at several chunk sizes with L = H = half the layers and
the anchor's weights (chunk_size 1 computes exactly the anchor's function); on CUDA, mamba_ssm's MambaLMHeadModel
joins when it imports. Ratios are throughput over the anchor's (> 1: faster than the anchor).
"""

import ctypes
import gc
import importlib.util
import math
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from ..atomic import atomic_write, atomic_write_json
from ..configuration_hmamba import HMambaConfig
from ..conversion.checkpoints import LAYER_KEY, stack_key
from ..modeling_hmamba import HMambaForCausalLM

PRESETS = {
    # a few seconds: for tests and for checking the command
    "quick": dict(vocab=256, width=32, layers=4, lengths=(16, 64), batch_sizes=(1, 2), decode_tokens=(2, 4),
                  train_vocab=256, train_width=32, train_layers=2, train_lengths=(16, 32), chunk_sizes=(1, 4),
                  prompt=8, repeat=1, copy_mib=16),
    # state-spaces/mamba-130m shapes; the training rows use the 256-wide, 8-layer model of the speed issue
    "130m": dict(vocab=50280, width=768, layers=24, lengths=(128, 256, 512, 1024, 2048, 4096, 8192),
                 batch_sizes=(1, 4, 16), decode_tokens=(16, 64), train_vocab=1024, train_width=256, train_layers=8,
                 train_lengths=(128, 256, 512, 1024, 2048, 4096), chunk_sizes=(1, 4, 16), prompt=16, repeat=2,
                 copy_mib=256),
    "370m": dict(vocab=50280, width=1024, layers=48, lengths=(128, 512, 2048, 8192), batch_sizes=(1, 4, 16),
                 decode_tokens=(16, 64), train_vocab=1024, train_width=256, train_layers=8,
                 train_lengths=(128, 512, 2048), chunk_sizes=(1, 4, 16), prompt=16, repeat=1, copy_mib=256),
    "1.4b": dict(vocab=50280, width=2048, layers=48, lengths=(128, 512, 2048, 8192), batch_sizes=(1, 4, 16),
                 decode_tokens=(16, 64), train_vocab=1024, train_width=256, train_layers=8,
                 train_lengths=(128, 512, 2048), chunk_sizes=(1, 4, 16), prompt=16, repeat=1, copy_mib=256),
}
SECTIONS = ("prefill", "decode", "train")
ANCHOR = "transformers Mamba"
FLAT = "hmamba s=1"  # chunk_size 1: the anchor's function; the hierarchy table compares each chunk size with it
MAMBA_SSM = "mamba_ssm"


# ----------------------------------------------------------------------------------------------------------
# peak memory


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _cpu_peak_supported():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kib("VmHWM")
        return True
    except OSError:
        return False


def memory_method(device):
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during the call minus the memory allocated before it"
    if _cpu_peak_supported():
        return ("CPU: rise of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over the "
                "resident set just before the call, after gc and malloc_trim; weights and earlier runs excluded; in a run of "
                "its own after the timed rounds")
    return "not measured (needs Linux /proc/self/clear_refs)"


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then m.bytes: the peak memory the block needed above what was in use
    when it started (None where it cannot be measured)."""

    def __init__(self, device):
        self.device, self.bytes = device, None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif _cpu_peak_supported():
            try:  # hand freed heap pages back, so the next run cannot hide its peak in them
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            self.base = _proc_status_kib("VmRSS") * 1024
        else:
            self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            self.bytes = max(0, _proc_status_kib("VmHWM") * 1024 - self.base)


# ----------------------------------------------------------------------------------------------------------
# models on the same weights


def anchor_model(vocab, width, layers, seed=0):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    return MambaForCausalLM(MambaConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers))


def hmamba_from_anchor(anchor, chunk_size):
    """HMamba with L = H = half the anchor's layers, chunk_size s, and the anchor's weights."""
    c = anchor.config
    low = c.num_hidden_layers // 2
    config = HMambaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, state_size=c.state_size,
                          expand=c.expand, conv_kernel=c.conv_kernel, time_step_rank=c.time_step_rank,
                          num_low_layers=low, num_high_layers=c.num_hidden_layers - low, chunk_size=chunk_size)
    state = {}
    for key, value in anchor.state_dict().items():
        m = LAYER_KEY.match(key)
        if m:
            key = stack_key(config, int(m.group(1)), m.group(2))
        state[key] = value
    with torch.device("meta"):
        model = HMambaForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model


def mamba_ssm_from_anchor(anchor):
    """mamba_ssm's MambaLMHeadModel with the anchor's weights, or None where mamba_ssm does not import (it needs
    CUDA: never call this on a CPU-only machine)."""
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except ImportError:
        return None
    c = anchor.config
    config = MambaConfig(d_model=c.hidden_size, n_layer=c.num_hidden_layers, vocab_size=c.vocab_size,
                         ssm_cfg=dict(layer="Mamba1", d_state=c.state_size, d_conv=c.conv_kernel, expand=c.expand),
                         rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=1)
    model = MambaLMHeadModel(config)
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in anchor.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embedding in both
        raise RuntimeError(f"anchor -> MambaLMHeadModel: missing {missing}, unexpected {unexpected}")
    return model


def models_for(preset, chunk_sizes, device, dtype):
    """{name: model} on the same weights: the anchor, HMamba per chunk size, mamba_ssm on CUDA."""
    anchor = anchor_model(preset["vocab"], preset["width"], preset["layers"])
    models = {ANCHOR: anchor}
    models.update({f"hmamba s={s}": hmamba_from_anchor(anchor, s) for s in chunk_sizes})
    if device.type == "cuda":
        ssm = mamba_ssm_from_anchor(anchor)
        if ssm is not None:
            models[MAMBA_SSM] = ssm
    return {k: m.to(device=device, dtype=dtype).eval() for k, m in models.items()}


def compiled_decode_models(models, chunk_sizes):
    """{'hmamba s=N compiled': model}: HMamba per chunk size again, on the anchor's weights (shared, not copied),
    with `compile_decode` on; they join the decode rows only (prefill runs the same code as without it)."""
    return {f"hmamba s={s} compiled": hmamba_from_anchor(models[ANCHOR], s).eval().compile_decode() for s in chunk_sizes}


# ----------------------------------------------------------------------------------------------------------
# floors


def matmul_flops(model, length):
    """Matrix-product FLOPs of one forward over `length` tokens with logits at every position: per layer
    in_proj, x_proj, dt_proj, out_proj (H layers on length // chunk_size positions), plus the lm_head."""
    c = model.config
    d, di = c.hidden_size, c.intermediate_size
    rank, n = c.time_step_rank, c.state_size
    per_position = 2 * (d * 2 * di + di * (rank + 2 * n) + rank * di + di * d)
    if isinstance(model, HMambaForCausalLM):
        positions = (c.num_low_layers + c.num_out_layers) * length + c.num_high_layers * (length // c.chunk_size)
    else:
        positions = c.num_hidden_layers * length
    return per_position * positions + 2 * d * c.vocab_size * length


def weight_bytes_per_token(model):
    """Bytes of weights one decode step reads, averaged over tokens: every token-rate layer, the H layers once
    per chunk, norm_f and the lm_head (the tied embedding, counted once; the embedding lookup reads one row)."""
    c = model.config
    size = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())  # noqa: E731
    if isinstance(model, HMambaForCausalLM):
        b = model.backbone
        layers = size(b.low_layers) + size(b.out_layers) + size(b.high_layers) / c.chunk_size
        return layers + size(b.norm_f) + size(model.lm_head)
    return size(model.backbone.layers) + size(model.backbone.norm_f) + size(model.lm_head)


def has_cxx_compiler():
    """Whether torch.compile's inductor backend can build CPU kernels here (a C++ compiler on PATH or in CXX)."""
    return any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++", "c++") if c)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(device, dtype, m=1024, k=768, n=3072, repeat=5):
    """Measured FLOP/s of an (m, k) @ (k, n) product (in_proj's shape at 130m over 1024 tokens); best of runs."""
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(repeat + 1):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def copy_bandwidth(device, mib, repeat=5):
    """Measured bytes/s of a large tensor copy, counting bytes read plus bytes written (as STREAM); best of runs."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(repeat + 1):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


# ----------------------------------------------------------------------------------------------------------
# measurements


def _timed_rounds(fns, device, repeat):
    """{key: (median seconds, peak bytes, seconds of each round)} for each function of `fns`: one warm-up each, then
    `repeat` rounds that run every function once, in turn, so that a shared machine's drift hits all of them alike
    (and a ratio of two functions can be taken per round); then one more run each, untimed, for its peak memory. The
    timed runs go without the memory probe: it hands freed heap pages back to the system (malloc_trim), and a run
    right after it pays page faults for memory that a loop of calls would reuse (a 256-wide training step at T=128
    took 86 instead of 70 ms)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - start)
    peaks = {}
    for key, fn in fns.items():
        with PeakMemory(device) as mem:
            fn()
        peaks[key] = mem.bytes
    return {k: (statistics.median(t), peaks[k], t) for k, t in times.items()}


def _generate(model, prompt, tokens):
    if type(model).__module__.startswith("mamba_ssm"):
        return model.generate(prompt, max_length=prompt.shape[1] + tokens, top_k=1, cg=True)
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                          min_new_tokens=tokens, do_sample=False, pad_token_id=0)


class Bench:
    def __init__(self, preset="quick", device="cpu", dtype="float32", sections=SECTIONS, chunk_sizes=None,
                 lengths=None, batch_sizes=None, decode_tokens=None, train_lengths=None, anchor_train_max=512,
                 anchor_prefill_max=4096, repeat=None, compile_decode=False, log=print):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
        unknown = set(sections) - set(SECTIONS)
        if unknown:
            raise ValueError(f"unknown section(s) {sorted(unknown)}: choose from {SECTIONS}")
        p = dict(PRESETS[preset])
        for key, value in dict(chunk_sizes=chunk_sizes, lengths=lengths, batch_sizes=batch_sizes,
                               decode_tokens=decode_tokens, train_lengths=train_lengths, repeat=repeat).items():
            if value is not None:
                p[key] = value
        if len(p["decode_tokens"]) < 2 or min(p["decode_tokens"]) < 1:
            raise ValueError(f"decode_tokens needs two or more positive counts, got {p['decode_tokens']}")
        if not all(v >= 1 for k in ("lengths", "batch_sizes", "train_lengths", "chunk_sizes") for v in p[k]):
            raise ValueError("lengths, batch sizes and chunk sizes must be positive integers")
        if p["repeat"] < 1:
            raise ValueError(f"repeat must be >= 1 (timed rounds), got {p['repeat']}")
        if not sections:
            raise ValueError(f"no sections to run: choose from {','.join(SECTIONS)}")
        self.preset_name, self.p, self.sections, self.log = preset, p, tuple(sections), log
        self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        self.anchor_train_max, self.anchor_prefill_max = anchor_train_max, anchor_prefill_max
        self.compile_decode = compile_decode
        if compile_decode and self.device.type == "cpu" and not has_cxx_compiler():
            raise ValueError("--compile-decode on CPU needs a C++ compiler for torch.compile's inductor backend (g++, "
                             "clang++, or one named by CXX): install one, or run without --compile-decode")
        self.records = []

    def _record(self, section, model, x, seconds, peak, **extra):
        rec = dict(section=section, model=model, x=x, seconds=seconds, peak_mib=None if peak is None else peak / 2**20,
                   **extra)
        self.records.append(rec)
        mem = "" if peak is None else f", peak +{peak / 2**20:.1f} MiB"
        rate = f", {rec['tokens_per_s']:.1f} tokens/s" if "tokens_per_s" in rec else ""
        self.log(f"  {section:12s} {model:20s} {x:>6}: {seconds:8.4f} s{rate}{mem}", flush=True)

    @torch.no_grad()
    def prefill(self, models):
        """Logits at every position (section "prefill"); and, for HMamba's chunk sizes up to the anchor's longest
        length, generate()'s prefill: the prompt into a fresh cache with the last position's logits only (section
        "prefill_last", for the hierarchy table: the lm_head over every position costs the same at every chunk
        size). Both in the same interleaved rounds."""
        self.log(f"prefill, batch 1, logits at every position (lengths {list(self.p['lengths'])}; the anchor only up "
                 f"to T={self.anchor_prefill_max}); HMamba also as generate()'s prefill (cache, last-position logits) "
                 f"up to T={self.anchor_prefill_max}", flush=True)
        for length in self.p["lengths"]:
            ids = torch.randint(0, self.p["vocab"], (1, length), device=self.device)
            fns = {("prefill", name): (lambda m=model: m(ids)) if name == MAMBA_SSM else
                   (lambda m=model: m(ids, use_cache=False))
                   for name, model in models.items() if name != ANCHOR or length <= self.anchor_prefill_max}
            if length <= self.anchor_prefill_max:
                fns.update({("prefill_last", name): (lambda m=model: m(ids, use_cache=True, logits_to_keep=1))
                            for name, model in models.items() if name.startswith("hmamba s=")})
            for (section, name), (seconds, peak, rounds) in _timed_rounds(fns, self.device, self.p["repeat"]).items():
                self._record(section, name, length, seconds, peak, tokens_per_s=length / seconds, round_seconds=rounds)

    @torch.no_grad()
    def decode(self, models):
        counts = sorted(self.p["decode_tokens"])
        span = counts[-1] - counts[0]  # tokens between the two generate() lengths
        self.log(f"decode, greedy generate() after a {self.p['prompt']}-token prompt; latency = "
                 f"(time for {counts[-1]} tokens - time for {counts[0]}) / {span}", flush=True)
        for batch in self.p["batch_sizes"]:
            prompt = torch.randint(0, self.p["vocab"], (batch, self.p["prompt"]), device=self.device)
            ns = counts if batch == 1 else (counts[0], counts[-1])
            fns = {(name, n): (lambda m=models[name], n=n: _generate(m, prompt, n)) for name in models for n in ns}
            runs = _timed_rounds(fns, self.device, self.p["repeat"])
            for name in models:
                (short, _, short_rounds), (long, _, long_rounds) = runs[name, counts[0]], runs[name, counts[-1]]
                step = (long - short) / span
                rounds = [(b - a) / span for a, b in zip(short_rounds, long_rounds)]
                method = "difference"
                if step <= 0 or min(rounds) <= 0:  # noise swamped the difference: the (prefill-including) mean
                    step, method = long / counts[-1], "mean including prefill (noisy difference)"
                    rounds = [t / counts[-1] for t in long_rounds]
                for n in ns:
                    seconds, peak, _ = runs[name, n]
                    self.records.append(dict(section="decode_memory", model=name, x=n, batch=batch, seconds=seconds,
                                             peak_mib=None if peak is None else peak / 2**20))
                self._record("decode", name, batch, step, runs[name, counts[-1]][1], latency_ms=1e3 * step,
                             tokens_per_s=batch / step, latency_method=method, round_seconds=rounds)

    def train(self):
        p = self.p
        anchor = anchor_model(p["train_vocab"], p["train_width"], p["train_layers"])
        models = {ANCHOR: anchor, **{f"hmamba s={s}": hmamba_from_anchor(anchor, s) for s in p["chunk_sizes"]}}
        models = {k: m.to(device=self.device, dtype=self.dtype).train() for k, m in models.items()}
        self.log(f"training step, {p['train_width']} wide / {p['train_layers']} layers, vocab {p['train_vocab']}, "
                 f"batch 1 (the anchor only up to T={self.anchor_train_max}: its backward is quadratic in T)", flush=True)
        for length in p["train_lengths"]:
            ids = torch.randint(0, p["train_vocab"], (1, length), device=self.device)

            def forward(model):
                return model(ids, labels=ids, use_cache=False).loss

            def step(model):
                model.zero_grad(set_to_none=True)
                forward(model).backward()

            names = [n for n in models if n != ANCHOR or length <= self.anchor_train_max]
            fns = {(n, part): (lambda m=models[n], f=f: f(m)) for n in names for part, f in (("f", forward), ("fb", step))}
            runs = _timed_rounds(fns, self.device, p["repeat"])
            for name in names:
                (fwd, _, _), (seconds, peak, rounds) = runs[name, "f"], runs[name, "fb"]
                self._record("train", name, length, seconds, peak, forward_s=fwd, tokens_per_s=length / seconds,
                             round_seconds=rounds, backward_over_forward=seconds / fwd)

    def floors(self, models):
        gemm = gemm_rate(self.device, self.dtype)
        bandwidth = copy_bandwidth(self.device, self.p["copy_mib"])
        self.log(f"floors: GEMM {gemm / 1e9:.1f} GFLOP/s, copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
        floors = dict(gemm_flops_per_s=gemm, copy_bytes_per_s=bandwidth, prefill={}, decode={})
        for name, model in models.items():
            if name == MAMBA_SSM:
                continue
            floors["prefill"][name] = {t: matmul_flops(model, t) / gemm for t in self.p["lengths"]}
            per_token = weight_bytes_per_token(model)
            floors["decode"][name] = dict(weight_bytes_per_token=per_token, seconds_per_step=per_token / bandwidth)
        return floors

    def run(self):
        p, start = self.p, time.perf_counter()
        self.log(f"hmamba bench, preset {self.preset_name}: torch {torch.__version__}, {self.device}, "
                 f"{str(self.dtype).replace('torch.', '')}, {torch.get_num_threads()} threads", flush=True)
        self.log(f"peak memory: {memory_method(self.device)}", flush=True)
        result = dict(preset=self.preset_name, settings={k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
                      device=str(self.device), device_name=device_name(self.device),
                      dtype=str(self.dtype).replace("torch.", ""), torch=torch.__version__,
                      threads=torch.get_num_threads(), memory_method=memory_method(self.device), floors=None)
        if "prefill" in self.sections or "decode" in self.sections:
            models = models_for(p, p["chunk_sizes"], self.device, self.dtype)
            result["models"] = {k: sum(t.numel() for t in m.parameters()) for k, m in models.items()}
            result["floors"] = self.floors(models)
            if "prefill" in self.sections:
                self.prefill(models)
            if "decode" in self.sections:
                compiled = compiled_decode_models(models, p["chunk_sizes"]) if self.compile_decode else {}
                self.decode({**models, **compiled})
            del models
        if "train" in self.sections:
            self.train()
        result["records"] = self.records
        result["seconds"] = time.perf_counter() - start
        return result


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


# ----------------------------------------------------------------------------------------------------------
# report


def _cells(result, section, key="x"):
    table = {}
    for r in result["records"]:
        if r["section"] == section:
            table.setdefault(r[key], {})[r["model"]] = r
    return table


def time_ratio(record, reference):
    """record's time over the reference's for the same work: the median of the per-round ratios where both have them
    (each round runs the two back to back, so a drifting machine cancels out), else the ratio of the medians (an older
    bench.json)."""
    a, b = record.get("round_seconds"), reference.get("round_seconds")
    if a and b and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b))
    return record["seconds"] / reference["seconds"]


def format_tables(result):
    """Markdown tables: per section, one row per length / batch size, one column per model; each cell shows the
    measurement and its speed-up over the anchor (the anchor's time over its own for the same work, paired round by
    round as `time_ratio` does; > 1 is faster). Works on run()'s result and on bench.json read back."""
    names = list(dict.fromkeys(r["model"] for r in result["records"]))
    out = []
    floors = result.get("floors") or {}

    def table(title, rows, first, cell, floor=None):
        if not rows:
            return
        cols = [n for n in names if any(n in r for r in rows.values())]
        head = [first, *cols] + ([floor[0]] if floor else [])
        out.append(f"\n{title}\n\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for x, row in rows.items():
            anchor = row.get(ANCHOR)
            line = [str(x)]
            for n in cols:
                r = row.get(n)
                if r is None:
                    line.append("-")
                    continue
                against_anchor = anchor and n != ANCHOR and "tokens_per_s" in r
                ratio = f" ({1 / time_ratio(r, anchor):.2f}x)" if against_anchor else ""
                line.append(cell(r) + ratio)
            if floor:
                line.append(floor[1](x))
            out.append("| " + " | ".join(line) + " |")

    mem = lambda r: "" if r["peak_mib"] is None else f", {r['peak_mib']:.0f} MiB"  # noqa: E731
    # lengths as strings, as in bench.json, so that a result read back from disk renders the same
    pre_floor = {name: {str(t): s for t, s in by_t.items()} for name, by_t in floors.get("prefill", {}).items()}
    table("prefill: tokens/s (ratio to the anchor), peak memory", _cells(result, "prefill"), "T",
          lambda r: f"{r['tokens_per_s']:.0f} tok/s{mem(r)}",
          ("matmul floor (anchor shapes)", lambda t: f"{t / pre_floor[ANCHOR][str(t)]:.0f} tok/s")
          if ANCHOR in pre_floor else None)
    dec_floor = floors.get("decode", {})
    table("decode: latency per step, tokens/s (ratio to the anchor)", _cells(result, "decode"), "batch",
          lambda r: f"{r['latency_ms']:.1f} ms, {r['tokens_per_s']:.1f} tok/s",
          ("bandwidth floor (anchor weights)", lambda b: f"{b / dec_floor[ANCHOR]['seconds_per_step']:.0f} tok/s")
          if ANCHOR in dec_floor else None)
    batch1 = dict(result, records=[r for r in result["records"] if r.get("batch", 1) == 1])
    table("decode memory (batch 1): peak over generated tokens", _cells(batch1, "decode_memory"), "new tokens",
        lambda r: f"{r['peak_mib']:.1f} MiB" if r["peak_mib"] is not None else "n/a")
    table("training step (forward+backward): seconds, tokens/s (ratio to the anchor), backward+forward / forward",
          _cells(result, "train"), "T",
          lambda r: f"{r['seconds']:.3f} s, {r['tokens_per_s']:.0f} tok/s, fb/f {r['backward_over_forward']:.1f}")
    chunked = [n for n in names if n.startswith("hmamba s=") and n[len("hmamba s="):].isdigit() and n != FLAT]
    sections = {"prefill": "prefill", "prefill_last": "prefill, last logits", "train": "train"}
    hierarchy = [(label, x, row) for section, label in sections.items() for x, row in _cells(result, section).items()
                 if FLAT in row and any(n in row for n in chunked)]
    if hierarchy:
        out.append(f"\nhierarchy: time of each chunk size over {FLAT} (same depth, same weights; prefill: logits at "
                   f"every position, prefill, last logits: generate()'s prefill; the median over rounds of each "
                   f"round's ratio)\n\n| section | T | "
                   + " | ".join(chunked) + " |\n|" + "---|" * (2 + len(chunked)))
        for section, x, row in hierarchy:
            out.append(f"| {section} | {x} | " + " | ".join(
                f"{time_ratio(row[n], row[FLAT]):.2f}x" if n in row else "-" for n in chunked) + " |")
    if floors:
        out.append(f"\nfloors: measured GEMM {floors['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s, copy bandwidth "
                   f"{floors['copy_bytes_per_s'] / 1e9:.1f} GB/s (read+write); decode bytes/token: " + ", ".join(
                       f"{k} {v['weight_bytes_per_token'] / 1e6:.3g} MB" for k, v in floors["decode"].items()))
    out.append(f"peak memory: {result['memory_method']}")
    return "\n".join(out)


def plot(result, path):
    """PNG: prefill throughput and peak memory vs length, decode memory vs generated tokens (flat), decode
    tokens/s vs batch size. Written to a temporary file and renamed into place."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    panels = [("prefill", "x", "tokens_per_s", "prefill tokens/s", "sequence length"),
              ("prefill", "x", "peak_mib", "prefill peak memory (MiB)", "sequence length"),
              ("decode_memory", "x", "peak_mib", "decode peak memory, batch 1 (MiB)", "generated tokens"),
              ("decode", "x", "tokens_per_s", "decode tokens/s", "batch size")]
    for ax, (section, xkey, ykey, title, xlabel) in zip(axes.flat, panels):
        series = {}
        for r in result["records"]:
            if r["section"] == section and r.get(ykey) is not None and r.get("batch", 1) == 1:
                series.setdefault(r["model"], []).append((r[xkey], r[ykey]))
        for name, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        if section != "decode_memory":
            ax.set_xscale("log", base=2)
        if ykey == "peak_mib":
            ax.set_ylim(bottom=0)
        if series:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"hmamba bench ({result['preset']}): {result['device_name']}, {result['dtype']}")
    fig.tight_layout()
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)


def run(out_dir="bench-results", log=print, **kwargs):
    """`hmamba bench`: run, print the tables, write OUT_DIR/bench.json and OUT_DIR/bench.png. Returns the
    result dict (with paths)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():  # checked before the run, not after it
        raise FileExistsError(f"--out-dir {out} is a file: give a folder for bench.json and bench.png")
    bench = Bench(log=log, **kwargs)
    draw = importlib.util.find_spec("matplotlib") is not None
    if not draw:
        log("matplotlib is not installed: bench.png will not be drawn (pip install 'hmamba[eval]')", flush=True)
    result = bench.run()
    out.mkdir(parents=True, exist_ok=True)
    tables = format_tables(result)
    log(tables, flush=True)
    result["tables"] = tables
    json_path = out / "bench.json"
    atomic_write_json(json_path, result)
    png_path = out / "bench.png" if draw else None
    if draw:
        plot(result, png_path)
    log(f"summary: {len(result['records'])} measurements in {result['seconds']:.0f} s; wrote {json_path}"
        + (f" and {png_path}" if png_path else ""), flush=True)
    return dict(result, json=str(json_path), png=str(png_path) if png_path else None)
