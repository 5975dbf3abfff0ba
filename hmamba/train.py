"""Training and fine-tuning with the Hugging Face Trainer: the library side of `hmamba train`.

    text (file, folder, datasets dataset, or the embedded corpus)
      -> tokenize (eos between documents) -> pack into blocks of `block_size` tokens
      -> split: the last `eval_fraction` of the blocks is held out
      -> Trainer (labels = input_ids, shifted inside the model) -> evaluate -> save a loadable model

Works unchanged under `accelerate launch` (DDP), with gradient checkpointing, bf16 autocast, per-stack
freezing and PEFT LoRA adapters.
"""

import inspect
import math
import os
import shutil
import time

import torch
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.integrations import get_available_reporting_integrations
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from .atomic import atomic_write_json
from .configuration_hmamba import HMambaConfig
from .data import default_tokenizer, load_documents, load_tokenizer, pack, split_blocks
from .generate import builtin_config, load_model
from .hub import UploadError, check_repo_id, write_model_card
from .hub import push_to_hub as upload
from .modeling_hmamba import HMambaForCausalLM

LORA_MODULES = ("in_proj", "x_proj", "dt_proj", "out_proj")
STACKS = {"low": "low_layers", "high": "high_layers", "out": "out_layers"}
PARAMETER_GROUPS = ("embeddings", "low", "high", "out", "norm_f")
STAGING = ".staging"  # where AtomicCheckpointTrainer writes a checkpoint before renaming it into place
# Trainer loggers (report_to) whose absence transformers can detect; each is the name of its pip package
REPORTERS = ("comet_ml", "dagshub", "dvclive", "mlflow", "neptune", "tensorboard", "wandb", "codecarbon", "clearml",
             "swanlab", "trackio")


# ----------------------------------------------------------------------------------------------------------
# What trains: per-stack freezing and LoRA targets


def parameter_group(name):
    """Which of PARAMETER_GROUPS a parameter name of HMambaForCausalLM (or a PEFT wrapper of it) belongs to."""
    for group, attr in STACKS.items():
        if f".{attr}." in name:
            return group
    if "embeddings" in name or "lm_head" in name:  # tied: one tensor
        return "embeddings"
    if "norm_f" in name:
        return "norm_f"
    raise ValueError(f"parameter {name!r} belongs to none of {PARAMETER_GROUPS}")


def set_trainable(model, train_only=None, freeze=None):
    """Freeze parameter groups: `train_only=("high",)` trains the H-stack alone, `freeze=("low",)` freezes the
    L-stack. Returns {group: number of trainable parameters}."""
    for groups in (train_only or (), freeze or ()):
        unknown = set(groups) - set(PARAMETER_GROUPS)
        if unknown:
            raise ValueError(f"unknown parameter group(s) {sorted(unknown)}: choose from {PARAMETER_GROUPS}")
    if train_only and freeze:
        raise ValueError("pass either train_only or freeze, not both")
    frozen = set(PARAMETER_GROUPS) - set(train_only) if train_only else set(freeze or ())
    counts = dict.fromkeys(PARAMETER_GROUPS, 0)
    for name, p in model.named_parameters():
        group = parameter_group(name)
        if group in frozen:
            p.requires_grad_(False)
        elif p.requires_grad:
            counts[group] += p.numel()
    if not any(counts.values()):
        raise ValueError(f"nothing left to train: every parameter group is frozen ({sorted(frozen)})")
    return counts


def lora_target_modules(stacks=("low", "high", "out"), modules=LORA_MODULES):
    """PEFT `target_modules` (a regex, matched against full module names) for the Mamba projections of the
    chosen stacks: `LoraConfig(target_modules=lora_target_modules(stacks=("high",)))` adapts the H-stack only."""
    unknown_stacks, unknown_modules = set(stacks) - set(STACKS), set(modules) - set(LORA_MODULES)
    if unknown_stacks or unknown_modules:
        raise ValueError(
            f"unknown LoRA stacks {sorted(unknown_stacks)} / modules {sorted(unknown_modules)}: "
            f"stacks are {tuple(STACKS)}, modules {LORA_MODULES}"
        )
    if not stacks or not modules:
        raise ValueError("LoRA needs at least one stack and one module to adapt")
    layers = "|".join(STACKS[s] for s in stacks)
    return rf".*\.({layers})\.\d+\.mixer\.({'|'.join(modules)})"


def add_lora(model, r=8, alpha=16, dropout=0.0, stacks=("low", "high", "out"), modules=LORA_MODULES):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_modules(stacks, modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


# ----------------------------------------------------------------------------------------------------------
# Trainer


class BlockDataset(torch.utils.data.Dataset):
    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class AtomicCheckpointTrainer(Trainer):
    """Trainer whose checkpoints appear all at once: each is written into `.staging/` and renamed into place
    when complete, so an interrupted save never leaves a half checkpoint for `--resume` to pick up. The best
    checkpoint (load_best_model_at_end) is recorded at its final path, in the state and in the checkpoint."""

    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, STAGING)
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted save
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial: staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        if self.state.best_model_checkpoint == os.path.join(staging, name):  # this one is the best: where it goes
            self.state.best_model_checkpoint = os.path.join(run_dir, name)
        self.accelerator.wait_for_everyone()  # every rank has written its part (rng states, shards)
        if self.args.should_save:
            self.state.save_to_json(os.path.join(staging, name, TRAINER_STATE_NAME))  # with the final path
            final = os.path.join(run_dir, name)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(os.path.join(staging, name), final)
            os.rmdir(staging)
            rotate_checkpoints(
                output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


class StopAtStep(TrainerCallback):
    """Stop training after `step` optimizer steps (after that step's checkpoint): for interrupt-and-resume."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def build_model(model=None, config="tiny", config_overrides=None, tokenizer=None, dtype=torch.float32):
    """(model, tokenizer): fine-tune `model` (a saved folder or Hub id) or build one from `config` (a built-in
    name or a config.json path) sized to the tokenizer."""
    if model is not None:
        if config_overrides:
            raise ValueError("config overrides apply to a new model; a pretrained one keeps its own config")
        net = load_model(model, dtype)  # first: a wrong model is the error to report, not its missing tokenizer
        return net, load_tokenizer(tokenizer or model)
    tokenizer = load_tokenizer(tokenizer) if tokenizer else default_tokenizer()
    cfg = builtin_config(config) if not str(config).endswith(".json") else HMambaConfig.from_json_file(config)
    overrides = dict(config_overrides or {})
    from_tokenizer = {"vocab_size", "pad_token_id", "eos_token_id", "bos_token_id"}
    own = [k for k in inspect.signature(HMambaConfig).parameters if k not in from_tokenizer | {"kwargs"}]
    for key in overrides:
        if key not in own:
            follows = " (it follows the tokenizer: pass --tokenizer)" if key in from_tokenizer else ""
            raise ValueError(f"--set {key}: not a config field a new model takes{follows}; HMamba's are {', '.join(own)}")
    overrides.update(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    cfg = HMambaConfig(**{**cfg.to_dict(), **overrides})
    return HMambaForCausalLM(cfg).to(dtype), tokenizer


def train(
    output_dir,
    data=None,
    model=None,
    config="tiny",
    config_overrides=None,
    tokenizer=None,
    text_column="text",
    block_size=256,
    eval_fraction=0.01,
    max_eval_blocks=None,
    batch_size=8,
    gradient_accumulation_steps=1,
    learning_rate=2e-3,
    weight_decay=0.1,
    warmup_steps=None,
    max_steps=200,
    logging_steps=10,
    eval_steps=None,
    save_steps=None,
    save_total_limit=2,
    seed=0,
    bf16=False,
    gradient_checkpointing=False,
    train_only=None,
    freeze=None,
    lora=False,
    lora_r=8,
    lora_alpha=16,
    lora_stacks=("low", "high", "out"),
    merge_lora=False,
    resume=False,
    report_to="none",
    push_to_hub=None,
    private=False,
    callbacks=(),
    command=None,
):
    """Train (or fine-tune) an HMamba with the Trainer, then save it to `output_dir` with its tokenizer and
    `train_results.json`. Returns that summary dict (held-out loss, perplexity, bits per token, tokens/s)."""
    started = time.perf_counter()
    if lora and model is None:
        raise ValueError("LoRA adapts a pretrained model: pass model (--model FOLDER or Hub id). Without one the "
                         "adapters would be trained on random weights (and, unmerged, saved without them)")
    saves_full_model = not lora or merge_lora
    loggers = [report_to] if isinstance(report_to, str) else list(report_to or [])
    missing = [n for n in loggers if n in REPORTERS and n not in get_available_reporting_integrations()]
    if missing:  # (an unknown name gets TrainingArguments' own error)
        raise ValueError(f"report_to {', '.join(missing)}: not installed here (pip install {' '.join(missing)})")
    checkpoint = None
    if resume:  # before loading data and model
        checkpoint = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint-N folder in {output_dir} to resume from")
    elif os.path.isdir(output_dir) and set(os.listdir(output_dir)) - {STAGING}:  # (a killed save's leftovers go)
        raise FileExistsError(f"{output_dir} is not empty: choose another folder, remove it, or pass --resume to "
                              "continue the run it holds")
    if push_to_hub:
        check_repo_id(push_to_hub)  # before hours of training, not after
        if not saves_full_model:
            raise ValueError("push_to_hub uploads a full model: with LoRA, pass merge_lora=True (--merge-lora)")
    torch.manual_seed(seed)
    net, tokenizer = build_model(model, config, config_overrides, tokenizer)
    documents, source = load_documents(data, text_column=text_column)
    train_blocks, eval_blocks = split_blocks(pack(documents, tokenizer, block_size), eval_fraction)
    if max_eval_blocks:
        eval_blocks = eval_blocks[:max_eval_blocks]

    counts = set_trainable(net, train_only, freeze) if (train_only or freeze) else None
    if lora:
        if train_only or freeze:
            raise ValueError("LoRA already freezes the base model: choose the adapted stacks with lora_stacks")
        net = add_lora(net, r=lora_r, alpha=lora_alpha, stacks=tuple(lora_stacks))

    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=max_steps // 20 if warmup_steps is None else warmup_steps,
        max_steps=max_steps,
        logging_steps=logging_steps,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        activation_checkpointing=gradient_checkpointing,
        report_to=report_to,
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = AtomicCheckpointTrainer(
        model=net, args=args, train_dataset=BlockDataset(train_blocks), eval_dataset=BlockDataset(eval_blocks),
        callbacks=list(callbacks),
    )
    if trainer.is_world_process_zero():
        print(
            f"hmamba train: {source}; {len(train_blocks)} train / {len(eval_blocks)} held-out blocks of {block_size} "
            f"tokens; {net.num_parameters(only_trainable=True):,} of {net.num_parameters():,} parameters train"
            + (f" ({counts})" if counts else "")
        )
    first_step = 0  # the step this call starts from
    if checkpoint:
        first_step = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME)).global_step
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = trainer.evaluate()

    trainable = trainer.model.num_parameters(only_trainable=True)  # LoRA: the adapters, before merging them away
    if lora and merge_lora:  # save_model writes `trainer.model`: the merged model instead of the adapters
        trainer.model = trainer.model.merge_and_unload()
    trainer.save_model(output_dir)
    tokens_per_step = batch_size * gradient_accumulation_steps * args.world_size * block_size
    tokens = result.global_step * tokens_per_step
    summary = {
        "source": source,
        "parameters": trainer.model.num_parameters(),
        "trainable_parameters": trainable,
        "block_size": block_size,
        "train_blocks": len(train_blocks),
        "eval_blocks": len(eval_blocks),
        "steps": result.global_step,
        "tokens_trained": tokens,
        "train_loss": result.training_loss,
        "eval_loss": metrics["eval_loss"],
        "eval_perplexity": math.exp(metrics["eval_loss"]),
        "eval_bits_per_token": metrics["eval_loss"] / math.log(2),
        "resumed_from_step": first_step,
        "train_seconds": result.metrics["train_runtime"],  # of this call: from first_step on
        "tokens_per_second": (result.global_step - first_step) * tokens_per_step / result.metrics["train_runtime"],
        "command": command,
        "log_history": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
        atomic_write_json(os.path.join(output_dir, "train_results.json"), summary)
        if saves_full_model:  # a model card, and the upload when asked for
            card = dict(
                base_model=model if model and not os.path.isdir(model) else None, command=command,
                notes=f"Trained on {source}: {summary['steps']} steps, {summary['tokens_trained']:,} tokens; held-out "
                f"loss {summary['eval_loss']:.4f} ({summary['eval_bits_per_token']:.3f} bits/token).",
            )
            write_model_card(output_dir, repo_id=push_to_hub, **card)
        print(
            f"summary: {summary['steps']} steps, {summary['tokens_trained']:,} tokens"
            + (f" (resumed at step {first_step})" if first_step else "")
            + f"; {summary['train_seconds']:.0f} s of training ({summary['tokens_per_second']:.0f} tokens/s); held-out "
            f"loss {summary['eval_loss']:.4f} (perplexity {summary['eval_perplexity']:.3f}, "
            f"{summary['eval_bits_per_token']:.3f} bits/token); saved to {output_dir} in "
            f"{time.perf_counter() - started:.0f} s"
        )
        if push_to_hub:
            try:
                commit = upload(trainer.model, tokenizer, push_to_hub, private=private, **card)
            except UploadError as e:
                raise UploadError(f"{e}; the model is saved in {output_dir}: upload it from there (`hf upload "
                                  f"{push_to_hub} {output_dir}`, without its checkpoint folders)") from e
            print(f"pushed to {commit.commit_url}")
    return summary

