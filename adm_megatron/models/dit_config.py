"""What the DiT families (CogVideoX, SD3) share in reading their configurations: ``DiffusersArch``,
the base of each family's architecture dataclass (reading a diffusers ``config.json``, the derived
widths), and the megatron-core ``TransformerConfig`` of the blocks for one parallel layout.

Both families use bias-carrying linears, a non-gated tanh-GELU MLP and megatron's parallel settings in
the same way; each family's architecture says its sizes in ``block_config()``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


# what a config value of a field of each type (as the dataclasses spell it) must be, and how an error says it:
# sizes are positive integers (a 0 or a string ended in a traceback once the weights were read)
_FIELD_VALUES = {
    "int": (lambda v: type(v) is int and v > 0, "a positive integer"),
    "float": (lambda v: type(v) in (int, float) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "bool": (lambda v: type(v) is bool, "true or false"),
    "str": (lambda v: type(v) is str, "a string"),
    "str | None": (lambda v: v is None or type(v) is str, "a string or null"),
    "tuple[int, ...]": (lambda v: v is None or isinstance(v, (list, tuple)) and all(type(i) is int for i in v),
                        "a list of integers"),
    "offset": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),  # an int field in ``offsets``
}


class DiffusersArch:
    """Base of a frozen dataclass of a diffusers transformer config's fields (names kept): a
    subclass sets ``diffusers_class_name`` and builds itself in ``from_diffusers_config``."""

    diffusers_class_name: ClassVar[str]
    offsets: ClassVar[frozenset[str]] = frozenset()  # int fields that may be 0 (not a size)

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ffn_hidden_size(self) -> int:
        return 4 * self.hidden_size

    @classmethod
    def _known_fields(cls, config: dict[str, Any], source: str) -> dict[str, Any]:
        """The config's values of this dataclass's fields (``out_channels`` None -> ``in_channels``);
        one-line ValueError when the config is another model's, or names the key, its value and what
        is expected when a value is not of its field's type (or range)."""
        expected = cls.diffusers_class_name
        if config.get("_class_name", expected) != expected:
            raise ValueError(f"{source}: _class_name is {config['_class_name']!r}, expected {expected!r}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in types and not (k == "out_channels" and v is None)}
        for key, value in kwargs.items():
            valid, what = _FIELD_VALUES["offset" if key in cls.offsets else types[key]]
            if not valid(value):
                raise ValueError(f"{source}: {key}={json.dumps(value)}: expected {what}")
        kwargs.setdefault("out_channels", kwargs.get("in_channels", cls.in_channels))
        return kwargs

    @classmethod
    def from_pretrained_dir(cls, path: str):
        """From a diffusers model directory's ``config.json``; one-line error if it has none."""
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path}: no diffusers config.json in this directory")
        with open(config_path) as f:
            return cls.from_diffusers_config(json.load(f), source=config_path)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def make_transformer_config(
    arch,
    *,
    tensor_parallel: int = 1,
    context_parallel: int = 1,
    sequence_parallel: bool = False,
    recompute: bool = False,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool = True,
) -> TransformerConfig:
    """The megatron-core config of ``arch``'s blocks (a ``CogVideoXArch`` or ``SD3Arch``) for one
    parallel layout. The architecture's ``qk_layernorm`` also makes megatron's
    ``finalize_model_grads`` sum the per-head q / k norm gradients over tensor-parallel ranks (by the
    parameter names ``q_layernorm`` / ``k_layernorm``)."""
    return _transformer_config(
        **arch.block_config(),
        tensor_parallel=tensor_parallel,
        context_parallel=context_parallel,
        sequence_parallel=sequence_parallel,
        recompute=recompute,
        params_dtype=params_dtype,
        use_cpu_initialization=use_cpu_initialization,
    )


# megatron-core 0.16 defaults cuda_graph_scope to "full" and then warns, at every config it builds,
# that "full" is deprecated in favour of the empty list; we use no CUDA graphs, so pass the new form
# (only where the field exists: releases without it take nothing)
_NO_CUDA_GRAPH_SCOPE = ({"cuda_graph_scope": []}
                        if "cuda_graph_scope" in {f.name for f in dataclasses.fields(TransformerConfig)} else {})


def _transformer_config(
    *, num_layers, num_attention_heads, head_dim, ffn_hidden_size, bias, norm_eps, qk_layernorm, dropout,
    tensor_parallel, context_parallel, sequence_parallel, recompute, params_dtype, use_cpu_initialization,
) -> TransformerConfig:
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=num_attention_heads * head_dim,
        num_attention_heads=num_attention_heads,
        kv_channels=head_dim,
        ffn_hidden_size=ffn_hidden_size,
        add_bias_linear=bias,
        add_qkv_bias=bias,
        gated_linear_unit=False,
        activation_func=gelu_tanh,
        bias_activation_fusion=False,
        layernorm_epsilon=norm_eps,
        qk_layernorm=qk_layernorm,
        hidden_dropout=dropout,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel,
        context_parallel_size=context_parallel,
        sequence_parallel=sequence_parallel and tensor_parallel > 1,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=True,
        **_NO_CUDA_GRAPH_SCOPE,
    )
