"""HMamba configuration.

Self-contained: imports only transformers, so it ships with `trust_remote_code` checkpoints.
"""

import math

from transformers import PretrainedConfig

POOLING_MODES = ("last", "mean")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _int_at_least(low):
    return lambda value: _is_int(value) and value >= low


# the rule each field must meet, checked whenever it is set: at construction, from_pretrained(..., field=value),
# config.field = value
FIELD_RULES = {
    **{name: (_int_at_least(1), "an integer >= 1")
       for name in ("vocab_size", "hidden_size", "state_size", "expand", "conv_kernel", "chunk_size")},
    "time_step_rank": (_int_at_least(1), 'an integer >= 1 (or "auto" when constructing: hidden_size / 16)'),
    **{name: (_int_at_least(0), "an integer >= 0") for name in ("num_low_layers", "num_high_layers", "num_out_layers")},
    **{name: (_is_positive, "a number > 0")
       for name in ("time_step_min", "time_step_max", "time_step_floor", "layer_norm_epsilon")},
    "pooling": (lambda v: v in POOLING_MODES, f"one of {POOLING_MODES}"),
    "time_step_init_scheme": (lambda v: v in ("random", "constant"), 'one of ("random", "constant")'),
    "hidden_act": (lambda v: v in ("silu", "swish"), '"silu" (the Mamba activation)'),
}


def _check(name, value, ok, allowed):
    if not ok:
        raise ValueError(f"HMambaConfig.{name}={value!r} is invalid: {name} must be {allowed}.")


class HMambaConfig(PretrainedConfig):
    r"""Configuration of a hierarchical Mamba language model.

    The residual stream passes `num_low_layers` Mamba blocks at token rate (the L-stack), is causally pooled
    into chunks of `chunk_size` tokens, passes `num_high_layers` Mamba blocks at chunk rate (the H-stack),
    and each token then receives the H-stack's update of the last chunk that is complete at that token.
    `num_out_layers` token-rate blocks follow. With `chunk_size=1` the model is exactly a flat Mamba of
    `num_low_layers + num_high_layers + num_out_layers` layers.

    The Mamba fields (`hidden_size`, `state_size`, `expand`, `conv_kernel`, `time_step_*`, `use_bias`,
    `use_conv_bias`, `layer_norm_epsilon`, `residual_in_fp32`) mean what they mean in transformers'
    `MambaConfig`, so pretrained Mamba checkpoints map one to one.

    Args:
        num_low_layers: Mamba blocks of the L-stack (token rate), >= 0.
        num_high_layers: Mamba blocks of the H-stack (chunk rate), >= 0.
        num_out_layers: Mamba blocks after the fusion (token rate), >= 0.
        chunk_size: tokens per H-stack position, >= 1 (1 = flat Mamba).
        pooling: how a chunk is summarised for the H-stack: "last" (the chunk's last token) or "mean".
        rescale_prenorm_residual: divide `out_proj` weights by sqrt(number of layers) at init (as mamba_ssm).
    """

    model_type = "hmamba"

    def __init__(
        self,
        vocab_size=50280,
        hidden_size=768,
        state_size=16,
        expand=2,
        conv_kernel=4,
        time_step_rank="auto",
        time_step_scale=1.0,
        time_step_min=0.001,
        time_step_max=0.1,
        time_step_init_scheme="random",
        time_step_floor=1e-4,
        use_bias=False,
        use_conv_bias=True,
        hidden_act="silu",
        layer_norm_epsilon=1e-5,
        residual_in_fp32=True,
        initializer_range=0.02,
        rescale_prenorm_residual=True,
        num_low_layers=12,
        num_high_layers=12,
        num_out_layers=0,
        chunk_size=4,
        pooling="last",
        use_cache=True,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.state_size = state_size
        self.expand = expand
        self.conv_kernel = conv_kernel
        self.time_step_rank = math.ceil(hidden_size / 16) if time_step_rank == "auto" else time_step_rank
        self.time_step_scale = time_step_scale
        self.time_step_min = time_step_min
        self.time_step_max = time_step_max
        self.time_step_init_scheme = time_step_init_scheme
        self.time_step_floor = time_step_floor
        self.use_bias = use_bias
        self.use_conv_bias = use_conv_bias
        self.hidden_act = hidden_act
        self.layer_norm_epsilon = layer_norm_epsilon
        self.residual_in_fp32 = residual_in_fp32
        self.initializer_range = initializer_range
        self.rescale_prenorm_residual = rescale_prenorm_residual
        self.num_low_layers = num_low_layers
        self.num_high_layers = num_high_layers
        self.num_out_layers = num_out_layers
        self.chunk_size = chunk_size
        self.pooling = pooling
        self.use_cache = use_cache
        intermediate_size = kwargs.pop("intermediate_size", None)  # derived: expand * hidden_size
        _check("intermediate_size", intermediate_size, intermediate_size in (None, expand * hidden_size),
               f"expand * hidden_size = {expand * hidden_size} (set expand instead; it is derived)")
        self.check()
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )

    def __setattr__(self, key, value):
        if key in FIELD_RULES:
            ok, allowed = FIELD_RULES[key]
            _check(key, value, ok(value), allowed)
        super().__setattr__(key, value)

    def check(self):
        """Raise ValueError where fields contradict each other (each field alone is checked when it is set). Runs at
        construction and again when a model is built, for fields changed in between."""
        total = self.num_low_layers + self.num_high_layers + self.num_out_layers
        _check("num_low_layers + num_high_layers + num_out_layers", total, total >= 1, ">= 1 (the model needs a layer)")
        _check(
            "num_low_layers + num_high_layers",
            self.num_low_layers + self.num_high_layers,
            self.num_low_layers + self.num_high_layers >= 1,
            ">= 1 (the hierarchy needs an L or H layer; a flat Mamba is num_low_layers=N with chunk_size=1)",
        )
        _check("time_step_min", self.time_step_min, self.time_step_min <= self.time_step_max,
               f"<= time_step_max={self.time_step_max}")

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """transformers' reader, refusing a config.json of another model: loading a Mamba or GPT config as HMamba
        would otherwise fill every missing field with a default and build a different model than the file's."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") != cls.model_type:
            hint = (
                " It is a Mamba checkpoint: convert it with `hmamba convert SRC OUT` (chunk_size=1 reproduces it)."
                if config_dict.get("model_type") == "mamba" or "d_model" in config_dict
                else ""
            )
            raise ValueError(
                f"{pretrained_model_name_or_path} has a config.json with model_type={config_dict.get('model_type')!r}, "
                f"not {cls.model_type!r}: it is not an HMamba config.{hint}"
            )
        return config_dict, kwargs

    @property
    def intermediate_size(self):
        """The mixer's inner width, expand * hidden_size (derived, so it follows both)."""
        return self.expand * self.hidden_size

    @property
    def num_hidden_layers(self):
        """All Mamba blocks: L-stack, H-stack and out layers."""
        return self.num_low_layers + self.num_high_layers + self.num_out_layers

    @num_hidden_layers.setter
    def num_hidden_layers(self, value):
        if value != self.num_hidden_layers:
            raise ValueError(
                f"HMambaConfig.num_hidden_layers={value!r}: it is num_low_layers + num_high_layers + num_out_layers "
                f"({self.num_low_layers} + {self.num_high_layers} + {self.num_out_layers} here); set those instead, "
                "e.g. num_low_layers=2, num_high_layers=2."
            )

    @property
    def is_flat(self):
        """Whether this computes exactly a flat Mamba of num_hidden_layers blocks (chunk_size 1, or no H layers):
        pretrained Mamba weights then give the original logits, and `hmamba export` can write it back."""
        return self.chunk_size == 1 or self.num_high_layers == 0


__all__ = ["HMambaConfig"]
