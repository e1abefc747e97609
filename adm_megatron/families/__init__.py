"""Backbone families behind one interface (``registry.ModelFamily``); the imports below are the
registry lines: a new family is one module in this package plus one line here."""

from adm_megatron.families import cogvideox  # noqa: F401  (registers 'cogvideox')
from adm_megatron.families import sd3  # noqa: F401  (registers 'sd3')
from adm_megatron.families.registry import (
    Conditioning,
    ModelFamily,
    PromptEmbeddings,
    build_tiny_pipeline_named,
    family_for_diffusers_class,
    family_for_preset,
    family_names,
    family_of_arch,
    family_of_model_dir,
    get_family,
    known_diffusers_classes,
    preset_names,
    read_model_config,
    register_family,
    tiny_pipeline_names,
    unregister_family,
)

__all__ = [
    "Conditioning",
    "ModelFamily",
    "PromptEmbeddings",
    "build_tiny_pipeline_named",
    "family_for_diffusers_class",
    "family_for_preset",
    "family_names",
    "family_of_arch",
    "family_of_model_dir",
    "get_family",
    "known_diffusers_classes",
    "preset_names",
    "read_model_config",
    "register_family",
    "tiny_pipeline_names",
    "unregister_family",
]
