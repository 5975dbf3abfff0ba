"""HMamba: a hierarchical Mamba language model for transformers.

Data path (shapes for batch B, length T, width D, chunk size s):

    input_ids (B, T) -> embeddings (B, T, D)
      -> L-stack: Mamba blocks at token rate
      -> down: causal pooling of each complete chunk of s tokens   (B, T // s, D)
      -> H-stack: Mamba blocks at chunk rate
      -> up: token t takes the H update (H output minus H input) of the last chunk complete at t
      -> fuse: x = x_L + up(H(z) - z)
      -> out layers: Mamba blocks at token rate
      -> norm_f -> lm_head (tied to the embeddings)

With s = 1 every token is its own chunk, up() is the identity and x_L + H(x_L) - x_L = H(x_L): the model is
exactly the flat stack L then H, so pretrained Mamba layers split into L and H reproduce the original model.

This file is self-contained (torch, transformers and configuration_hmamba only) so that checkpoints load
with `trust_remote_code=True` where the hmamba package is not installed.
"""

import functools
import math
import os
import re
import shutil
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import ModelOutput

from .configuration_hmamba import HMambaConfig

# transformers releases (major.minor, inclusive) this file is tested with. Each minor release may rename what
# generate() passes to a stateful model (5.24 renamed `cache_params` to `cache`); under an untested one the cache
# could silently stop being threaded through generate(), so the import refuses instead.
TRANSFORMERS_REQUIREMENT = "transformers>=5.23,<5.25"  # as setup.py states it (a test keeps the two equal)


def check_transformers_version(version=None):
    """Raise ImportError naming the supported range if `version` (default: the installed transformers') is outside it."""
    version = version or transformers.__version__
    low, high = (tuple(map(int, v)) for v in re.findall(r"(\d+)\.(\d+)", TRANSFORMERS_REQUIREMENT))
    if not low <= tuple(int(p) for p in version.split(".")[:2]) < high:
        raise ImportError(
            f"HMamba's model code supports {TRANSFORMERS_REQUIREMENT}, but transformers {version} is installed. "
            f"Install a supported version (pip install '{TRANSFORMERS_REQUIREMENT}') or use model code from an hmamba "
            "release that supports this one."
        )


check_transformers_version()

# ----------------------------------------------------------------------------------------------------------
# Ops: pure-PyTorch causal conv1d and selective scan, in mamba_ssm's layouts (channels before time), so that the
# CUDA kernels of mamba_ssm / causal_conv1d can stand in for them behind the one dispatch point `ops_for`.


def to_dtype(x, dtype=None):
    """Cast x to dtype (default: its own). float16 is clamped to its finite range, so activations beyond 65504
    (which the residual stream and out_proj of large Mamba models reach) saturate instead of becoming inf and then
    NaN in the next norm (as T5 does in float16)."""
    dtype = dtype or x.dtype
    if dtype == torch.float16:
        x = x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    return x.to(dtype)


def causal_conv1d(x, weight, bias=None, activation=None):
    """Depthwise causal convolution. x: (B, D, T), weight: (D, W) -> (B, D, T).

    Computed token-major, as the transpose of (B, T, D) rows: in_proj's output is laid out that way, so each of the
    W shifted products reads whole contiguous rows, and the result is again a (B, D, T) view of token-major memory
    (a sum of W shifted products beats a grouped conv on CPU)."""
    width, length = weight.shape[1], x.shape[-1]
    x_pad = F.pad(x.transpose(1, 2), (0, 0, width - 1, 0))  # (B, W - 1 + T, D)
    out = x_pad[:, :length] * weight[:, 0]
    for k in range(1, width):
        out = out.addcmul(x_pad[:, k : k + length], weight[:, k])
    if bias is not None:
        out = out + bias
    out = F.silu(out) if activation in ("silu", "swish") else out
    return out.transpose(1, 2)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """One step of the causal convolution. x: (B, D), conv_state: (B, D, W) updated in place -> (B, D)."""
    conv_state.copy_(torch.cat((conv_state[..., 1:], x[..., None].to(conv_state.dtype)), dim=-1))
    out = (conv_state.to(weight.dtype) * weight) @ weight.new_ones(weight.shape[1])  # a sum over W, as one matvec
    if bias is not None:
        out = out + bias
    return F.silu(out) if activation in ("silu", "swish") else out


LOG2E = math.log2(math.e)  # exp(x) = 2^(x log2 e): torch's exp2 runs 2-3x faster than its exp on CPU


def _scan_block_size(batch, dim, state):
    # time steps discretised at once: ~1M floats per (K, B, D, N) buffer keeps the working set in cache
    return max(16, min(256, (1 << 20) // max(1, batch * dim * state)))


_SCAN_WORKSPACE = threading.local()  # per thread, so that models running in threads never share buffers
_SCAN_WORKSPACE_MAX = 64 * 2**20  # bytes kept per thread and dtype; larger requests get fresh buffers


def _scan_buffers(count, shape, like):
    """`count` buffers of `shape` for the scan's blocks. On CPU, views of a workspace kept per thread and dtype and
    reused across calls (up to _SCAN_WORKSPACE_MAX): the first write into a fresh multi-MB buffer pays its page
    faults, about 11 ms per 8 MB on the 2-core dev VM, ten times the arithmetic done in it. (CUDA's caching
    allocator already reuses memory.)"""
    numel = count * math.prod(shape)
    if like.device.type != "cpu" or numel * like.element_size() > _SCAN_WORKSPACE_MAX:
        return like.new_empty(count, *shape)
    workspace = _SCAN_WORKSPACE.__dict__.setdefault("buffers", {})
    if like.dtype not in workspace or workspace[like.dtype].numel() < numel:
        with torch.inference_mode(False):  # an ordinary tensor, usable in and out of inference mode
            workspace[like.dtype] = torch.empty(numel, dtype=like.dtype)
    return workspace[like.dtype][:numel].view(count, *shape)


def _block_states(u, delta, A2, B, h, dA, hs):
    """Zero-order hold and recurrence over one block of K steps, into preallocated buffers dA, hs: (K, B, D, N)
    (`_scan_buffers`).
    u, delta: (K, B, D); A2 = A log2(e): (D, N); B: (K, B, N); h: (B, D, N), the state before the block.
    Returns dA, the states."""
    torch.mul(delta[..., None], A2, out=dA).exp2_()  # exp(delta A)
    torch.mul((delta * u)[..., None], B[:, :, None, :], out=hs)  # delta B u, then the states in place
    for dA_t, h_t in zip(dA.unbind(0), hs.unbind(0)):  # views made in one call, not indexed per step
        h = h_t.addcmul_(dA_t, h)
    return dA, hs


class _SelectiveScan(torch.autograd.Function):
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,  y_t = C_t . h_t   (time-major, float32).

    Forward and backward walk time in blocks of K steps, one in-place op per step, so both are linear in T and
    memory holds only the state at each block start (not a full-size gradient per step). Backward recomputes a
    block's states from its start and runs the adjoint recurrence lam_t = C_t gy_t + exp(delta_{t+1} A) lam_{t+1}.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):
        # u, delta: (T, B, D); A: (D, N); B, C: (T, B, N); h0: (B, D, N)
        length, batch, dim = u.shape
        block = _scan_block_size(batch, dim, A.shape[1])
        buffers = _scan_buffers(2, (block, batch, dim, A.shape[1]), u)
        y = u.new_empty(length, batch, dim)
        A2 = A * LOG2E  # once per scan, for every block
        starts = []
        h = h0
        for s in range(0, length, block):
            e = min(s + block, length)
            starts.append(h.clone())  # h is the last block's final state, in a buffer this block overwrites
            _, hs = _block_states(u[s:e], delta[s:e], A2, B[s:e], starts[-1], *buffers[:, : e - s])
            y[s:e] = torch.einsum("kbdn,kbn->kbd", hs, C[s:e])
            h = hs[-1]
        ctx.block = block
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(starts))
        return y, h.clone()

    @staticmethod
    @once_differentiable  # the hand-written adjoint is not itself differentiable
    def backward(ctx, gy, gh_last):
        u, delta, A, B, C, starts = ctx.saved_tensors
        length, block = u.shape[0], ctx.block
        gu, gdelta, gB, gC = torch.empty_like(u), torch.empty_like(delta), torch.empty_like(B), torch.empty_like(C)
        gA = torch.zeros_like(A)
        buffers = _scan_buffers(4, (block, *starts.shape[1:]), u)
        A2 = A * LOG2E
        carry = gh_last  # dL/dh at the end of the current block, from everything after it
        for n, s in reversed(list(enumerate(range(0, length, block)))):
            e = min(s + block, length)
            dA_buf, hs_buf, lam_buf, g_buf = buffers[:, : e - s]
            dA, hs = _block_states(u[s:e], delta[s:e], A2, B[s:e], starts[n], dA_buf, hs_buf)
            lam = torch.mul(gy[s:e, :, :, None], C[s:e, :, None, :], out=lam_buf)  # (K, B, D, N): dL/dh_t, direct
            lam[-1] += carry
            lams, dAs = lam.unbind(0), dA.unbind(0)
            for i in range(e - s - 2, -1, -1):
                lams[i].addcmul_(dAs[i + 1], lams[i + 1])
            gC[s:e] = torch.einsum("kbdn,kbd->kbn", hs, gy[s:e])
            g_log_dA = torch.mul(lam, dA, out=g_buf)  # dL/d(delta A) = lam_t * dA_t * h_{t-1}
            g_log_dA[0] *= starts[n]
            g_log_dA[1:] *= hs[:-1]
            lam_B = torch.einsum("kbdn,kbn->kbd", lam, B[s:e])
            # the two contractions of g_log_dA as products and sums (einsum makes them small-batch bmms, 3-14x slower),
            # through hs's buffer, which is free from here on
            gdelta[s:e] = torch.mul(g_log_dA, A, out=hs).sum(-1) + lam_B * u[s:e]
            gA += g_log_dA.mul_(delta[s:e, ..., None]).sum((0, 1))
            gu[s:e] = lam_B * delta[s:e]
            gB[s:e] = torch.einsum("kbdn,kbd->kbn", lam, delta[s:e] * u[s:e])
            carry = dA[0] * lam[0]
        return gu, gdelta, gA, gB, gC, carry


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, initial_state=None
):
    """Selective scan in mamba_ssm's signature. u, delta, z: (B, D, T); A: (D, N); B, C: (B, N, T);
    D, delta_bias: (D,); initial_state: (B, D, N). Returns y (B, D, T) [and the last state (B, D, N), float32]."""
    dtype = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if initial_state is None:
        initial_state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    time_major = lambda t: t.float().permute(2, 0, 1).contiguous()  # noqa: E731  (B, X, T) -> (T, B, X)
    y, last_state = _SelectiveScan.apply(
        time_major(u), time_major(delta), A.float(), time_major(B), time_major(C), initial_state.float()
    )
    y = y.permute(1, 2, 0)  # (B, D, T)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = to_dtype(y, dtype)
    return (y, last_state) if return_last_state else y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One step of the selective scan. state: (B, D, N) float32, updated in place; x, dt, z: (B, D);
    B, C: (B, N) -> y (B, D)."""
    dtype = x.dtype
    x, dt = x.float(), dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    dA = ((dt * LOG2E)[..., None] * A.float()).exp2_()  # exp(dt A) through exp2, as the scan does  (B, D, N)
    state.mul_(dA).addcmul_((dt * x)[..., None], B.float()[:, None, :])
    y = torch.bmm(state, C.float()[..., None])[..., 0]
    if D is not None:
        y = y.addcmul(x, D.float())
    if z is not None:
        y = y * F.silu(z.float())
    return to_dtype(y, dtype)


def linear(module, x):
    """module(x), with few-row float32 products on CPU split into one block of weight rows per thread.

    Decoding multiplies each weight by one vector per row, so it is bound by how fast the weights stream from
    memory. MKL runs such a product (x: a few rows) on one thread, at about half the memory bandwidth on this
    project's CPUs; a batched product over row blocks (one view, no copy) keeps every thread streaming and reaches
    the bandwidth of a plain read (benchmarks/gemv_split.py). Only a plain nn.Linear whose forward would do nothing
    else takes it (no hooks, no replaced forward, weight beside x, no autocast); a wrapped module (PEFT LoRA,
    quantized) is called as itself.
    """
    threads = _num_threads()
    if not _splits(module, x, threads):
        return module(x)
    weight, rows = module.weight, x.numel() // x.shape[-1]
    blocks = weight.view(threads, -1, weight.shape[1])  # (threads, out / threads, in)
    y = torch.bmm(blocks, x.reshape(1, rows, -1).transpose(1, 2).expand(threads, -1, -1))  # (threads, out/threads, rows)
    y = y.reshape(weight.shape[0], rows).t().reshape(*x.shape[:-1], weight.shape[0])
    return y if module.bias is None else y + module.bias


@torch.compiler.assume_constant_result  # read once when compiled (no graph break): any split gives the same product
def _num_threads():
    return torch.get_num_threads()


def _hooked(*modules):
    """Whether a hook (a module's own or a global one) or a replaced forward (accelerate) sits on `modules` or below
    them: code that bypasses a module's __call__ must not bypass those. `linear` then calls the module itself, and
    compile_decode's one graph, which serves every block and does not guard on hooks, lets such a block step
    eagerly. (A plain walk over _modules: 6 us per block and step, named_modules 9.)"""
    hooks = nn.modules.module
    if (hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
            or hooks._global_backward_pre_hooks):
        return True
    stack = list(modules)
    while stack:
        m = stack.pop()
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks or "forward" in vars(m):
            return True
        stack.extend(child for child in m._modules.values() if child is not None)
    return False


def _splits(module, x, threads):
    """Whether `linear` runs module(x) as a row-split batched product (see there)."""
    if type(module) is not nn.Linear or _hooked(module):
        return False
    weight, rows = module.weight, x.numel() // max(1, x.shape[-1])
    return (
        threads > 1 and 0 < rows <= 16 and x.device.type == "cpu" and x.dtype == torch.float32
        and weight.device == x.device and weight.dtype == x.dtype and weight.is_contiguous()
        and weight.numel() >= 2**20 and weight.shape[0] % threads == 0 and not torch.is_autocast_enabled("cpu")
    )


class TorchOps:
    """The pure-PyTorch path: runs on every device, differentiable, tested against the kernels on CUDA.
    mamba_inner is the fused kernel of a whole mixer; None means: compose the ops above."""

    linear = staticmethod(linear)
    causal_conv1d = staticmethod(causal_conv1d)
    causal_conv1d_update = staticmethod(causal_conv1d_update)
    selective_scan = staticmethod(selective_scan)
    selective_state_update = staticmethod(selective_state_update)
    mamba_inner = None


# the ops a CUDA kernel can stand in for; mamba_ssm and causal_conv1d share these signatures
KERNELS = ("causal_conv1d", "causal_conv1d_update", "selective_scan", "selective_state_update", "mamba_inner")


_KERNEL_OPS = {}  # filled on first use


def load_kernel(op):
    """The CUDA kernel for `op`, or None where its package (or its CUDA build) is missing. Plain import statements,
    so that a reader of this file sees every module it can load; inside `try`, which transformers' remote-code
    import check skips (the kernels are optional); run for CUDA tensors only."""
    try:
        if op == "causal_conv1d":
            from causal_conv1d import causal_conv1d_fn as kernel
        elif op == "causal_conv1d_update":
            from causal_conv1d import causal_conv1d_update as kernel
        elif op == "selective_scan":
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as kernel
        elif op == "selective_state_update":
            from mamba_ssm.ops.triton.selective_state_update import selective_state_update as kernel
        else:
            from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn as kernel
    except (ImportError, OSError, RuntimeError):  # not installed, or built without CUDA
        return None
    return kernel


def kernel_ops():
    """TorchOps with every kernel of KERNELS that imports in place of its op; the others stay PyTorch.

    Called only for CUDA tensors: `import mamba_ssm` raises on a machine without CUDA (it hard-imports the
    compiled selective_scan_cuda), so nothing here is imported unless a CUDA tensor asks.
    """
    if "ops" not in _KERNEL_OPS:
        found = {}
        for op in KERNELS:
            kernel = load_kernel(op)
            if kernel is not None:
                found[op] = staticmethod(kernel)
        _KERNEL_OPS["ops"] = type("KernelOps", (TorchOps,), found)
    return _KERNEL_OPS["ops"]


def ops_for(tensor):
    """The one dispatch point: the mamba_ssm / causal_conv1d CUDA kernels (per op, those that import) for a CUDA
    tensor, the PyTorch path for every other."""
    return kernel_ops() if tensor.is_cuda else TorchOps


# ----------------------------------------------------------------------------------------------------------
# Cache


class HMambaCache:
    """Constant-size recurrent state for HMamba generation.

    Why not transformers' DynamicCache: it holds per-layer conv/recurrent states on one clock, while HMamba's
    H-stack steps only when a chunk completes, and between chunk boundaries the hierarchy needs state of its own:
    the running pool of the current chunk, the last H update every token receives, and each row's position in
    its chunk (rows of a left-padded batch cross chunk boundaries at different steps). So the model builds this
    cache itself (`HMambaForCausalLM._supports_default_dynamic_cache` is False, as for transformers' other
    recurrent models) and generate() threads it through as `cache` (`cache_params` before transformers 5.24).
    Every tensor is allocated once, so its memory does not grow with the number of generated tokens.
    """

    # what generate() reads from a cache passed in: HMamba compiles its step itself (compile_decode), its state is
    # recurrent (5.24: no slicing of the input by past length; prepare_inputs_for_generation does that), and it cannot
    # be cut back to fewer tokens (5.23 on MPS)
    is_compileable = False
    is_linear = (True,)
    is_croppable = False

    def __init__(self, config, batch_size, dtype=torch.float32, device=None):
        layers, dim = config.num_hidden_layers, config.intermediate_size
        self.chunk_size = config.chunk_size
        self.conv_states = torch.zeros(layers, batch_size, dim, config.conv_kernel, dtype=dtype, device=device)
        self.ssm_states = torch.zeros(layers, batch_size, dim, config.state_size, dtype=torch.float32, device=device)
        self.pool = torch.zeros(batch_size, config.hidden_size, dtype=torch.float32, device=device)  # sum over chunk
        self.update = torch.zeros(batch_size, config.hidden_size, dtype=torch.float32, device=device)  # last H update
        self.position = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens seen per row
        self.length = 0  # columns seen, padding included: what generate() compares a continued input with
        self.A = [None] * layers  # -exp(A_log) per layer, computed at a layer's first step and reused
        self.has_previous_state = False

    @property
    def batch_size(self):
        return self.position.shape[0]

    def check(self, config, batch_size):
        """Raise if this cache cannot continue a batch of `batch_size` rows of a model with `config` (shapes only:
        no device sync)."""
        if self.batch_size != batch_size:
            raise ValueError(
                f"cache_params holds {self.batch_size} rows but the input has {batch_size}: pass the cache returned "
                "for this batch, or none to start afresh."
            )
        layers, _, dim, width = self.conv_states.shape
        found = (layers, dim, width, self.ssm_states.shape[-1], self.pool.shape[-1], self.chunk_size)
        expected = (config.num_hidden_layers, config.intermediate_size, config.conv_kernel, config.state_size,
                    config.hidden_size, config.chunk_size)
        if found != expected:
            names = "(layers, intermediate_size, conv_kernel, state_size, hidden_size, chunk_size)"
            raise ValueError(
                f"cache_params was built for another config: {names} = {found}, this model has {expected}. "
                "A cache only continues the model that made it."
            )

    def tensors(self):
        return [self.conv_states, self.ssm_states, self.pool, self.update, self.position]

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def reorder_cache(self, beam_idx):
        """Beam search: every state (L, H, out layers, pool, update, position) follows its beam."""
        self.conv_states = self.conv_states.index_select(1, beam_idx.to(self.conv_states.device))
        self.ssm_states = self.ssm_states.index_select(1, beam_idx.to(self.ssm_states.device))
        self.pool, self.update, self.position = (t.index_select(0, beam_idx.to(t.device)) for t in self.tensors()[2:])

    def get_seq_length(self, layer_idx=0):
        return self.length


# ----------------------------------------------------------------------------------------------------------
# Mamba block


class HMambaRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        """Normalised in float32 (from a float32 residual as it is), returned in the weight's dtype."""
        normed = F.rms_norm(x.float(), x.shape[-1:], self.weight.float(), eps=self.variance_epsilon)
        return normed.to(self.weight.dtype)  # as mamba_ssm's RMSNorm; |x / rms(x)| <= sqrt(hidden_size)


class HMambaMixer(nn.Module):
    """The selective SSM of the Mamba paper: in_proj -> causal conv1d -> SiLU -> x_proj -> dt_proj ->
    selective scan (A = -exp(A_log), D skip) -> gate by SiLU(z) -> out_proj. Every projection is called as a
    module, so wrappers around it (PEFT LoRA, quantized linears) take effect."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx  # index into the cache, counted over L, H and out layers
        d_inner, d_state, rank = config.intermediate_size, config.state_size, config.time_step_rank
        self.config = config
        self.in_proj = nn.Linear(config.hidden_size, 2 * d_inner, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            d_inner, d_inner, config.conv_kernel, groups=d_inner, padding=config.conv_kernel - 1, bias=config.use_conv_bias
        )
        self.x_proj = nn.Linear(d_inner, rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, config.hidden_size, bias=config.use_bias)

    def forward(self, hidden_states, cache=None, mask=None, states=None):
        # hidden_states: (B, T, hidden). With `states` (this layer's conv_state, ssm_state and A, from a cache that
        # holds a previous state) T is 1 and the states advance by that token (`step`). A cache given here is fresh:
        # it receives the states at the end of this sequence.
        if states is not None:
            return self.step(hidden_states[:, 0], *states)[:, None]
        if cache is not None and cache.has_previous_state:
            raise ValueError("a cache that holds a previous state continues one token at a time: pass its layer "
                             "states as `states` (HMambaBlock.forward does), not the cache")
        ops = ops_for(hidden_states)
        rank, d_state = self.dt_proj.in_features, self.A_log.shape[1]
        xz = ops.linear(self.in_proj, hidden_states)  # (B, T, 2 * d_inner), token-major
        A = -torch.exp(self.A_log.float())  # (d_inner, N)
        if ops.mamba_inner is not None and cache is None and mask is None and self.projections_are_plain():
            return ops.mamba_inner(
                xz.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.out_proj.weight, self.out_proj.bias, A, None, None, self.D.float(),
                delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            )

        # (B, d_inner, T) each, split token-major: backward joins their gradients along contiguous rows (a cat of
        # channel-major views is several times slower; the training step took 0.94-0.97x of its time before)
        x, z = (t.transpose(1, 2) for t in xz.chunk(2, dim=-1))
        if mask is not None:
            x = x * mask[:, None, :].to(x.dtype)  # padding leaves every state untouched
        conv_weight = self.conv1d.weight.squeeze(1)  # (d_inner, W)
        if cache is not None:
            width = conv_weight.shape[1]
            cache.conv_states[self.layer_idx].copy_(F.pad(x, (max(0, width - x.shape[-1]), 0))[..., -width:])
        x = ops.causal_conv1d(x, conv_weight, self.conv1d.bias, activation="silu")
        if mask is not None:
            x = x * mask[:, None, :].to(x.dtype)
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([rank, d_state, d_state], dim=-1)  # (B, T, .)
        y, last_state = ops.selective_scan(
            x, self.dt_proj(dt).transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), self.D, z,
            delta_softplus=True, return_last_state=True,
        )
        if cache is not None:
            cache.ssm_states[self.layer_idx].copy_(last_state)
        return ops.linear(self.out_proj, y.transpose(1, 2))  # (B, T, hidden)

    def step(self, hidden_states, conv_state, ssm_state, A):
        """One token per row: (B, hidden) -> (B, hidden). This layer's conv_state (B, d_inner, W) and ssm_state
        (B, d_inner, N) advance in place; A = -exp(A_log), computed once per cache."""
        ops = ops_for(hidden_states)
        rank, d_state = self.dt_proj.in_features, self.A_log.shape[1]
        x, z = ops.linear(self.in_proj, hidden_states).chunk(2, dim=-1)  # (B, d_inner) each
        x = ops.causal_conv1d_update(x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        dt, B, C = self.x_proj(x).split([rank, d_state, d_state], dim=-1)
        y = ops.selective_state_update(ssm_state, x, self.dt_proj(dt), A, B, C, self.D, z, dt_softplus=True)
        return ops.linear(self.out_proj, y)

    def projections_are_plain(self):
        """Whether every projection is a plain nn.Linear: the fused kernel reads x_proj, dt_proj and out_proj
        weights directly, so a wrapped one (PEFT LoRA, quantized) must run through its module instead."""
        return all(type(m) is nn.Linear for m in (self.in_proj, self.x_proj, self.dt_proj, self.out_proj))


class HMambaBlock(GradientCheckpointingLayer):
    """x = x + mixer(RMSNorm(x)), the residual kept in float32 when `residual_in_fp32` (as mamba_ssm's Block: the
    stream between blocks is float32, the mixer runs in the weights' dtype). The norm reads the float32 residual
    directly, so a half-precision model never rounds (or, in float16, overflows) the residual before normalising."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = HMambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = HMambaMixer(config, layer_idx)
        self.compiled_step = None  # `step` compiled by HMambaPreTrainedModel.compile_decode, one for every block

    def forward(self, hidden_states, cache=None, mask=None):
        if cache is not None and cache.has_previous_state:  # one token per row, continuing the cache
            i = self.mixer.layer_idx
            if cache.A[i] is None:
                cache.A[i] = -torch.exp(self.mixer.A_log.float())
            eager = self.compiled_step is None or _hooked(self.norm, self.mixer)
            step = HMambaBlock.step if eager else self.compiled_step
            return step(self, hidden_states, cache.conv_states[i], cache.ssm_states[i], cache.A[i])
        return self._add(hidden_states, self.mixer(self.norm(hidden_states), cache, mask))

    def step(self, hidden_states, conv_state, ssm_state, A):
        """forward for one token per row, (B, 1, hidden), from this layer's states, which advance in place."""
        return self._add(hidden_states, self.mixer(self.norm(hidden_states), states=(conv_state, ssm_state, A)))

    def _add(self, hidden_states, mixed):
        residual = hidden_states.float() if self.residual_in_fp32 else hidden_states
        out = residual + to_dtype(mixed)
        return out if self.residual_in_fp32 else to_dtype(out, hidden_states.dtype)

    def __getstate__(self):  # a compiled step does not pickle (torch.save(model), spawn); compile_decode again
        return {**super().__getstate__(), "compiled_step": None}


# ----------------------------------------------------------------------------------------------------------
# Hierarchy: causal down- and up-sampling between token rate and chunk rate


class Chunking:
    """Which tokens form which chunk, per row, counted from each row's first real token.

    Token positions come from the attention mask (cumsum - 1; padding is -1). Chunk j of a row covers its
    positions [j*s, (j+1)*s) and is complete at position j*s + s - 1, so token t may use chunk j only if
    j <= (t + 1) // s - 1 (strict causality). Only complete chunks reach the H-stack: T // s positions without
    padding. Chunks are right-aligned across rows (left padding at chunk rate), so the H-stack's final state is
    each row's state after its own last complete chunk, as the cache needs.
    """

    def __init__(self, attention_mask, length, chunk_size, device):
        s = chunk_size
        if attention_mask is None:
            positions = torch.arange(length, device=device)[None, :]
            first, lengths = torch.zeros(1, dtype=torch.long, device=device), torch.full((1,), length, device=device)
        else:
            mask = attention_mask.bool()
            positions = mask.long().cumsum(-1) - 1
            positions = positions.masked_fill(~mask, -1)
            first, lengths = mask.long().argmax(-1), mask.sum(-1)
        self.positions = positions  # (B, T)
        self.complete = lengths // s  # (B,) complete chunks per row
        self.num_chunks = int(self.complete.max())
        slots = torch.arange(self.num_chunks, device=device)[None, :]
        chunk = slots - (self.num_chunks - self.complete[:, None])  # (B, Nc): chunk index in each slot
        self.chunk_mask = chunk >= 0  # (B, Nc)
        # token index of every member of every chunk: (B, Nc, s)
        members = first[:, None, None] + chunk.clamp(min=0)[..., None] * s + torch.arange(s, device=device)
        self.members = members.clamp(max=length - 1)  # empty slots point anywhere valid; they are zeroed
        # for each token, the slot of its last complete chunk, and whether it has one
        last = (positions + 1) // s - 1  # (B, T)
        self.token_slot = (last + self.num_chunks - self.complete[:, None]).clamp(min=0)
        self.token_has_chunk = (positions >= 0) & (last >= 0)
        self.lengths, self.chunk_size = lengths, s

    def down(self, x, pooling):
        """(B, T, D) -> (B, Nc, D): each complete chunk's summary."""
        b, _, d = x.shape
        members = self.members if pooling == "mean" else self.members[..., -1:]
        idx = members.expand(b, -1, -1).reshape(b, -1, 1).expand(-1, -1, d)
        z = x.gather(1, idx).view(b, self.num_chunks, -1, d)
        z = z.mean(2) if pooling == "mean" else z[:, :, 0]
        return z * self.chunk_mask[..., None].to(z.dtype)

    def up(self, u):
        """(B, Nc, D) -> (B, T, D): each token's update from its last complete chunk (zero before the first)."""
        b, d = u.shape[0], u.shape[-1]
        idx = self.token_slot.expand(b, -1)
        out = u.gather(1, idx[..., None].expand(-1, -1, d))
        return out * self.token_has_chunk[..., None].to(out.dtype)

    def partial_pool(self, x):
        """(B, T, D) -> (B, D): sum over the tokens of each row's incomplete last chunk (float32)."""
        in_partial = self.positions >= (self.complete * self.chunk_size)[:, None]
        return (x.float() * in_partial[..., None]).sum(1)


# ----------------------------------------------------------------------------------------------------------
# Files: atomic writes and strict loading

WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$")
STRUCTURE = ("num_low_layers", "num_high_layers", "num_out_layers", "chunk_size", "pooling")
AUTO_MAP = {  # config.json's auto_map of a saved model with remote code: every Auto class HMamba registers with
    "AutoConfig": "configuration_hmamba.HMambaConfig",
    "AutoModel": "modeling_hmamba.HMambaModel",
    "AutoModelForCausalLM": "modeling_hmamba.HMambaForCausalLM",
}


@contextmanager
def atomic_dir(out, replace=True):
    """Yield an empty temporary folder; only when the block completes does its content move into OUT, so an error
    or interrupt mid-write leaves OUT as it was (and no temporary folder behind). A symlink OUT is followed: its
    target is written, the link stays.

    A missing OUT is made by one rename of a temporary folder beside it; parent folders made for it are removed
    again if the write fails.
    replace=True: OUT becomes exactly the new folder (a previous OUT, folder or file, is swapped out, then deleted).
    replace=False: OUT must not be a file; OUT's other files stay, except weight files of a previous save that the
    new one does not overwrite (as save_pretrained cleans stale shards).
    Into an existing folder OUT that is kept (replace=False, or an empty OUT), each new file is renamed (each
    rename atomic) from a temporary folder inside OUT: OUT's parent is never written (it may be read-only, as a
    home folder's is) and OUT itself stays (it may be the current folder).
    """
    out = os.path.realpath(os.fspath(out))
    if not replace and os.path.isfile(out):
        raise FileExistsError(f"{out} is a file, not a folder: save into a folder (another path, or remove the file)")
    merge = os.path.isdir(out) and (not replace or not os.listdir(out))
    parent, name = os.path.split(out)
    made, folder = [], parent  # the folders above OUT this call creates, deepest first
    while not os.path.isdir(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    tag = uuid.uuid4().hex[:8]
    tmp = os.path.join(out, f".tmp-{tag}") if merge else os.path.join(parent, f".{name}.tmp-{tag}")
    old = f"{tmp}.old"
    try:
        os.makedirs(parent, exist_ok=True)
        os.mkdir(tmp)  # mode 0777 less the umask, as any folder the user makes (mkdtemp's would be private, 0700)
        yield tmp
        if merge:
            new = set(os.listdir(tmp))
            for f in sorted(new):
                os.replace(os.path.join(tmp, f), os.path.join(out, f))
            for f in sorted(set(os.listdir(out)) - new):
                if WEIGHT_FILE.match(f):
                    os.remove(os.path.join(out, f))
        elif not os.path.exists(out):
            os.replace(tmp, out)
        else:
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    finally:
        if os.path.lexists(old) and not os.path.lexists(out):  # interrupted between the two renames: put OUT back
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # a failed write leaves no new empty folders either
            try:
                os.rmdir(folder)  # only an empty one
            except OSError:
                break


# ----------------------------------------------------------------------------------------------------------
# Models


class HMambaCacheOutput(ModelOutput):
    """Outputs hold the HMambaCache as `cache` (transformers >= 5.24's name), also readable as `cache_params`, the
    name transformers 5.23's generate() looks for (`in`, `[]`, `get` and attribute access; 5.24's ModelOutput maps
    it too)."""

    def __contains__(self, key):
        return super().__contains__("cache" if key == "cache_params" else key)

    def __getitem__(self, key):
        return super().__getitem__("cache" if key == "cache_params" else key)

    def get(self, key, default=None):
        return super().get("cache" if key == "cache_params" else key, default)

    @property
    def cache_params(self):
        return self.cache


@dataclass
class HMambaOutput(HMambaCacheOutput):
    """last_hidden_state (B, T, D); cache: the HMambaCache to continue from; hidden_states: the output of
    every layer at token rate (H layers as seen by the tokens after fusion) and the final normed state."""

    last_hidden_state: torch.FloatTensor | None = None
    cache: HMambaCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class HMambaCausalLMOutput(HMambaCacheOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: HMambaCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class HMambaPreTrainedModel(PreTrainedModel):
    config_class = HMambaConfig
    config: HMambaConfig
    base_model_prefix = "backbone"
    _no_split_modules = ["HMambaBlock"]
    supports_gradient_checkpointing = True
    _is_stateful = True

    def save_pretrained(self, save_directory, is_main_process=True, *args, **kwargs):
        """transformers' save_pretrained, written to a temporary folder and renamed into SAVE_DIRECTORY when
        complete (`atomic_dir`, replace=False: other files there, e.g. a tokenizer, stay). A rank that does not save
        (is_main_process=False, or not rank 0) runs transformers' save_pretrained in place: it writes nothing, but
        takes part in gathering sharded weights. A model with remote code maps every Auto class to its class in
        config.json's auto_map, so the folder loads as AutoModel too where hmamba is not installed."""
        if not self.should_save_on_this_rank(is_main_process):
            return super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        if kwargs.get("push_to_hub"):
            kwargs.setdefault("repo_id", os.path.basename(os.path.abspath(save_directory)))
        if self._auto_class is not None:
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        with atomic_dir(save_directory, replace=False) as tmp:
            return super().save_pretrained(tmp, is_main_process, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' from_pretrained, strict: weights that do not fit the model (another layer split, another
        model) raise instead of loading partially with the rest randomly initialised; a config that changes the
        saved structure (chunk_size, pooling, layer split) raises; an unreadable weights file names itself.
        .bin files load with torch.load(weights_only=True), so a pickle that would run code is refused."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        except Exception as e:
            if type(e).__name__ == "SafetensorError":  # safetensors is not imported here (trust_remote_code file)
                raise OSError(
                    f"cannot read the weights of {pretrained_model_name_or_path}: {e}. The .safetensors file is "
                    "truncated or corrupted: save or download it again."
                ) from e
            if "weights_only" in str(e):
                raise OSError(
                    f"refusing to load {pretrained_model_name_or_path}: its .bin pickle would run code or holds "
                    f"objects other than tensors ({type(e).__name__}). Use safetensors weights."
                ) from e
            raise
        problems = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if any(problems.values()):
            details = "; ".join(f"{k.replace('_', ' ')} ({len(v)}): {v[:4]}" for k, v in problems.items() if v)
            raise ValueError(
                f"the weights in {pretrained_model_name_or_path} do not match an HMamba with num_low_layers="
                f"{model.config.num_low_layers}, num_high_layers={model.config.num_high_layers}, num_out_layers="
                f"{model.config.num_out_layers}: {details}. Load with the checkpoint's own config.json (no overrides)."
            )
        cls._check_structure(pretrained_model_name_or_path, model.config, kwargs)
        return (model, info) if output_loading_info else model

    @classmethod
    def _check_structure(cls, path, config, kwargs):
        """The saved config.json and the loaded model agree on the fields no weight shape reveals (chunk_size,
        pooling) and the layer split."""
        if not os.path.isfile(os.path.join(os.fspath(path), kwargs.get("subfolder", ""), "config.json")):
            return  # a Hub id: its config was read from the same snapshot as the weights
        saved, _ = HMambaConfig.get_config_dict(path, subfolder=kwargs.get("subfolder", ""))
        changed = {k: (saved.get(k), getattr(config, k)) for k in STRUCTURE if saved.get(k) != getattr(config, k)}
        if changed:
            diff = ", ".join(f"{k}: saved {a!r}, requested {b!r}" for k, (a, b) in changed.items())
            raise ValueError(
                f"{path} was saved with another structure ({diff}): its weights were trained for the saved one. "
                "Load it without overriding these fields; to reuse the weights differently on purpose, load it as "
                "saved and change model.config afterwards."
            )

    def compile_decode(self, enable=True, **compile_kwargs):
        """Run every block's one-token step (`HMambaBlock.step`, what generate() does per token after the prompt)
        through torch.compile, or eagerly again with enable=False. One compiled graph serves every block (they share
        code and shapes; in half precision with residual_in_fp32 two: the first block reads the embedding's dtype):
        the first cached step compiles it, a few seconds, again for a new batch size or dtype. On CPU, inductor
        fuses a layer's ~30 small ops into a few kernels and needs a C++ compiler; at 130m shapes on a 2-core CPU a
        generated token took 0.77-0.81x the eager time (README, "Speed of the PyTorch path"). Wrapped projections
        (PEFT LoRA) are traced as they are; a block with a hook or a replaced forward (accelerate) inside steps
        eagerly (`_hooked`). On CUDA the mamba_ssm / causal_conv1d kernels stay opaque calls between compiled
        pieces (untested: no GPU so far). compile_kwargs go to torch.compile (e.g. backend). A pickled copy steps
        eagerly. Returns the model (on a PeftModel: the inner model; keep the PeftModel)."""
        step = torch.compile(HMambaBlock.step, **compile_kwargs) if enable else None
        for module in self.modules():
            if isinstance(module, HMambaBlock):
                module.compiled_step = step
        return self

    @torch.no_grad()
    def _init_weights(self, module):
        """Mamba's init: torch's default (kaiming uniform) projections, dt bias the inverse softplus of
        dt ~ logUniform[dt_min, dt_max], A_log = log(1..N), D = 1, out_proj scaled by 1/sqrt(layers)."""
        config = self.config
        if isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=config.initializer_range)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, HMambaRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, HMambaMixer):
            for linear in (module.in_proj, module.x_proj, module.out_proj, module.conv1d):
                init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
                if linear.bias is not None:
                    init.zeros_(linear.bias)
            if config.rescale_prenorm_residual:
                init.copy_(module.out_proj.weight, module.out_proj.weight / math.sqrt(config.num_hidden_layers))
            dt_std = config.time_step_rank**-0.5 * config.time_step_scale
            if config.time_step_init_scheme == "constant":
                init.constant_(module.dt_proj.weight, dt_std)
            else:
                init.uniform_(module.dt_proj.weight, -dt_std, dt_std)
            log_min, log_max = math.log(config.time_step_min), math.log(config.time_step_max)
            dt = torch.exp(torch.rand(config.intermediate_size) * (log_max - log_min) + log_min)
            dt = dt.clamp(min=config.time_step_floor)
            init.copy_(module.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            A = torch.arange(1, config.state_size + 1, dtype=torch.float32).expand(config.intermediate_size, -1)
            init.copy_(module.A_log, torch.log(A))
            init.ones_(module.D)


class HMambaModel(HMambaPreTrainedModel):
    """The HMamba backbone: embeddings, L-stack, down, H-stack, up, out layers, norm_f."""

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.weight$"]  # the untied head of a saved HMambaForCausalLM

    def __init__(self, config):
        config.check()  # fields set after the config was made (config.x = ..., from_pretrained overrides)
        super().__init__(config)
        nl, nh, no = config.num_low_layers, config.num_high_layers, config.num_out_layers
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.low_layers = nn.ModuleList(HMambaBlock(config, i) for i in range(nl))
        self.high_layers = nn.ModuleList(HMambaBlock(config, nl + i) for i in range(nh))
        self.out_layers = nn.ModuleList(HMambaBlock(config, nl + nh + i) for i in range(no))
        self.norm_f = HMambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings = new_embeddings

    def forward(
        self,
        input_ids=None,
        inputs_embeds=None,
        cache=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        attention_mask=None,
        cache_params=None,  # the name of `cache` before transformers 5.24 (5.23's generate() passes it)
        past_key_values=None,  # transformers' usual name of a cache (generate()'s outputs hold it under this name)
        **kwargs,
    ):
        config = self.config
        cache = next((c for c in (cache, cache_params, past_key_values) if c is not None), None)
        self._check_inputs(input_ids, inputs_embeds, attention_mask, cache)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        return_dict = return_dict if return_dict is not None else config.return_dict
        if use_cache is None:  # by default no cache in training, nor for a right-padded batch (scoring)
            right_padded = attention_mask is not None and not bool(attention_mask[:, -1].all())
            use_cache = config.use_cache and not self.training and not right_padded
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            if cache is not None:  # the backward would replay each block, advancing the cache a second time
                raise ValueError("a cache cannot be used in a gradient-checkpointed forward that records gradients: "
                                 "continue from a cache under torch.no_grad() (as generate() does) or in eval mode")
            use_cache = False  # (without gradients nothing is replayed: generate() in training mode keeps its cache)

        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        if cache is None and use_cache:
            cache = HMambaCache(config, x.shape[0], dtype=x.dtype, device=x.device)

        if cache is not None and cache.has_previous_state:
            # continuing from a cache: step through the new tokens one at a time
            steps = [self._step(x[:, t : t + 1], cache, output_hidden_states) for t in range(x.shape[1])]
            x = torch.cat([h[-1] for h in steps], dim=1)
            hidden = tuple(torch.cat(layer, dim=1) for layer in zip(*steps)) if output_hidden_states else None
        else:
            hidden = tuple(self._sequence(x, cache, attention_mask, output_hidden_states))
            x = hidden[-1]
            if cache is not None:
                cache.has_previous_state = True
                cache.length = x.shape[1]

        if not output_hidden_states:
            hidden = None
        if not return_dict:
            return tuple(v for v in (x, cache if use_cache else None, hidden) if v is not None)
        return HMambaOutput(last_hidden_state=x, cache=cache if use_cache else None, hidden_states=hidden)

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, cache):
        """Clear errors for malformed inputs. Cheap: shape checks, plus one fused min/max of the token ids off CUDA
        (on CUDA the embedding's own device-side assert catches them, and a host check would sync every step)."""
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            given = "both" if input_ids is not None else "neither"
            raise ValueError(f"HMamba needs exactly one of input_ids or inputs_embeds, got {given}.")
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
                raise ValueError(
                    f"input_ids must be integer token ids of shape (batch, length), got {input_ids.dtype} of shape "
                    f"{tuple(input_ids.shape)}."
                )
            shape = tuple(input_ids.shape)
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
                raise ValueError(
                    f"inputs_embeds must have shape (batch, length, hidden_size={config.hidden_size}), got "
                    f"{tuple(inputs_embeds.shape)}."
                )
            shape = tuple(inputs_embeds.shape[:2])
        if 0 in shape:
            raise ValueError(
                f"empty input of shape (batch, length) = {shape}: HMamba needs at least one token per row (start an "
                "empty prompt with the BOS token)."
            )
        if input_ids is not None and input_ids.device.type != "cuda":
            low, high = (t.item() for t in torch.aminmax(input_ids))
            if low < 0 or high >= config.vocab_size:
                raise ValueError(
                    f"token ids must be in [0, vocab_size={config.vocab_size}), got ids from {low} to {high}: "
                    "the tokenizer does not match the model (after adding tokens, call model.resize_token_embeddings)."
                )
        if cache is not None:
            if not isinstance(cache, HMambaCache):
                raise TypeError(
                    f"cache must be the HMambaCache an HMamba forward or generate returned, got "
                    f"{type(cache).__name__}."
                )
            cache.check(config, shape[0])
        if attention_mask is not None:
            stepping = cache is not None and cache.has_previous_state  # a full-length mask is fine when continuing
            width_ok = attention_mask.shape[-1] >= shape[1] if stepping else attention_mask.shape[-1] == shape[1]
            if attention_mask.dim() != 2 or attention_mask.shape[0] != shape[0] or not width_ok:
                raise ValueError(
                    f"attention_mask must have shape (batch, length) = {shape}, got {tuple(attention_mask.shape)}."
                )
            if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                raise ValueError(
                    "attention_mask must hold only 0 (padding) and 1 (real token); got other values. HMamba has no "
                    "soft masks: pass the tokenizer's 0/1 mask."
                )
            if stepping and not bool(attention_mask[:, -shape[1]:].all()):
                raise ValueError(
                    "attention_mask marks padding among the new tokens, but a cache continues every row with real "
                    "tokens only (padding belongs at the left of the prompt): drop those positions, or run the "
                    "whole sequence without the cache."
                )

    def _sequence(self, x, cache, attention_mask, output_hidden_states=False):
        """Full-sequence pass (training, scoring, prefill into a fresh cache). Returns every layer's output at
        token rate, then the normed final state (only the normed final state unless `output_hidden_states`: a
        long prefill would otherwise hold every layer's (B, T, D) output until the end)."""
        mask = None if attention_mask is None else attention_mask.to(x.device)
        if cache is not None and mask is not None and not bool(mask[:, -1].all()):
            raise ValueError(
                "HMamba can only prefill a cache from a left-padded batch (the last column of attention_mask must "
                "be all ones): set tokenizer.padding_side = 'left' for generation."
            )
        hidden = []
        for block in self.low_layers:  # L-stack, token rate
            x = block(x, cache, mask)
            if output_hidden_states:
                hidden.append(x)
        x_low = x

        chunks = Chunking(mask, x.shape[1], self.config.chunk_size, x.device)
        if self.high_layers and chunks.num_chunks > 0:
            z = chunks.down(x_low, self.config.pooling)  # (B, T // s, D)
            h = z
            chunk_mask = None if mask is None else chunks.chunk_mask  # without padding every chunk is real
            for block in self.high_layers:  # H-stack, chunk rate
                h = block(h, cache, chunk_mask)
                if output_hidden_states:
                    hidden.append(x_low + chunks.up(h - z))  # as the tokens see it after fusion
            x = x_low + chunks.up(h - z)  # fuse: x_L + up(H(z) - z)
            if cache is not None:  # chunks are right-aligned: the last slot is the latest (empty in rows without one)
                cache.update.copy_((h[:, -1] - z[:, -1]) * chunks.chunk_mask[:, -1, None])
        elif output_hidden_states:
            hidden.extend([x_low] * len(self.high_layers))
        if cache is not None:
            cache.position.copy_(chunks.lengths.expand(x.shape[0]))
            if self.config.pooling == "mean":
                cache.pool.copy_(chunks.partial_pool(x_low))

        for block in self.out_layers:  # token rate
            x = block(x, cache, mask)
            if output_hidden_states:
                hidden.append(x)
        hidden.append(self.norm_f(x))
        return hidden

    def _step(self, x, cache, output_hidden_states):
        """One token per row from the cache: L and out layers step every token, the H-stack only for the rows
        whose chunk completes at this token; the other rows keep adding the last H update. (In hidden_states
        every H entry is the fused state here: per-layer H updates are not kept in the cache.)"""
        hidden = []
        for block in self.low_layers:
            x = block(x, cache)
            hidden.append(x)

        if self.high_layers:
            s, pooling = self.config.chunk_size, self.config.pooling
            if pooling == "mean":
                cache.pool += x[:, 0].float()
            completes = (cache.position % s) == s - 1  # (B,)
            if bool(completes.any()):
                z = x[:, 0] if pooling == "last" else (cache.pool / s).to(x.dtype)  # (B, D)
                first = self.high_layers[0].mixer.layer_idx
                high = slice(first, first + len(self.high_layers))
                partial = not bool(completes.all())
                if partial:
                    saved = cache.conv_states[high].clone(), cache.ssm_states[high].clone()
                h = z[:, None]
                for block in self.high_layers:
                    h = block(h, cache)
                if partial:  # rows in mid-chunk keep their H states
                    keep = ~completes[None, :, None, None]
                    cache.conv_states[high] = torch.where(keep, saved[0], cache.conv_states[high])
                    cache.ssm_states[high] = torch.where(keep, saved[1], cache.ssm_states[high])
                cache.update.copy_(torch.where(completes[:, None], (h[:, 0] - z).float(), cache.update))
                cache.pool.masked_fill_(completes[:, None], 0.0)
            x = x + (cache.update if self.config.residual_in_fp32 else cache.update.to(x.dtype))[:, None]
            hidden.extend([x] * len(self.high_layers))
        cache.position += 1
        cache.length += 1

        for block in self.out_layers:
            x = block(x, cache)
            hidden.append(x)
        hidden.append(self.norm_f(x))
        return hidden if output_hidden_states else hidden[-1:]


class HMambaForCausalLM(HMambaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.backbone = HMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        self.backbone.set_input_embeddings(new_embeddings)

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # the model builds its own HMambaCache (see its docstring)

    def prepare_inputs_for_generation(
        self, input_ids, inputs_embeds=None, use_cache=None, attention_mask=None, mask_width=None, **kwargs
    ):  # inputs_embeds is named: generate(inputs_embeds=...) is refused for a model whose signature lacks it
        cache = kwargs.get("cache", kwargs.get("cache_params"))  # 5.24's name, 5.23's
        continuing = cache is not None and cache.has_previous_state and kwargs.get("is_first_iteration")
        if continuing and kwargs.get("next_sequence_length") is None:
            inputs = input_ids if inputs_embeds is None else inputs_embeds
            width = attention_mask.shape[1] if attention_mask is not None else mask_width
            kwargs["next_sequence_length"] = self._unseen(cache, inputs.shape[1], width)
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, use_cache=use_cache, attention_mask=attention_mask, **kwargs
        )
        if use_cache and cache is not None and cache.has_previous_state:
            model_inputs["attention_mask"] = None  # new tokens are all real; positions live in the cache
        return model_inputs

    @functools.wraps(GenerationMixin.generate)
    def generate(self, *args, **kwargs):
        # generate() drops an attention_mask without padding before it prepares the inputs, keeping its width only in
        # its own copy of the generation config; the width tells whether an input that continues a cache is the whole
        # sequence or only its new tokens (`_unseen`), so it rides along as a model kwarg of the call
        if kwargs.get("attention_mask") is not None:
            kwargs.setdefault("mask_width", kwargs["attention_mask"].shape[-1])
        return super().generate(*args, **kwargs)

    @staticmethod
    def _unseen(cache, length, mask_width):
        """How many of an input's `length` columns generate() feeds when it continues from a cache (None: all).
        transformers' rule for KV caches: an input as long as its mask (or without one) is the whole sequence, of which
        only the columns the cache has not seen are new (generate()'s own slicing skips recurrent caches); a mask
        longer than the input means the input holds only new tokens."""
        if mask_width is not None and mask_width != length:
            return None
        if length <= cache.length:
            raise ValueError(
                f"the cache has seen {cache.length} tokens and the input has {length}: nothing new to feed. Pass the "
                "whole sequence (as generate() returned it), or only the new tokens with an attention_mask covering "
                "the whole sequence."
            )
        return length - cache.length

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        cache=None,
        labels=None,
        output_hidden_states=None,
        return_dict=None,
        use_cache=None,
        logits_to_keep=0,
        cache_params=None,  # the name of `cache` before transformers 5.24 (5.23's generate() passes it)
        past_key_values=None,  # transformers' usual name of a cache (generate()'s outputs hold it under this name)
        **kwargs,
    ):
        r"""labels (B, T): shifted inside the model (labels = input_ids works), -100 is ignored.
        logits_to_keep: int k keeps the last k positions (0 = all), a 1-D tensor keeps those indices."""
        if kwargs.get("output_attentions"):
            raise ValueError("HMamba has no attention layers, so no attentions to output: drop output_attentions "
                             "(output_hidden_states gives every layer's output)")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.backbone(
            input_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            cache_params=cache_params,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            attention_mask=attention_mask,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden_states = hidden_states[:, keep].to(self.lm_head.weight.dtype)
        logits = ops_for(hidden_states).linear(self.lm_head, hidden_states).float()

        loss = None
        if labels is not None:
            tokens = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
            if labels.shape != tokens:
                raise ValueError(
                    f"labels must have the shape of the input (batch, length) = {tuple(tokens)}, got "
                    f"{tuple(labels.shape)}; they are shifted inside the model (labels = input_ids works)."
                )
            if logits.shape[1] != tokens[1]:
                raise ValueError(f"labels score every position, but logits_to_keep={logits_to_keep} keeps "
                                 f"{logits.shape[1]} of {tokens[1]}: pass logits_to_keep=0 (all) with labels")
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        if not return_dict:
            output = tuple(v for v in (logits, outputs.cache, outputs.hidden_states) if v is not None)
            return (loss,) + output if loss is not None else output
        return HMambaCausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


# transformers' Trainer shifts the labels for label smoothing (and pipeline("text-generation") accepts a model) only
# for the causal LMs named in this table, which AutoModelForCausalLM.register does not extend: without this entry a
# label-smoothed Trainer would train the model to repeat its input. Here, so that trust_remote_code loads add it too.
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(HMambaConfig.model_type, HMambaForCausalLM.__name__)


__all__ = ["HMambaCache", "HMambaForCausalLM", "HMambaModel", "HMambaPreTrainedModel"]
