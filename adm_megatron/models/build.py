"""Building the megatron CogVideoX and SD3 for the current parallel layout, from an architecture or
from a diffusers model directory.

``build_model_from_hf(dir)`` is the one-call entry (for any registered model family, by the
directory's ``_class_name``): it sets up a world of one when no process groups exist yet, builds the
model for the layout in force (TP / SP / CP from megatron's parallel_state), and loads the diffusers
weights, each rank taking its own tensor-parallel shard.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from adm_megatron.models.cogvideox import CogVideoXTransformer
from adm_megatron.models.cogvideox_config import CogVideoXArch
from adm_megatron.models.dit_config import make_transformer_config
from adm_megatron.models.sd3 import SD3Transformer
from adm_megatron.models.sd3_config import SD3Arch
from adm_megatron.models.specs import select_sd3_spec, select_spec
from adm_megatron.parallel import ensure_parallel, get_device


def check_layout(arch: CogVideoXArch | SD3Arch, tensor_parallel: int, context_parallel: int) -> None:
    """One-line errors for layouts the architecture cannot take (before any tensor is built)."""
    if arch.num_attention_heads % tensor_parallel:
        raise ValueError(
            f"num_attention_heads={arch.num_attention_heads}: not divisible by "
            f"tensor_parallel={tensor_parallel}"
        )
    if arch.ffn_hidden_size % tensor_parallel:
        raise ValueError(
            f"ffn hidden size {arch.ffn_hidden_size}: not divisible by tensor_parallel={tensor_parallel}"
        )


def _build(model_cls, arch, spec_for, *, sequence_parallel, recompute, params_dtype, impl, device):
    """``model_cls(arch, config, spec)`` for the layout in force; ``spec_for(impl)`` gives the block
    spec (the local one on ``meta`` unless TE is asked for: no kernels run there)."""
    ensure_parallel()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    check_layout(arch, tp, cp)
    config = make_transformer_config(
        arch,
        tensor_parallel=tp,
        context_parallel=cp,
        sequence_parallel=sequence_parallel,
        recompute=recompute,
        params_dtype=params_dtype,
        use_cpu_initialization=True,
    )
    target = torch.device(device) if device is not None else get_device()
    if target.type == "meta":
        with torch.device("meta"):
            return model_cls(arch, config, spec_for("local" if impl == "auto" else impl))
    return model_cls(arch, config, spec_for(impl)).to(target)


def build_model(
    arch: CogVideoXArch,
    *,
    sequence_parallel: bool = False,
    recompute: bool = False,
    params_dtype: torch.dtype = torch.float32,
    impl: str = "auto",
    device: torch.device | str | None = None,
) -> CogVideoXTransformer:
    """A randomly initialised CogVideoX for the parallel layout in force (a world of one if none).

    ``device='meta'`` builds without allocating memory (shapes and parameter counts only).
    """
    return _build(
        CogVideoXTransformer, arch, select_spec,
        sequence_parallel=sequence_parallel, recompute=recompute, params_dtype=params_dtype, impl=impl,
        device=device,
    )


def build_sd3_model(
    arch: SD3Arch,
    *,
    sequence_parallel: bool = False,
    recompute: bool = False,
    params_dtype: torch.dtype = torch.float32,
    impl: str = "auto",
    device: torch.device | str | None = None,
) -> SD3Transformer:
    """A randomly initialised SD3 / SD3.5 MMDiT for the parallel layout in force (a world of one if
    none); ``device='meta'`` as ``build_model``."""
    return _build(
        SD3Transformer, arch,
        lambda kind: select_sd3_spec(kind, qk_norm=arch.qk_norm is not None),
        sequence_parallel=sequence_parallel, recompute=recompute, params_dtype=params_dtype, impl=impl,
        device=device,
    )


def load_hf_weights(hf_dir: str, arch) -> dict[str, torch.Tensor]:
    """The full (unsharded) megatron-named weights of a diffusers directory of ``arch``'s family."""
    from adm_megatron.families import family_of_arch

    return family_of_arch(arch).load_hf_weights(hf_dir, arch)


def build_model_from_hf(hf_dir: str, **kwargs):
    """The megatron model with the weights of a diffusers transformer directory
    (``save_pretrained`` output) of any registered family, for the current parallel layout.
    ``kwargs`` as the family's ``build_model``."""
    from adm_megatron.families import family_of_model_dir

    return family_of_model_dir(hf_dir).build_model_from_hf(hf_dir, **kwargs)
