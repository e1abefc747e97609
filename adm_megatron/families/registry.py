"""The model-family interface: one :class:`ModelFamily` spec per backbone, registered by name.

The trainer, the algorithms, the teacher loader, the converter and the tools never name a
backbone: they resolve a family here (by its name, as ``--model`` and checkpoints spell it, or by
the diffusers ``_class_name`` of a transformer / pipeline directory) and call its fields. A new
backbone is one module that builds a ``ModelFamily`` and calls :func:`register_family`, plus one
import line in ``adm_megatron/families/__init__.py`` (the pattern of torchtitan's ``TrainSpec``
registry).

Contract of the megatron model a family builds (what ``DiTFunction`` and the converter rely on):

* ``model(hidden_states=x_t, encoder_hidden_states=text, timestep=t, **extra)`` with the latents in
  the family's ``latent_layout``; ``extra`` holds ``image_rotary_emb`` (the family's
  ``positional_inputs``) when that is not None and ``pooled_projections`` when the batch carries a
  pooled text embedding -- diffusers' own argument names. It returns an object with ``.sample``.
* ``return_features=True, feature_every=k`` returns ``.features``: the outputs of blocks
  ``tapped_block_indices(num_layers, k)`` over the latent tokens, each ``[B, hidden, T, h, w]``
  (``head_kind='3d'``) or ``[B, hidden, h, w]`` (``'2d'``).
* ``model.arch`` is the family's architecture object: a frozen dataclass with a class attribute
  ``family`` (the family's name) and ``num_layers``, ``hidden_size``, ``num_attention_heads`` and
  ``in_channels``; ``model.config`` is its megatron-core
  ``TransformerConfig``; ``model.sharded_state_dict()`` covers every tensor-parallel shard.

Importing this module is cheap (no torch, diffusers or megatron): families import their model code
inside their functions, so ``--help`` and argument checks stay fast.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

LATENT_LAYOUTS = {"video": "[B, F, C, H, W]", "image": "[B, C, H, W]"}
HEAD_KINDS = ("3d", "2d")
# the most T5 tokens of a prompt where no family says: the input length T5 was pre-trained at (the
# limit StableDiffusion3Pipeline keeps too); beyond it a longer prompt costs memory as the square of
# its length in T5's attention (100000 tokens asked for 80 GB) and was never trained on
T5_MAX_LENGTH = 512


@dataclass(frozen=True)
class Conditioning:
    """What the backbone is conditioned on besides the latents and the timestep."""

    text_length: int  # tokens of a prompt embedding
    text_width: int  # channels of a prompt embedding
    pooled_width: int | None = None  # width of the pooled text embedding (SD3), None when not used
    any_text_length: bool = False  # True: prompts of any length (text_length is the synthetic default)
    # the most T5 tokens of a prompt: the longest max_sequence_length the family's pipeline renders with
    # (tools/precompute_text_embeddings.py refuses a longer --max-length); by default T5's own
    max_sequence_length: int = T5_MAX_LENGTH


@dataclass(frozen=True)
class PromptEmbeddings:
    """Encoded prompts for rendering: ``text`` [P, L, D], ``negative`` [L, D] (the empty prompt),
    and the pooled embeddings [P, Dp] / [Dp] of families that take one (else None)."""

    text: Any
    negative: Any
    pooled: Any = None
    negative_pooled: Any = None


@dataclass(frozen=True)
class ModelFamily:
    """One backbone family. ``arch`` below is the family's own frozen architecture dataclass."""

    name: str  # as --model, checkpoints ('model') and errors spell it
    diffusers_classes: tuple[str, ...]  # transformer config.json _class_name(s) it reads; [0] is written
    pipeline_classes: tuple[str, ...]  # model_index.json _class_name(s) of its diffusers pipelines
    schedulers: tuple[str, ...]  # scheduler _class_name(s) whose config may give the noise schedule
    # a scheduler config (with _class_name) of the family's reference pipeline, for runs that need
    # a schedule but have no pipeline (the benchmark)
    reference_scheduler: dict
    latent_layout: str  # 'video' ([B, F, C, H, W]) or 'image' ([B, C, H, W])
    head_kind: str  # discriminator heads on the taps: '3d' or '2d' (see adm_megatron.heads)
    # (diffusers config dict, source for errors) -> arch; one-line ValueError for what is unsupported
    arch_from_diffusers_config: Callable[[dict, str], Any]
    # arch -> the diffusers config.json dict (with _class_name)
    arch_to_diffusers_config: Callable[[Any], dict]
    # (arch, *, sequence_parallel, recompute, params_dtype, impl, device) -> megatron model for the
    # parallel layout in force (a world of one if none); ValueError for layouts the arch cannot take
    build_model: Callable[..., Any]
    # full (unsharded) state dicts: (diffusers state, arch) -> megatron-named state, and back
    hf_to_megatron: Callable[[dict, Any], dict]
    megatron_to_hf: Callable[[dict, Any], dict]
    diffusers_model_class: Callable[[], type]  # () -> the diffusers transformer class (imported lazily)
    # (arch, frames, latent_height, latent_width, device) -> image_rotary_emb for the latent size, or None
    positional_inputs: Callable[..., Any]
    conditioning: Callable[[Any], Conditioning]  # arch -> text length / width, pooled width
    # (arch, config) -> None: one-line ConfigError for a run layout / latent size the arch cannot take
    check_run: Callable[[Any, Any], None]
    # (pipeline_dir, transformer_dir | None, PromptEmbeddings, num_inference_steps, out_dir, *, fmt,
    #  guidance_scale, seed, device, dtype, seconds, first) -> written paths: samples through the real
    #  pipeline, row j being sample first + j (its file name and noise seed + first + j)
    render_samples: Callable[..., list]
    # (pipeline_dir, prompts, arch, device, text_length=None) -> PromptEmbeddings, with the pipeline's own text
    # encoder(s), to the token length the run trained on (None: the pipeline's default)
    encode_prompts: Callable[..., PromptEmbeddings]
    # the diffusers scheduler class the few-step generator samples with, built from the pipeline's own
    # scheduler config (``Class.from_config(pipe.scheduler.config)``); None: the pipeline's scheduler as shipped
    sampler_scheduler: str | None = None
    # (pipeline_dir, arch, text_length | None) -> the pipeline call's text arguments (e.g.
    # max_sequence_length) that encode a prompt as the run's embeddings were; reads configs only
    prompt_call_options: Callable[..., dict] | None = None
    presets: dict = field(default_factory=dict)  # real-size name -> diffusers config (meta builds, plans)
    # name -> (out_dir, seed, overwrite) -> out_dir: a tiny random but complete diffusers pipeline of
    # the model it is named after, built offline (tests, smoke runs; tools/make_tiny_pipeline.py)
    tiny_pipelines: dict = field(default_factory=dict)
    # what this family has the formulas / parts for: 'bench', 'memory-plan', 'pixel-discriminator'
    tools: frozenset = frozenset()
    # 'bench': (arch, latent tensor shape, text length, blocks, output_layer) -> CallFlops
    # (adm_megatron.bench.flops), and arch -> (frames, height, width) of the latents it was trained at
    call_flops: Callable[..., Any] | None = None
    native_latent_size: Callable[[Any], tuple[int, int, int]] | None = None
    # (arch, latent tensor shape, text length, adapted linears, blocks) -> forward FLOPs of the LoRA
    # adapters on them (adapted linears: adm_megatron.bench.flops.AdaptedLinear, by megatron path)
    lora_flops: Callable[..., float] | None = None
    # 'memory-plan': arch -> the planner's per-block counts (adm_megatron.memory.terms.ActivationTerms)
    memory_terms: Callable[[Any], Any] | None = None
    # 'pixel-discriminator' (ADP's pixel branch): the diffusers class of the pipeline's ``vae/``, and
    # (vae, latents in latent_layout) -> every frame as an image [N, 3, h, w] in about [-1, 1], as the
    # family's pipeline decodes (adm_megatron.models.vae_decode)
    vae_class: str | None = None
    decode_images: Callable[[Any, Any], Any] | None = None

    def __post_init__(self):
        if self.latent_layout not in LATENT_LAYOUTS:
            raise ValueError(f"family {self.name!r}: latent_layout must be one of {sorted(LATENT_LAYOUTS)}")
        if self.head_kind not in HEAD_KINDS:
            raise ValueError(f"family {self.name!r}: head_kind must be one of {HEAD_KINDS}")
        if not self.diffusers_classes:
            raise ValueError(f"family {self.name!r}: needs at least one diffusers class name")
        if "bench" in self.tools and None in (self.call_flops, self.lora_flops, self.native_latent_size):
            raise ValueError(f"family {self.name!r}: tool 'bench' needs call_flops, lora_flops and native_latent_size")
        if "memory-plan" in self.tools and self.memory_terms is None:
            raise ValueError(f"family {self.name!r}: tool 'memory-plan' needs memory_terms")
        if "pixel-discriminator" in self.tools and (self.vae_class is None or self.decode_images is None):
            raise ValueError(f"family {self.name!r}: tool 'pixel-discriminator' needs vae_class and decode_images")

    # -- derived helpers (the same for every family) --------------------------------------------
    def arch_from_pretrained_dir(self, path: str):
        """The architecture of a diffusers transformer directory (its ``config.json``)."""
        return self.arch_from_diffusers_config(read_model_config(path), os.path.join(path, "config.json"))

    def vae_type(self):
        """The diffusers class of the family pipeline's VAE (``vae_class``)."""
        import diffusers

        return getattr(diffusers, self.vae_class)

    def load_vae(self, vae_dir: str):
        """The pipeline's VAE from its local ``vae/`` directory."""
        return self.vae_type().from_pretrained(vae_dir, local_files_only=True)

    def sample_formats(self) -> tuple[str, ...]:
        """The file formats its rendered samples are written in: a video's mp4, gif or png (its frames
        side by side), an image's png."""
        return ("mp4", "gif", "png") if self.latent_layout == "video" else ("png",)

    def latent_shape(self, arch, frames: int, height: int, width: int) -> tuple[int, ...]:
        """One sample's latent shape (no batch dimension) at this latent size."""
        if self.latent_layout == "video":
            return (frames, arch.in_channels, height, width)
        return (arch.in_channels, height, width)

    def load_hf_weights(self, hf_dir: str, arch) -> dict:
        """The full megatron-named weights of a diffusers directory of this family."""
        from adm_megatron.models.diffusers_files import read_diffusers_weights

        return self.hf_to_megatron(read_diffusers_weights(hf_dir), arch)

    def build_model_from_hf(self, hf_dir: str, **kwargs):
        """The megatron model with a diffusers directory's weights (``kwargs`` as ``build_model``)."""
        from adm_megatron.models.weights import load_full_state_dict

        arch = self.arch_from_pretrained_dir(hf_dir)
        model = self.build_model(arch, **kwargs)
        load_full_state_dict(model, self.load_hf_weights(hf_dir, arch), source=hf_dir)
        return model

    def require(self, tool: str, what: str) -> "ModelFamily":
        """Itself, or a one-line ValueError when ``tool`` has no formulas for this family."""
        if tool not in self.tools:
            have = sorted(f.name for f in _FAMILIES.values() if tool in f.tools)
            raise ValueError(f"{what}: model family {self.name!r} is not supported "
                             f"(supported: {', '.join(have) or 'none'})")
        return self


# -- building blocks of family modules: model code imported on first use, so registering is free --


def check_latent_patches(data, patch: int) -> None:
    """One-line ConfigError naming ``data.height`` or ``data.width`` (so that the message says where
    the key was set) when it does not split into patches of ``patch``."""
    from adm_megatron.config import ConfigError

    for key in ("height", "width"):
        value = getattr(data, key)
        if value % patch:
            raise ConfigError(f"data.{key}={value}: not divisible by the patch size {patch} (latent pixels)")


def lazy(module: str, name: str) -> Callable:
    """A function that imports ``module`` when first called and calls its ``name``."""
    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = name
    return call


def lazy_class(module: str, name: str) -> Callable[[], type]:
    """``() -> module.name`` (e.g. the diffusers transformer class), imported when called."""
    return lambda: getattr(importlib.import_module(module), name)


def arch_reader(module: str, name: str) -> Callable[[dict, str], Any]:
    """``(config, source) -> arch`` through the architecture class ``module.name``'s
    ``from_diffusers_config``."""
    return lambda config, source="config": lazy_class(module, name)().from_diffusers_config(config, source=source)


def arch_writer(class_name: str) -> Callable[[Any], dict]:
    """``arch -> config.json dict`` with ``_class_name`` set to the diffusers class written."""
    return lambda arch: {"_class_name": class_name, **arch.to_diffusers_config()}


def tiny_pipeline(module: str, name: str, **options) -> Callable[[str, int, bool], str]:
    """``(out_dir, seed, overwrite) -> out_dir`` through the builder ``module.name`` with ``options``."""
    build = lazy(module, name)
    return lambda out_dir, seed=0, overwrite=False: build(out_dir, seed=seed, overwrite=overwrite, **options)


def tiny_pipeline_names() -> tuple[str, ...]:
    """Every registered family's tiny pipelines."""
    return tuple(name for family in _FAMILIES.values() for name in family.tiny_pipelines)


def build_tiny_pipeline_named(name: str, out_dir: str, seed: int = 0, overwrite: bool = False) -> str:
    """The tiny pipeline ``name`` (:func:`tiny_pipeline_names`) written to ``out_dir``."""
    for family in _FAMILIES.values():
        if name in family.tiny_pipelines:
            return family.tiny_pipelines[name](out_dir, seed, overwrite)
    raise ValueError(f"tiny pipeline {name!r}: expected one of {', '.join(tiny_pipeline_names())}")


def per_head_mapping(module: str, name: str) -> Callable[[dict, Any], dict]:
    """A key-mapping function ``module.name(state, num_heads)`` as the spec's ``(state, arch)``."""
    mapping = lazy(module, name)
    return lambda state, arch: mapping(state, arch.num_attention_heads)


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to the registry; a name or a diffusers class already taken is an error."""
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"model family {family.name!r} is already registered")
    for other in _FAMILIES.values():
        taken = set(other.diffusers_classes) & set(family.diffusers_classes)
        if other.name != family.name and taken:
            raise ValueError(f"model family {family.name!r}: diffusers class {sorted(taken)[0]!r} is "
                             f"already read by family {other.name!r}")
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Remove a family (tests register throw-away ones)."""
    _FAMILIES.pop(name, None)


def family_names() -> tuple[str, ...]:
    return tuple(sorted(_FAMILIES))


def known_diffusers_classes() -> tuple[str, ...]:
    return tuple(sorted(c for f in _FAMILIES.values() for c in f.diffusers_classes))


def get_family(name: str) -> ModelFamily:
    """The family called ``name``; one-line ValueError listing the known names."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"model family {name!r} is not known (known: {', '.join(family_names())})") from None


def family_of_arch(arch) -> ModelFamily:
    """The family an architecture object belongs to (its class attribute ``family``)."""
    name = getattr(arch, "family", None)
    if name is None:
        raise ValueError(f"{type(arch).__name__}: an architecture without a 'family' attribute")
    return get_family(name)


def family_for_diffusers_class(class_name: str, source: str = "") -> ModelFamily:
    """The family that reads diffusers transformers of ``class_name``; one-line ValueError
    (prefixed with ``source``) listing the known classes."""
    for family in _FAMILIES.values():
        if class_name in family.diffusers_classes:
            return family
    where = f"{source}: " if source else ""
    raise ValueError(f"{where}_class_name {class_name!r} is not a known diffusers transformer "
                     f"(known: {', '.join(known_diffusers_classes())})")


def read_model_config(path: str) -> dict:
    """A diffusers directory's ``config.json``; FileNotFoundError / ValueError in one line."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: no diffusers config.json in this directory")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_path}: unreadable ({' '.join(str(err).split())})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not a JSON object")
    return config


def family_of_model_dir(path: str) -> ModelFamily:
    """The family of a diffusers transformer directory, from its ``config.json`` ``_class_name``."""
    config = read_model_config(path)
    return family_for_diffusers_class(config.get("_class_name", ""), os.path.join(path, "config.json"))


def family_for_preset(name: str) -> tuple[ModelFamily, dict]:
    """(family, diffusers config) of a real-size preset name; one-line ValueError listing them."""
    for family in _FAMILIES.values():
        if name in family.presets:
            return family, family.presets[name]
    raise ValueError(f"{name!r}: expected one of {', '.join(preset_names())}")


def preset_names(tool: str | None = None) -> tuple[str, ...]:
    """The real-size presets of every family (of the families with ``tool`` in their spec, if given)."""
    return tuple(sorted(p for f in _FAMILIES.values() if tool is None or tool in f.tools for p in f.presets))
