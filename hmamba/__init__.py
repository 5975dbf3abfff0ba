"""hmamba: hierarchical Mamba language models for the Hugging Face ecosystem.

Importing the package registers HMamba with AutoConfig, AutoModel and AutoModelForCausalLM, and, when lm-eval is
already imported, `--model hmamba` with lm-eval's registry (lazily: hmamba never imports lm-eval itself).
"""

import sys

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_hmamba import HMambaConfig
from .modeling_hmamba import HMambaCache, HMambaForCausalLM, HMambaModel, HMambaPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(HMambaConfig.model_type, HMambaConfig, exist_ok=True)
AutoModel.register(HMambaConfig, HMambaModel, exist_ok=True)
AutoModelForCausalLM.register(HMambaConfig, HMambaForCausalLM, exist_ok=True)
# save_pretrained copies configuration_hmamba.py / modeling_hmamba.py and writes `auto_map`, so a saved folder
# loads with trust_remote_code=True where hmamba is not installed.
HMambaConfig.register_for_auto_class()
HMambaModel.register_for_auto_class("AutoModel")
HMambaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

if "lm_eval" in sys.modules:
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: it fills an empty registry only)
    from lm_eval.api.registry import model_registry

    if "hmamba" not in model_registry:
        model_registry.register("hmamba", target="hmamba.eval.lm:HMambaLM")

__all__ = ["HMambaCache", "HMambaConfig", "HMambaForCausalLM", "HMambaModel", "HMambaPreTrainedModel", "__version__"]
