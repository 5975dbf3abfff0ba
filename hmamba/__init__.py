"""hmamba: hierarchical Mamba language models for the Hugging Face ecosystem.

Importing the package registers HMamba with AutoConfig, AutoModel and AutoModelForCausalLM.
"""

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

__all__ = ["HMambaCache", "HMambaConfig", "HMambaForCausalLM", "HMambaModel", "HMambaPreTrainedModel", "__version__"]
