"""mamba_ssm's and causal_conv1d's own pure-PyTorch reference functions, as stand-ins for their CUDA kernels on CPU.

On a machine without CUDA `import mamba_ssm` raises (it imports the compiled selective_scan_cuda, and triton), so the
reference functions (selective_scan_ref, mamba_inner_ref, causal_conv1d_ref, causal_conv1d_update_ref,
selective_state_update_ref) are read from the installed source files and executed on their own. Each stand-in takes
the exact signature of the kernel it replaces, parsed from the same file: a call the kernel would refuse (unknown
keyword, too many positional arguments) is refused here too, and a kernel-only argument (checkpoint_lvl, ...) must
keep its default, since the reference cannot honour it.

Installed on CPU by scripts/install_mamba_ssm_cpu.sh (.ci/run runs it; README 'CUDA kernels').
"""

import ast
import importlib.util
import inspect
from pathlib import Path

import torch
import torch.nn.functional as F

# the dispatch's op -> (package, file in it, kernel function, its reference function)
SOURCES = {
    "causal_conv1d": ("causal_conv1d", "causal_conv1d_interface.py", "causal_conv1d_fn", "causal_conv1d_ref"),
    "causal_conv1d_update": ("causal_conv1d", "causal_conv1d_interface.py", "causal_conv1d_update",
                             "causal_conv1d_update_ref"),
    "selective_scan": ("mamba_ssm", "ops/selective_scan_interface.py", "selective_scan_fn", "selective_scan_ref"),
    "selective_state_update": ("mamba_ssm", "ops/triton/selective_state_update.py", "selective_state_update",
                               "selective_state_update_ref"),
    "mamba_inner": ("mamba_ssm", "ops/selective_scan_interface.py", "mamba_inner_fn", "mamba_inner_ref"),
}
MISSING = ("mamba_ssm's / causal_conv1d's reference functions need their sources and einops installed: run "
           "`bash scripts/install_mamba_ssm_cpu.sh` (as .ci/run does)")


def _source(package, filename):
    spec = importlib.util.find_spec(package)  # a top-level package: found without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    return ast.parse(path.read_text(), filename=str(path)) if path.is_file() else None


def _definition(tree, name):
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    if not found:
        raise LookupError(f"{name} not found: the installed package no longer defines it where this test reads it")
    return found[0]


def _compile(node, namespace, body=None):
    """The function defined by `node`, run in `namespace`, without its decorators (and with `body` if given)."""
    node = ast.FunctionDef(name=node.name, args=node.args, body=body or node.body, decorator_list=[],
                           returns=None, type_comment=None, type_params=[])
    module = ast.fix_missing_locations(ast.Module(body=[node], type_ignores=[]))
    exec(compile(module, f"<{node.name}>", "exec"), namespace)
    return namespace[node.name]


def _stand_in(op, kernel_signature, reference, calls=None):
    reference_parameters = inspect.signature(reference).parameters

    def kernel(*args, **kwargs):
        bound = kernel_signature.bind(*args, **kwargs)  # TypeError where the real kernel would raise one
        for name, value in bound.arguments.items():
            if name not in reference_parameters and value is not kernel_signature.parameters[name].default:
                raise AssertionError(f"{op}: {name}={value!r} has no equivalent in the reference function")
        if calls is not None:
            calls[op] += 1
        return reference(**{k: v for k, v in bound.arguments.items() if k in reference_parameters})

    kernel.__name__ = kernel.__qualname__ = f"{op}_stand_in"
    return kernel


def reference_kernels(calls):
    """{op: stand-in} for every op of SOURCES, counting calls in `calls`; None where the sources are missing."""
    try:
        from einops import rearrange, repeat
    except ImportError:
        return None
    trees = {}
    for package, filename, _, _ in SOURCES.values():
        if (package, filename) not in trees:
            trees[package, filename] = _source(package, filename)
            if trees[package, filename] is None:
                return None
    # mamba_inner_ref calls causal_conv1d_fn and selective_scan_fn by their global names: stand-ins that do not
    # count, so that `calls` counts only what the dispatch calls
    namespace = dict(torch=torch, F=F, rearrange=rearrange, repeat=repeat)
    kernels = {}
    for op, (package, filename, kernel_name, reference_name) in SOURCES.items():
        tree = trees[package, filename]
        reference = _compile(_definition(tree, reference_name), namespace)
        signature = inspect.signature(_compile(_definition(tree, kernel_name), {}, body=[ast.Pass()]))
        kernels[op] = _stand_in(op, signature, reference, calls)
        namespace[kernel_name] = _stand_in(op, signature, reference)
    return kernels
