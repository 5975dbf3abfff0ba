"""Perplexity of a long token stream with a recurrent model: exact, in constant memory."""

import math
import time

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, input_ids, segment_length=2048):
    """Perplexity of a 1-D token tensor. The stream is fed in segments of `segment_length` tokens with the
    recurrent cache carried across, so every token is scored with its whole left context (no sliding-window
    approximation) while memory stays bounded by one segment. Returns {"nll": mean nats per token,
    "perplexity": exp(nll), "tokens": number of scored tokens}."""
    ids = torch.as_tensor(input_ids).reshape(1, -1).to(model.device)
    if ids.shape[1] < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.shape[1]}")
    if segment_length < 1:
        raise ValueError(f"segment_length must be >= 1, got {segment_length}")
    total, cache, previous_last = 0.0, None, None
    for start in range(0, ids.shape[1], segment_length):
        segment = ids[:, start : start + segment_length]
        out = model(segment, cache_params=cache, use_cache=True)
        cache = out.cache_params
        logits = out.logits.float()[0]
        if previous_last is not None:  # the previous segment's last logits predict this segment's first token
            logits = torch.cat([previous_last, logits])
            targets = segment[0]
        else:
            targets = segment[0, 1:]
        previous_last = logits[-1:]
        total += F.cross_entropy(logits[: len(targets)], targets, reduction="sum").item()
    count = ids.shape[1] - 1
    return {"nll": total / count, "perplexity": math.exp(total / count), "tokens": count}


@torch.no_grad()
def block_perplexity(model, blocks, batch_size=8):
    """Perplexity of independent fixed-size blocks (N, L), each scored from its own start: how the Trainer scores
    `hmamba train`'s held-out blocks. Returns {"nll", "perplexity", "tokens"} like perplexity()."""
    total = 0.0
    for batch in blocks.split(batch_size):
        batch = batch.to(model.device)
        total += model(batch, labels=batch).loss.item() * len(batch)  # blocks are equally long: equal weights
    nll = total / len(blocks)
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": blocks.shape[0] * (blocks.shape[1] - 1)}


@torch.no_grad()
def sliding_window_perplexity(model, input_ids, max_length=1024, stride=512):
    """Perplexity with the usual sliding window of fixed-context models: windows of `max_length` tokens start
    every `stride` tokens and each scores only the tokens the previous window did not, so every token is scored
    once, with at least `max_length - stride` tokens of context (all of them near the start); with stride ==
    max_length the first token of each window has no context and is not scored ("tokens" counts the scored).
    No state crosses windows: the number to compare with transformer results; `perplexity` is the exact one."""
    ids = torch.as_tensor(input_ids).reshape(1, -1).to(model.device)
    if ids.shape[1] < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.shape[1]}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    total, count, scored_until = 0.0, 0, 1  # token 0 has no context: it is never scored
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + max_length, ids.shape[1])
        if end <= scored_until:
            continue
        window = ids[:, begin:end]
        logits = model(window, use_cache=False).logits.float()[0, :-1]  # position i predicts token i + 1
        new = min(end - scored_until, end - begin - 1)  # the last `new` targets of this window
        if new > 0:
            total += F.cross_entropy(logits[-new:], window[0, -new:], reduction="sum").item()
            count += new
        scored_until = end
        if end == ids.shape[1]:
            break
    return {"nll": total / count, "perplexity": math.exp(total / count), "tokens": count}


def text_perplexity(model, tokenizer, text, max_length=1024, strides=(512,), segment_length=2048):
    """Perplexity of a text: the exact recurrent number, then one sliding-window row per stride. Each row has
    method, tokens, nll, perplexity, bits_per_byte and seconds. bits_per_byte is the mean nats of a scored token
    / ln 2 over the text's UTF-8 bytes per token, so rows that leave different tokens unscored (a window's first
    token when stride == max_length) compare: each row's mean cost extrapolated to every token of the text."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    nbytes = len(text.encode("utf-8"))
    runs = [("exact (state carried across segments)", lambda: perplexity(model, ids, segment_length))]
    runs += [(f"sliding window {max_length}, stride {s}", lambda s=s: sliding_window_perplexity(model, ids, max_length, s))
             for s in strides]
    rows = []
    for method, fn in runs:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        bits_per_byte = result["nll"] / math.log(2) * len(ids) / nbytes
        rows.append(dict(method=method, **result, bits_per_byte=bits_per_byte, seconds=seconds))
    return rows


def format_perplexity_table(rows):
    lines = [f"| {'method':42s} | {'tokens':>8s} | {'nll':>7s} | {'perplexity':>10s} | {'bits/byte':>9s} | {'s':>6s} |",
             f"|{'-' * 44}|{'-' * 10}|{'-' * 9}|{'-' * 12}|{'-' * 11}|{'-' * 8}|"]
    for r in rows:
        lines.append(f"| {r['method']:42s} | {r['tokens']:8d} | {r['nll']:7.4f} | {r['perplexity']:10.3f} | "
                     f"{r['bits_per_byte']:9.4f} | {r['seconds']:6.2f} |")
    return "\n".join(lines)
