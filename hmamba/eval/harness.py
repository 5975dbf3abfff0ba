"""`hmamba eval`: the lm-eval harness on an HMamba checkpoint, offline tasks shipped in the package, and
sliding-window perplexity of a text file. Importing this module does not import lm-eval."""

import importlib.util
import os
import sys
from pathlib import Path

from ..atomic import atomic_write_json

TASKS_DIR = Path(__file__).parent / "tasks"
OFFLINE_TASKS = ("hmamba_lastword", "hmamba_arc_easy", "hmamba_sonnets")
OFFLINE_TAG = "hmamba_offline"
HUB_TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")
MODEL_TYPES = ("hmamba", "hf")


def hub_offline():
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def task_manager():
    """lm-eval's TaskManager with hmamba's offline tasks on the include path."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))


def check_tasks(tasks, manager):
    """Reject unknown task names, and Hub tasks when the Hub is unreachable, with an error saying what to do."""
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}: offline tasks are {', '.join(OFFLINE_TASKS)} "
                         f"(or the tag {OFFLINE_TAG}); `lm_eval ls tasks` lists the harness's own")
    offline = set(OFFLINE_TASKS) | {OFFLINE_TAG}
    needs_hub = [t for t in tasks if t not in offline]
    if needs_hub and hub_offline():
        raise ValueError(
            f"task(s) {needs_hub} download their data from the Hugging Face Hub, which is unreachable here "
            f"(HF_HUB_OFFLINE is set): run them on a machine with Hub access, or use the offline tasks "
            f"{','.join(OFFLINE_TASKS)}"
        )


def evaluate(model, tasks, model_type="hmamba", batch_size=1, device="cpu", dtype="float32", limit=None,
             num_fewshot=None, log_samples=False, model_args=None):
    """Run lm-eval's `simple_evaluate` on a checkpoint folder or Hub id. tasks: list or comma-separated names
    (the offline hmamba_* tasks, or harness tasks such as lambada_openai when the Hub is reachable).
    model_type "hmamba" uses HMambaLM, "hf" the stock HFLM with trust_remote_code=True; model_args: more keyword
    arguments for either (e.g. max_length, add_bos_token). Returns lm-eval's results dict."""
    import lm_eval

    from . import lm  # noqa: F401  (registers --model hmamba)

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not one of {MODEL_TYPES}")
    tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    if not tasks or not all(tasks):
        raise ValueError(f"no task names in {tasks!r}: pass e.g. --tasks {OFFLINE_TAG}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if not os.path.isdir(model) and hub_offline():
        raise FileNotFoundError(f"model {model!r} is not a local folder and the Hugging Face Hub is offline")
    manager = task_manager()
    check_tasks(tasks, manager)
    model_args = dict(pretrained=str(model), dtype=dtype, trust_remote_code=True, **(model_args or {}))
    try:
        return lm_eval.simple_evaluate(model=model_type, model_args=model_args, tasks=tasks, batch_size=batch_size,
                                       device=device, limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                                       log_samples=log_samples)
    except ConnectionError as e:
        raise ValueError(f"{e}: the Hugging Face Hub is unreachable; the offline tasks are "
                         f"{','.join(OFFLINE_TASKS)}") from e


def run(model, tasks=None, text=None, model_type="hmamba", batch_size=1, device="cpu", dtype="float32", limit=None,
        num_fewshot=None, max_length=1024, strides=(512,), output=None, tokenizer=None):
    """`hmamba eval`: lm-eval tasks and/or the perplexity of a text file; prints tables, writes
    {"model", "lm_eval", "perplexity"} as JSON (atomically) to `output`, returns the same dict."""
    from ..generate import check_model_source

    if tasks is None and text is None:
        raise ValueError("nothing to evaluate: pass --tasks (e.g. hmamba_offline) and/or --text FILE")
    if text is not None and not os.path.isfile(text):
        raise FileNotFoundError(f"--text {text}: no such file")
    if output is not None and os.path.isdir(output):
        raise IsADirectoryError(f"--output {output} is a folder: give the JSON file's path, e.g. "
                                f"{os.path.join(output, 'results.json')}")
    check_model_source(model, hmamba=model_type == "hmamba" or text is not None)  # stock HFLM runs any model
    if tasks is not None and importlib.util.find_spec("lm_eval") is None:
        raise ValueError("--tasks runs the lm-eval harness, which is not installed: pip install 'hmamba[eval]'")
    report = {"model": str(model), "lm_eval": None, "perplexity": None}
    if tasks is not None:
        report["lm_eval"] = evaluate(model, tasks, model_type=model_type, batch_size=batch_size, device=device,
                                     dtype=dtype, limit=limit, num_fewshot=num_fewshot,
                                     model_args=dict(tokenizer=tokenizer) if tokenizer else None)
        print(format_results(report["lm_eval"]), flush=True)
    if text is not None:
        from ..generate import load
        from .perplexity import format_perplexity_table, text_perplexity

        lm, tokenizer = load(model, device=device, dtype=dtype, tokenizer=tokenizer)
        content = Path(text).read_text(encoding="utf-8")
        report["perplexity"] = dict(file=str(text), max_length=max_length, rows=text_perplexity(
            lm, tokenizer, content, max_length=max_length, strides=strides))
        print(f"perplexity of {text} ({len(content.encode('utf-8')):,} bytes):")
        print(format_perplexity_table(report["perplexity"]["rows"]), flush=True)
    if output is not None:
        atomic_write_json(output, report)
        print(f"wrote {output}")
    return report


def format_results(results):
    from lm_eval.utils import make_table

    return make_table(results)


def lm_eval_main(argv):
    """lm-eval's CLI (`lm_eval ARGS`) with --model hmamba registered and the offline tasks included."""
    from lm_eval.__main__ import cli_evaluate

    from . import lm  # noqa: F401

    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv = [*argv, "--include_path", str(TASKS_DIR)]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0
