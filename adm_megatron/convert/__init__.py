"""diffusers <-> megatron conversion: key / layout mappings (one ``*_mapping`` module per model
family, used through ``adm_megatron.families``) and megatron-core distributed checkpoints with
conversion to and from diffusers directories (``checkpoint``)."""

from adm_megatron.convert.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    check_output_dir,
    export_diffusers,
    hf_to_megatron_checkpoint,
    is_megatron_checkpoint,
    load_megatron_checkpoint,
    load_megatron_checkpoint_into,
    megatron_to_hf_checkpoint,
    read_checkpoint_arch,
    read_checkpoint_family,
    read_checkpoint_meta,
    save_megatron_checkpoint,
    verify_checkpoint,
)
