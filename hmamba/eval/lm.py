"""HMamba in the lm-eval harness: `--model hmamba` (an HFLM subclass registered in lm-eval's model registry).

Importing this module imports lm-eval and registers the model. `import hmamba` does not import lm-eval; it only
registers a lazy "hmamba" entry when lm-eval is already loaded. lm-eval 0.4.13 has no entry-point discovery for
models (its registry holds a fixed MODEL_MAPPING), so for the `lm_eval` command line use

    python -m hmamba.eval --model hmamba --model_args pretrained=PATH --tasks ...

which is lm-eval's own CLI with this module imported and hmamba's offline tasks on the include path. Checkpoints
also evaluate with the stock `lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True`.
"""

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import hmamba  # noqa: F401  (registers HMamba with the Auto classes: no trust_remote_code needed)


@register_model("hmamba")
class HMambaLM(HFLM):
    """HFLM for HMamba checkpoints (a folder, Hub id or an HMambaForCausalLM instance).

    Differences from `--model hf`: decoder-only backend, the hmamba package's own model code, scoring calls build
    no recurrent cache, and `add_bos_token=False` by default: strings are encoded without special tokens (Mamba's
    GPT-NeoX tokenizer adds none anyway; T5-style byte tokenizers would append EOS to every context). HMamba has no position limit; `max_length` (default 2048) only sets the windows of
    loglikelihood_rolling and the truncation of long contexts. Right-padded scoring batches give the numbers of
    batch size 1 (the model is causal, padding only follows the real tokens); generation left-pads and HMamba
    counts chunk boundaries from each row's first real token, so a batch generates what each prompt does alone.
    """

    def __init__(self, pretrained, backend="causal", max_length=2048, add_bos_token=False, **kwargs):
        if backend != "causal":
            raise ValueError(f"HMamba is a causal LM: backend={backend!r} is not supported (use 'causal')")
        super().__init__(pretrained=pretrained, backend="causal", max_length=max_length, add_bos_token=add_bos_token,
                         **kwargs)

    def _model_call(self, inps, attn_mask=None, labels=None):
        mixed = self.mixed_precision_dtype
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=mixed, enabled=mixed is not None):
            return self.model(inps, use_cache=False).logits
