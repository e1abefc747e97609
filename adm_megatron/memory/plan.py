"""The memory planner: per-GPU memory of an ADM (DMD, DMD2, ADP) run, per network and per phase, from
formulas.

All figures are bytes held by ONE rank. Notation: ``TP``, ``CP``, ``DP`` the parallel sizes;
``B`` the micro-batch per data-parallel rank; ``h`` the hidden size, ``a`` the attention heads,
``L`` the blocks, ``Lt`` / ``D`` the text tokens / width (the family's prompt length: CogVideoX's
``max_text_seq_length``, SD3's 77 CLIP + 256 T5), ``Lv = frames x (height/p) x (width/p)`` the video
or image tokens (one frame for images); ``s = Lt + Lv / CP`` the tokens of a CP rank, and
``s_seq`` the rows one rank holds between the parallel linears: ``s / TP`` with sequence
parallelism when text and video are one joint sequence (CogVideoX), ``Lt + Lv / (CP TP)`` when
the text stream is whole on every rank (SD3), else ``s``. ``P`` a network's parameters on one rank
(``counts.py``: tensor-parallel weights split by TP, the rest whole). ``e`` the bytes of an
activation element: 4 in fp32; under BF16 autocast 2, except norm outputs (``e_n``, fp32 under
autocast) and the residual stream (``e_r``: fp32 when an fp32 sin-cos position table is added to
the embeddings, as in CogVideoX-2b and SD3; bf16 with RoPE, as in 5b). Statistics (norm mean /
rstd, attention log-sum-exp) are fp32.

The formulas are the same for every model family; what a family's block keeps per token of each
stream, and its forward / backward working sets, are the family's own counts (``terms.py``; a family
with the ``memory-plan`` tool gives ``memory_terms(arch)``): ``cogvideox_terms.py`` and
``sd3_terms.py`` state them, counted from their blocks' ops and checked by measurement.

Resident state, per network (the settings are the run config's: ``model.bf16_params``,
``optim.<network>.shard_over_dp`` / ``offload``, ``model.recompute``; the plan command can
override them for every network at once):
- weights ``P x w`` (``w`` 4 for fp32 params; 2 for bf16 params, ``model.bf16_params``; the frozen
  teacher is held in bf16 whenever ``model.dtype=bf16``) plus buffers;
- grads (trainable networks): megatron DDP's ``main_grad`` buffer, ``P x 4``: fp32 params' grads are
  fp32, and bf16 params' are accumulated and reduced in fp32 (``model.grad_reduce_in_fp32``, as
  Megatron-LM and NeMo do for bf16; ``train/grad_sync.py``), or ``P x 2`` in bf16 when that is off
  (the optimizer then steps fp32 copies of them, ``P x 4``); for a LoRA generator
  (``model.lora``) ``P`` in the grad, optimizer and step terms is its adapters' elements only, its
  weights the frozen base plus the adapters (its activations are planned as a trainable network's,
  an upper bound: a frozen base linear with an adapter saves the adapter's input);
- optimizer (trainable networks): AdamW's two moments ``P x 8``, plus an fp32 master copy ``P x 4``
  with bf16 params; ``/ DP`` when that network's optimizer state is sharded over data parallel
  (``train/sharded_optimizer.py``: fp32 params' main params are views, no copy);
- offload (per network): with ``optimizer``, a network's optimizer state is on the GPU only in
  its own phase, and its grad buffer exists only there (released between its phases); with ``optimizer_and_params`` its weights too are on the GPU only in the phases
  that run them (fake-score phase: generator + fake score; generator phase: all four;
  discriminator phase: teacher + heads; ``train/offload.py`` learns this from the first iteration);
- fixed: the run's inputs (text and negative embeddings, noise; DMD2 and ADP also a batch of ODE
  pairs: x_T, x_0 and their prompts' embeddings), for each of an update's micro-batches (all are
  made before its first phase; ``data.global_batch_size``); with SP, megatron's global
  all-gather buffer ``s B h e`` that trainable linears gather their input into (linears with
  frozen weights, as the CFG teacher's, gather into fresh tensors: part of their working set);
  with ``train.ema_decay`` > 0 the generator's EMA, ``P x 4`` (fp32 whatever the weights' dtype;
  the generator's trained elements: a LoRA generator's adapters), on the GPU throughout.

Activations autograd saves in one forward with grad of a backbone: per block, the family's counts
for each stream (image / video tokens, text tokens) and the network's kind: trainable (its params
take grads) or frozen with grad through its input (fake score and teacher in the generator phase);
rows in ``e_r`` / ``e_n`` / ``e`` over ``s_seq``, split rows ``e`` over ``s / TP``, statistics fp32;
and on top:
- once per network: the last block's output ``e_r`` rows (the joint sequence, or SD3's image
  stream: its text stream ends in the last block); trainable also the final norm output and its
  modulation ``(e_n + e)`` rows and the text input ``B Lt D e``; the output latents ``B Lv p^2 C e``;
- context parallel: each block's gathered video / image keys and values, ``2 (Lv - Lv / CP) B h / TP e``;
- recompute, per network and phase: ``full`` keeps only each block's input ``s_seq B h e_r``; the
  block being back-propagated is recomputed (the largest block's activations on top, in backward).
  ``selective`` recomputes the core attention only; with SDPA / flash kernels that keep no
  ``s x s`` matrix, what it drops (the kernel's own saved statistics) is within the statistics
  term, so it is planned as ``none``;
- tapped features for the discriminator: views of saved block outputs without SP / CP (the joint
  sequence, or the image stream); with SP or CP each tap is gathered to a new ``[Lv, B, h]`` tensor.

Working sets on top of what is saved (the family's counts): a forward without grad (generator
rollout, CFG teacher, discriminator-phase backbone), per token of each stream; a backward, by kind.
A discriminator-phase backbone keeps each tapped block output (SP / CP: the gathered ``Lv B h e``).

Discriminator heads (the family's ``head_kind``; blocks of width ``c``), per head and sample, at a
block's input size ``T x H x W`` and output ``T x H2 x W2``: 3D (conv3d 3x3x3 -> per-frame conv 3x3
stride 2 -> GroupNorm -> SiLU) trainable ``c (T H W + 3 T H2 W2) e`` (conv3d out, conv2d out, norm
out, SiLU out), frozen with input grad ``2 c T H2 W2 e``; 2D (conv 4x4 stride 2 -> GroupNorm ->
SiLU, ``T = 1``) trainable ``3 c H2 W2 e`` (conv out, norm out, SiLU out), frozen ``2 c H2 W2 e``.
On CPU their first conv also takes a workspace that depends on the machine (an im2col buffer of
the unfolded input, or none: ``memory.cpu_conv_workspace`` measures it at the run's shapes; at
micro-batch 1 the native kernel unfolds the input in the forward and in the frozen heads' backward
too) and, trainable, weight grads per thread; cuDNN's workspace is left to the margin. Likewise on
CPU a frozen backbone's attention backward takes per-thread fp32 score blocks whatever the batch
(``memory.cpu_attention_workspace``), planned as the backward's transient where it is larger than
the working set.

Phases (the peak of each is resident + the largest of its moments):
- fake score: generator rollout (no grad, ``B``); fake-score forward / backward (trainable);
  its optimizer step.
- generator: rollout; then with the generator's step (trainable) and the fake score (frozen)
  saved: the CFG teacher without grad on ``2B`` (the doubled batch), then the teacher backbone for
  D (frozen) + heads (frozen) + the backward working set (on CPU the heads' backward, with their
  conv workspace, is a moment of its own); its optimizer step.
- DMD (``algorithms/dmd.py``): no discriminator heads and no discriminator phase; its generator phase
  backs through the generator's step alone (the teacher and fake score run without grad).
- DMD2 (``algorithms/dmd2.py``): no discriminator phase; its classifier heads sit on the fake score
  and learn with it in the fake-score phase (the denoising pass and the classifier's on fake and
  real samples: three fake-score passes with grad, the heads on two); its generator phase backs
  through the frozen fake score and heads (the classifier on x̂0), not through the teacher.
- ADP (``algorithms/adp.py``) has no
  fake score and no fake-score phase; its generator phase runs no rollout and no CFG teacher: the
  generator's one forward with grad (trainable) on the ODE pair's interpolation, then the teacher
  backbone for D (frozen) + heads (frozen) + the backward working set, as ADM's; its discriminator
  phase is ADM's (the pair's real latent re-noised and its clean end are the two latents carried).
- discriminator: x_fake's tapped features and the two latents (x_fake, x_real; fp32), kept from the
  generator phase, are resident at its start, one set per micro-batch (the generator phase holds
  those of the micro-batches before the running one, and all at its optimizer step);
  backbone without grad on ``x_real`` (taps kept) + heads on both
  (trainable) + backward; its optimizer step.
- optimizer step: today's optimizer (``train/optimizer.py``) makes a clipped copy of the grads
  ``P x 4`` (when that network's ``grad_clip > 0``) and AdamW's temporaries take ``P x 4`` with the foreach
  implementation (CUDA) or the largest tensor (CPU); a sharded (megatron distributed) optimizer
  clips in place and steps its ``P / DP`` shard.
- BF16 autocast with fp32 params: each network run with grad in the phase keeps bf16 copies of its
  weights for backward, ``P x 2`` (none for bf16 weights, the teacher's included).
- samples (``train.num_samples`` > 0; not a training phase): after an iteration's last phase, with
  every network's weights on the device and that phase's optimizer state; the generator's rollout
  without grad on ``B``, then one sample at a time the VAE's weights and its decode (counted on fake
  tensors, ``memory/sample_decode.py``). A decode that does not fit costs the samples, not the run.

A run fits when the largest phase peak is at most ``card x (1 - margin)``; the margin covers what
the formulas leave out (CUDA context, allocator fragmentation, NCCL buffers, kernels' workspaces).

Host memory, per rank, on top of the process itself (its libraries, CUDA context, data):
- offloaded optimizer states: every offloaded network's optimizer term above (its host buffers are
  made at its first move and kept); with ``optimizer_and_params`` also its weights ``P x w``, when
  some phase of the method does not run it (ADM: each trainable network; ADP: the generator);
- checkpoint staging, while a checkpoint is written (a background one: until its writer is done):
  the rank's share of what megatron-core writes, the generator's and fake score's weights ``P x w``,
  every trainable network's whole optimizer state (moments, fp32 masters) and the generator's EMA,
  split evenly among the ``DP x CP`` ranks that hold them alike (the fully parallel save, about: it
  gives whole tensors to ranks). Offloaded states are counted in it too: megatron-core's staging
  leaves host tensors where they are, but a background save's fork keeps their pages while training
  rewrites them.
A node holds ``min(gpus, gpus per node)`` ranks' worth. ``tests/test_host_memory_plan.py`` measures
both terms on CPU runs.

The fp32 figures are tested against measurement on CPU (``tests/test_memory_plan.py``: CogVideoX
2b / 5b-style and SD3 / SD3.5-style tiny runs, a LoRA generator among them); the BF16
widths and the GPU-only terms (foreach temporaries, autocast copies) are reasoned, not measured here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from adm_megatron.memory.counts import NetworkSize
from adm_megatron.memory.pixel_branch import PixelBranch
from adm_megatron.memory.sample_decode import SampleDecode
from adm_megatron.memory.terms import ActivationTerms, TokenCounts

GIB = 1024**3
NETWORKS = ("teacher", "fake_score", "generator", "discriminator")
TRAINABLE = ("fake_score", "generator", "discriminator")
PHASES = ("fake_score", "generator", "discriminator")
PHASE_NETWORKS = {
    "fake_score": ("generator", "fake_score"),
    "generator": NETWORKS,
    "discriminator": ("teacher", "discriminator"),
}
# the phases each planned method runs, in order (distill.method); ADP builds no fake score
METHOD_PHASES = {"adm": PHASES, "dmd": ("fake_score", "generator"), "dmd2": ("fake_score", "generator"),
                 "adp": ("generator", "discriminator")}
HEADS = ("adm", "dmd2", "adp")  # the methods with discriminator heads (DMD has none: no discriminator phase)
# (method, phase) -> (the networks it runs, those it updates) where not PHASE_NETWORKS and the phase's own:
# DMD2's classifier heads sit on the fake score and learn with it in the fake-score phase
PHASE_OVERRIDES = {("dmd2", "fake_score"): (("generator", "fake_score", "discriminator"),
                                            ("fake_score", "discriminator"))}
READS_PAIRS = ("dmd2", "adp")  # methods whose batches carry teacher ODE pairs (data.real_path)
OFFLOAD = ("none", "optimizer", "optimizer_and_params")  # as optim.<network>.offload
RECOMPUTE = ("none", "selective", "full")  # as model.recompute


def _phase_networks(phase: str, s) -> tuple[str, ...]:
    """The networks ``phase`` runs under ``s.method``."""
    return PHASE_OVERRIDES.get((s.method, phase), (PHASE_NETWORKS[phase],))[0]


def _phase_owners(phase: str, s) -> tuple[str, ...]:
    """The networks ``phase`` updates under ``s.method``."""
    return PHASE_OVERRIDES.get((s.method, phase), (None, (phase,)))[1]


class PlanError(ValueError):
    """A layout or setting the planner refuses: the message is one line naming the key and value."""


@dataclass(frozen=True)
class Shape:
    """What the formulas need of the architecture and the latents."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    text_tokens: int
    text_dim: int
    latent_channels: int
    patch: int
    terms: ActivationTerms  # the family's per-block counts (memory/terms.py)
    frames: int  # 1 for images
    height: int  # latent height
    width: int  # latent width
    taps: int  # discriminator heads (tapped blocks)
    head_kind: str  # the family's discriminator heads: '3d' | '2d'
    head_hidden: int
    head_blocks: int
    pooled_dim: int = 0  # width of the pooled text embedding (SD3), 0 when the family takes none

    @property
    def video_tokens(self) -> int:
        return self.frames * (self.height // self.patch) * (self.width // self.patch)


@dataclass(frozen=True)
class Settings:
    """The layout and the memory settings of a run (one rank's view)."""

    method: str = "adm"  # distill.method: which phases run (METHOD_PHASES)
    tensor_parallel: int = 1
    context_parallel: int = 1
    data_parallel: int = 1
    batch_size: int = 1  # rows of one micro-batch
    microbatches: int = 1  # per update (gradient accumulation: data.global_batch_size)
    sequence_parallel: bool = False
    # a mode for every network and phase (True: full), or ((network, phase, mode), ...) from the config
    recompute: bool | str | tuple = False
    activations: str = "fp32"  # fp32 | bf16 (autocast, as model.dtype=bf16; the teacher then in bf16)
    params: str = "fp32"  # trainable weights: fp32 | bf16 (model.bf16_params: fp32 master in the optimizer)
    grads_fp32: bool = True  # bf16 params' grads accumulated and reduced in fp32 (model.grad_reduce_in_fp32)
    shard_optimizer: frozenset = frozenset()  # trainable networks whose optimizer state is sharded over DP
    # idle networks' state on the CPU: one of OFFLOAD for every trainable network, or ((network, mode), ...)
    offload: str | tuple = "none"
    grad_clip: frozenset = frozenset(TRAINABLE)  # trainable networks whose optimizer step clips (grad_clip > 0)
    device: str = "cuda"  # cuda (foreach AdamW) | cpu
    card_gib: float = 80.0
    margin: float = 0.1  # fraction of the card kept free
    pinned_memory: bool = True  # the host can pin memory (offload needs it)
    cpu_threads: int = 1  # device=cpu only: torch's intra-op threads (per-thread conv workspaces)
    ema: bool = False  # the generator keeps an EMA of its trained weights (train.ema_decay > 0)
    gpus_per_node: int = 8  # ranks sharing one host's memory (at most the world)
    host_gib: float = 0.0  # a node's host memory, to check the host terms against; 0: not checked

    def recompute_mode(self, network: str, phase: str) -> str:
        if isinstance(self.recompute, bool):
            return "full" if self.recompute else "none"
        if isinstance(self.recompute, str):
            return self.recompute
        return {(n, p): m for n, p, m in self.recompute}.get((network, phase), "none")

    def offload_mode(self, network: str) -> str:
        if isinstance(self.offload, str):
            return "none" if network == "teacher" else self.offload
        return dict(self.offload).get(network, "none")

    def offload_modes(self) -> set[str]:
        return {self.offload_mode(n) for n in TRAINABLE}

    def teacher_bf16(self) -> bool:
        return self.activations == "bf16"


@dataclass
class PhasePlan:
    resident: float  # weights + grads + optimizer state on the GPU during the phase
    activations: float  # saved activations at the phase's peak moment
    transients: dict[str, float]  # named working buffers at that moment
    peak: float
    peak_moment: str


@dataclass
class MemoryPlan:
    settings: Settings
    networks: dict[str, dict[str, float]]  # name -> weights / grads / optimizer bytes (GPU-resident)
    phases: dict[str, PhasePlan]
    fixed: dict[str, float] = field(default_factory=dict)  # persistent buffers not owned by a network
    samples: PhasePlan | None = None  # the run's samples between iterations (train.num_samples > 0)
    host: dict[str, float] = field(default_factory=dict)  # host memory of one rank, by term

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: self.phases[p].peak)

    @property
    def peak(self) -> float:
        return self.phases[self.peak_phase].peak

    @property
    def budget(self) -> float:
        return self.settings.card_gib * GIB * (1 - self.settings.margin)

    @property
    def fits(self) -> bool:
        """Whether training fits (the samples, whose decode failing costs only them: ``samples_fit``)."""
        return self.peak <= self.budget

    @property
    def samples_fit(self) -> bool:
        return self.samples is None or self.samples.peak <= self.budget

    @property
    def ranks_per_node(self) -> int:
        s = self.settings
        return min(s.gpus_per_node, s.tensor_parallel * s.context_parallel * s.data_parallel)

    @property
    def host_per_node(self) -> float:
        """Host memory the ranks of one node hold at most (while a checkpoint is written)."""
        return self.ranks_per_node * sum(self.host.values())

    @property
    def host_budget(self) -> float:
        return self.settings.host_gib * GIB * (1 - self.settings.margin)

    @property
    def host_fits(self) -> bool:
        """Whether the host terms fit the node's memory (True when it was not given)."""
        return not self.settings.host_gib or self.host_per_node <= self.host_budget


def check_settings(shape: Shape, s: Settings) -> None:
    """One-line ``PlanError`` for a layout or setting that cannot run or makes no sense."""
    tp, cp, dp = s.tensor_parallel, s.context_parallel, s.data_parallel
    if s.method not in METHOD_PHASES:
        raise PlanError(f"method={s.method!r}: the planner models {', '.join(METHOD_PHASES)} runs")
    for key, value in (("tensor_parallel", tp), ("context_parallel", cp), ("data_parallel", dp),
                       ("batch_size", s.batch_size), ("microbatches", s.microbatches)):
        if value < 1:
            raise PlanError(f"{key}={value}: must be >= 1")
    if shape.heads % tp:
        raise PlanError(f"tensor_parallel={tp}: the {shape.heads} attention heads are not divisible by it")
    if shape.ffn % tp:
        raise PlanError(f"tensor_parallel={tp}: the MLP width {shape.ffn} is not divisible by it")
    if shape.height % shape.patch or shape.width % shape.patch:
        raise PlanError(f"latent {shape.height}x{shape.width}: not divisible by the patch size {shape.patch}")
    if shape.video_tokens % cp:
        raise PlanError(f"context_parallel={cp}: the {shape.video_tokens} latent (image / video) tokens are not divisible by it")
    # the tokens sequence parallelism splits: the joint sequence, or the image tokens alone
    per_cp = (shape.text_tokens if shape.terms.joint_sequence else 0) + shape.video_tokens // cp
    if s.sequence_parallel and tp > 1 and per_cp % tp:
        raise PlanError(f"sequence_parallel: {per_cp} tokens per context-parallel rank are not divisible by "
                        f"tensor_parallel={tp}")
    unknown = set(s.shard_optimizer) - set(TRAINABLE)
    if unknown:
        raise PlanError(f"shard_optimizer={sorted(unknown)}: expected networks among {', '.join(TRAINABLE)}")
    if s.shard_optimizer and dp == 1:
        raise PlanError("shard_optimizer: data_parallel=1 leaves nothing to shard over (needs DP > 1)")
    unknown = s.offload_modes() - set(OFFLOAD)
    if unknown:
        raise PlanError(f"offload={sorted(unknown)}: expected one of {', '.join(OFFLOAD)}")
    offloaded = sorted(n for n in TRAINABLE if s.offload_mode(n) != "none")
    if offloaded and not s.pinned_memory:
        raise PlanError(f"offload of {', '.join(offloaded)}: needs pinned host memory, which this machine cannot "
                        "give (no CUDA); use offload=none, or --assume-pinned-memory to plan for a GPU machine")
    for name in sorted(s.shard_optimizer):
        if s.offload_mode(name) == "optimizer_and_params":
            raise PlanError(f"{name}: offload=optimizer_and_params with a sharded optimizer: the weights of a "
                            "sharded network cannot move (use offload=optimizer)")
    modes = {s.recompute_mode(n, p) for n in ("teacher", "fake_score", "generator") for p in PHASES}
    if modes - set(RECOMPUTE):
        raise PlanError(f"recompute={sorted(modes - set(RECOMPUTE))}: expected one of {', '.join(RECOMPUTE)}")
    for key, value, allowed in (("activations", s.activations, ("fp32", "bf16")),
                                ("params", s.params, ("fp32", "bf16")), ("device", s.device, ("cuda", "cpu"))):
        if value not in allowed:
            raise PlanError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
    if not 0 < s.card_gib < math.inf or not 0 <= s.margin < 1:  # NaN fails the comparisons too
        raise PlanError(f"card={s.card_gib} GiB, margin={s.margin}: expected a finite card > 0 and 0 <= margin < 1")
    if s.gpus_per_node < 1 or not 0 <= s.host_gib < math.inf:
        raise PlanError(f"gpus_per_node={s.gpus_per_node}, host={s.host_gib} GiB: expected at least one GPU per "
                        "node and a finite host memory >= 0 (0: not checked)")


class _Formulas:
    """The formulas of the module docstring for one shape and one set of settings."""

    def __init__(self, shape: Shape, s: Settings):
        self.shape, self.s, self.terms = shape, s, shape.terms
        tp, cp = s.tensor_parallel, s.context_parallel
        sp = s.sequence_parallel and tp > 1
        self.image_tokens = shape.video_tokens // cp  # this CP rank's image / video tokens
        self.tokens = shape.text_tokens + self.image_tokens  # s
        # rows one rank holds between the parallel linears, per stream (s_seq in all)
        self.image_rows = self.image_tokens / tp if sp else self.image_tokens
        self.text_rows = shape.text_tokens / tp if sp and self.terms.joint_sequence else shape.text_tokens
        self.seq = self.image_rows + self.text_rows
        self.e = 2 if s.activations == "bf16" else 4
        # under BF16 autocast, norm outputs stay fp32, and so does the residual stream when an fp32
        # position table is added to the embeddings; everything else is bf16
        self.norm_e = 4
        self.residual_e = 4 if self.terms.residual_fp32 else self.e
        self.gathers_taps = sp or cp > 1

    def _stream(self, counts: TokenCounts, rows: float, tokens: float) -> float:
        """Bytes one block keeps for one sample's stream of ``tokens`` (``rows`` on this rank)."""
        tp, h = self.s.tensor_parallel, self.shape.hidden
        row_bytes = counts.residual * self.residual_e + counts.norm * self.norm_e + counts.act * self.e
        return (row_bytes * rows * h + counts.split * tokens * h / tp * self.e
                + (counts.stats + counts.head_stats * self.shape.heads / tp) * tokens * 4)

    def _block(self, block, kind: str, batch: int) -> float:
        sh, s = self.shape, self.s
        total = (self._stream(block.image[kind], self.image_rows, self.image_tokens)
                 + self._stream(block.text[kind], self.text_rows, sh.text_tokens))
        if s.context_parallel > 1:  # the gathered image keys and values
            total += 2 * (sh.video_tokens - self.image_tokens) * sh.hidden / s.tensor_parallel * self.e
        return total * batch

    def saved(self, batch: int, kind: str, recompute: str = "none") -> tuple[float, float]:
        """Activations one forward with grad of a backbone (``kind`` trainable | frozen) keeps for
        backward with its ``recompute`` mode, and what its backward brings back on top (one
        recomputed block, or nothing)."""
        sh = self.shape
        row = batch * self.seq * sh.hidden  # s_seq B h
        blocks = [self._block(block, kind, batch) for block in self.terms.blocks]
        # the last block's output (the final norm's input), its norm output and modulation: the
        # joint sequence, or the image stream (the text stream ends in the last block)
        final = row if self.terms.joint_sequence else batch * self.image_rows * sh.hidden
        once = self.residual_e * final
        if kind == "trainable":
            once += (self.norm_e + self.e) * final + batch * sh.text_tokens * sh.text_dim * self.e
        once += batch * sh.video_tokens * sh.patch**2 * sh.latent_channels * self.e
        if recompute == "full":  # block inputs kept; one block's activations come back in its backward
            return (sh.layers * self.residual_e * row + once, max(blocks))
        return (sum(blocks) + once, 0.0)

    def no_grad(self, batch: int) -> float:
        """The working set of one backbone forward without grad."""
        sh, s, work = self.shape, self.s, self.terms.no_grad
        tp, h = s.tensor_parallel, sh.hidden
        total = sum((work[stream].act * rows + work[stream].split * tokens / tp) * h * batch * self.e
                    for stream, rows, tokens in (("image", self.image_rows, self.image_tokens),
                                                 ("text", self.text_rows, sh.text_tokens)))
        if s.context_parallel > 1:
            total += 2 * sh.video_tokens * h / tp * batch * self.e
        return total

    def extra(self, batch: int, kind: str) -> float:
        """A backbone backward's working set on top of what is saved."""
        return self.terms.backward[kind] * self.tokens * self.shape.hidden / self.s.tensor_parallel * batch * self.e

    def taps(self, batch: int, saved_with_grad: bool) -> float:
        """Tapped block outputs beyond what the backbone's forward saves anyway."""
        sh = self.shape
        if self.gathers_taps:
            return sh.taps * sh.video_tokens * sh.hidden * batch * self.e
        rows = self.seq if self.terms.joint_sequence else self.image_rows  # what a tap's view holds
        return 0.0 if saved_with_grad else sh.taps * rows * sh.hidden * batch * self.e

    def _head_sizes(self):
        """(input, output) pixels of each head block (sizes as the head kind's ``out_size``)."""
        from adm_megatron.heads.head2d import DownBlock2D
        from adm_megatron.heads.head3d import DownBlock3D

        sh = self.shape
        out_size = (DownBlock3D if sh.head_kind == "3d" else DownBlock2D).out_size
        t, hh, ww = sh.frames, sh.height // sh.patch, sh.width // sh.patch
        for _ in range(sh.head_blocks):
            h2, w2 = out_size(hh), out_size(ww)
            yield t * hh * ww, t * h2 * w2
            hh, ww = h2, w2

    def conv_workspace(self, batch: int, kind: str, head_params: int = 0) -> float:
        """CPU only: the transient buffers of the heads' first conv, ``kind`` trainable (its backward
        to the weights, the discriminator phase) or frozen (its forward and backward into the
        features, the generator phase), measured on this CPU at the run's shapes
        (``memory.cpu_conv_workspace``: an im2col buffer of the unfolded input or not, by the batch
        and the instruction set), and per-thread weight-grad buffers of trainable heads (``threads
        x P x 4``, measured on CPU runs); cuDNN's workspace on a GPU is left to the margin."""
        if self.s.device != "cpu":
            return 0.0
        from adm_megatron.memory.cpu_conv_workspace import conv_workspace

        sh = self.shape
        hh, ww = sh.height // sh.patch, sh.width // sh.patch
        size = (sh.frames, hh, ww) if sh.head_kind == "3d" else (hh, ww)
        grad = "weights" if kind == "trainable" else "input"
        first = conv_workspace(sh.head_kind, sh.hidden, sh.head_hidden, batch, size, self.s.cpu_threads, grad)
        return float(first + self.s.cpu_threads * head_params * 4)

    def attention_backward(self, batch: int) -> float:
        """CPU only: what one attention backward allocates, its gradients and its kernel's per-thread
        buffers (``memory.cpu_attention_workspace``, measured at the run's shapes: this CP rank's
        queries over every key, the heads of a TP rank)."""
        if self.s.device != "cpu":
            return 0.0
        from adm_megatron.memory.cpu_attention_workspace import attention_backward_workspace

        sh, s = self.shape, self.s
        return float(attention_backward_workspace(batch, sh.heads // s.tensor_parallel, self.tokens,
                                                  sh.text_tokens + sh.video_tokens, sh.hidden // sh.heads,
                                                  s.cpu_threads))

    def backward(self, batch: int, kind: str) -> dict[str, float]:
        """A backbone backward's transients on top of what is saved, at its peak: its working set,
        or for a frozen backbone on a CPU its attention backward where that is larger (the two are
        not alive together). A trainable block has freed its MLP's saved activations by its
        attention's backward (CogVideoX: 9 split + 3 rows a token, measured 2.6 MiB at 3x48x48
        against a 2.1 MiB attention backward), which the counts do not split out: its attention
        backward is left to the working set."""
        points = {"backward working set": self.extra(batch, kind)}
        if kind == "frozen":
            points["attention backward"] = self.attention_backward(batch)
        peak = max(points, key=points.get)
        return {peak: points[peak]}

    def heads(self, batch: int, kind: str) -> float:
        """Activations the discriminator heads save. 3D: trainable ``c (T H W + 3 T H2 W2)`` (conv3d
        out, conv2d out, norm out, SiLU out), frozen ``2 c T H2 W2``; 2D: trainable ``3 c H2 W2``
        (conv out, norm out, SiLU out), frozen ``2 c H2 W2``; per block, head and sample."""
        sh = self.shape
        total = 0.0
        for full, half in self._head_sizes():
            if kind != "trainable":
                total += 2 * half
            else:
                total += (full if self.shape.head_kind == "3d" else 0) + 3 * half
        return sh.taps * sh.head_hidden * total * batch * self.e


def _weight_bytes(name: str, s: Settings) -> int:
    if name == "teacher":
        return 2 if s.teacher_bf16() else 4
    return 2 if s.params == "bf16" else 4


def _resident(sizes: dict[str, NetworkSize], s: Settings) -> dict[str, dict[str, float]]:
    out = {}
    for name in (n for n in NETWORKS if n in sizes):  # the networks the method builds
        size = sizes[name]
        w = _weight_bytes(name, s)
        weights = size.params * w + size.buffer_bytes
        if name == "teacher":
            out[name] = {"weights": weights, "grads": 0.0, "optimizer": 0.0}
            continue
        state = size.trained * (8 + (4 if s.params == "bf16" else 0))
        if name in s.shard_optimizer:
            state /= s.data_parallel
        grads = size.trained * (4.0 if s.params == "fp32" or s.grads_fp32 else 2.0)
        out[name] = {"weights": weights, "grads": grads, "optimizer": state}
    return out


def _host(sizes: dict[str, NetworkSize], networks: dict[str, dict[str, float]], s: Settings) -> dict[str, float]:
    """Host memory one rank holds (module docstring), by term."""
    trained = [n for n in TRAINABLE if n in networks]
    phases = METHOD_PHASES[s.method]
    moved = [n for n in trained if s.offload_mode(n) == "optimizer_and_params"
             and any(n not in _phase_networks(p, s) for p in phases)]
    written = sum(sizes[n].params * _weight_bytes(n, s) for n in ("generator", "fake_score") if n in networks)
    written += sum(sizes[n].trained * (8 + (4 if s.params == "bf16" else 0)) for n in trained)
    written += sizes["generator"].trained * 4 if s.ema else 0
    return {
        "offloaded optimizer states": sum(networks[n]["optimizer"] for n in trained if s.offload_mode(n) != "none"),
        "offloaded weights": sum(sizes[n].params * _weight_bytes(n, s) for n in moved),
        "checkpoint staging": written / (s.data_parallel * s.context_parallel),
    }


def _phase_resident(networks: dict, phase: str, s: Settings) -> float:
    """A phase's resident state; ``samples``: after an iteration's last phase, with every network's
    weights back on the device (the trainer restores them) and that phase's optimizer state."""
    owners = _phase_owners(METHOD_PHASES[s.method][-1] if phase == "samples" else phase, s)
    total = 0.0
    for name, parts in networks.items():
        used = phase == "samples" or name in _phase_networks(phase, s)
        offload = s.offload_mode(name)
        if offload != "optimizer_and_params" or used:
            total += parts["weights"]
        if offload == "none" or name in owners:
            total += parts["grads"] + parts["optimizer"]
    return total


def _step(size: NetworkSize, name: str, s: Settings) -> float:
    if name in s.shard_optimizer:  # megatron's distributed optimizer: in-place clipping, its shard
        return size.trained / s.data_parallel * 4
    temporaries = size.trained * 4 if s.device == "cuda" else min(size.largest_param, size.trained) * 4
    # the clipped copy of the grads, or bf16 grads cast for the fp32 step
    fp32_grads = name in s.grad_clip or (s.params == "bf16" and not s.grads_fp32)
    return (size.trained * 4 if fp32_grads else 0.0) + temporaries


def _moments(f: _Formulas, sizes: dict[str, NetworkSize], phase: str) -> dict[str, tuple[float, dict]]:
    """Each moment of a phase: (saved activations, {transient name: bytes})."""
    s, b = f.s, f.s.batch_size
    copies = 2 if s.activations == "bf16" and s.params == "fp32" else 0  # autocast weight copies
    teacher_copies = 2 if s.activations == "bf16" and not s.teacher_bf16() else 0
    step = {"optimizer step": _step(sizes[phase], phase, s)}
    mode = s.recompute_mode
    if phase == "fake_score" and s.method == "dmd2":  # the denoising loss, then the classifier on fake and real
        saved, recomputed = f.saved(b, "trainable", mode("fake_score", phase))
        disc = sizes["discriminator"]
        steps = {n: _step(sizes[n], n, s) for n in ("fake_score", "discriminator")}
        return {
            "generator rollout": (0.0, {"forward without grad": f.no_grad(b)}),
            "fake-score backward": (3 * (saved + recomputed) + 2 * (f.taps(b, True) + f.heads(b, "trainable")), {
                **f.backward(b, "trainable"),
                "conv workspace": f.conv_workspace(b, "trainable", disc.params),
                "autocast weight copies": copies * (sizes["fake_score"].params + disc.params)}),
            "optimizer step": (0.0, {"optimizer step": max(steps.values())}),
        }
    if phase == "fake_score":
        saved, recomputed = f.saved(b, "trainable", mode("fake_score", phase))
        return {
            "generator rollout": (0.0, {"forward without grad": f.no_grad(b)}),
            "fake-score backward": (saved + recomputed, {
                **f.backward(b, "trainable"),
                "autocast weight copies": copies * sizes["fake_score"].params}),
            "optimizer step": (0.0, step),
        }
    if phase == "generator" and s.method == "adp":  # one generator forward, then D on its sample
        g_saved, _ = f.saved(b, "trainable", mode("generator", phase))
        backbone_saved, backbone_recomputed = f.saved(b, "frozen", mode("teacher", phase))
        autocast = (copies * (sizes["generator"].params + sizes["discriminator"].params)
                    + teacher_copies * sizes["teacher"].params)
        return {**_through_frozen_heads(f, g_saved + backbone_saved + backbone_recomputed + f.taps(b, True)
                                        + f.heads(b, "frozen"), autocast, "discriminator backward"),
                "optimizer step": (0.0, step)}
    if phase == "generator" and s.method in ("dmd", "dmd2"):
        return _dmd_generator_moments(f, sizes, step, copies, teacher_copies)
    if phase == "generator":
        g_saved, _ = f.saved(b, "trainable", mode("generator", phase))
        fake_saved, _ = f.saved(b, "frozen", mode("fake_score", phase))
        backbone_saved, backbone_recomputed = f.saved(b, "frozen", mode("teacher", phase))
        g_f = g_saved + fake_saved
        autocast = copies * (sizes["generator"].params + sizes["fake_score"].params)
        disc = backbone_saved + backbone_recomputed + f.taps(b, True) + f.heads(b, "frozen")
        return {
            "generator rollout": (0.0, {"forward without grad": f.no_grad(b)}),
            "CFG teacher": (g_f, {"CFG doubled batch": f.no_grad(2 * b), "autocast weight copies": autocast}),
            **_through_frozen_heads(f, g_f + disc, autocast + teacher_copies * sizes["teacher"].params
                                    + copies * sizes["discriminator"].params, "discriminator backward"),
            "optimizer step": (0.0, step),
        }
    taps, heads = f.taps(b, False), f.heads(b, "trainable")  # x_fake's taps are resident (carried)
    return {
        "backbone on x_real": (heads, {"forward without grad": f.no_grad(b)}),
        "heads backward": (taps + 2 * heads, {"conv workspace": f.conv_workspace(b, "trainable",
                                                                                 sizes["discriminator"].params),
                                              "autocast weight copies": copies * sizes["discriminator"].params}),
        "optimizer step": (0.0, step),
    }


def _dmd_generator_moments(f: _Formulas, sizes: dict[str, NetworkSize], step: dict, copies: int,
                           teacher_copies: int) -> dict[str, tuple[float, dict]]:
    """DMD's and DMD2's generator phase: the rollout, the CFG teacher without grad, then the backward:
    DMD's through the generator's step alone (its gradient needs no grad through the teacher or the
    fake score), DMD2's through the frozen fake score and heads of its classifier on x̂0 as well."""
    s, b = f.s, f.s.batch_size
    g_saved, _ = f.saved(b, "trainable", s.recompute_mode("generator", "generator"))
    autocast = copies * sizes["generator"].params
    moments = {
        "generator rollout": (0.0, {"forward without grad": f.no_grad(b)}),
        "CFG teacher": (g_saved, {"CFG doubled batch": f.no_grad(2 * b),
                                  "autocast weight copies": autocast + teacher_copies * sizes["teacher"].params}),
    }
    if s.method == "dmd2":
        backbone_saved, backbone_recomputed = f.saved(b, "frozen", s.recompute_mode("fake_score", "generator"))
        moments.update(_through_frozen_heads(
            f, g_saved + backbone_saved + backbone_recomputed + f.taps(b, True) + f.heads(b, "frozen"),
            autocast + copies * (sizes["fake_score"].params + sizes["discriminator"].params), "classifier backward"))
    else:
        moments["generator backward"] = (g_saved, {**f.backward(b, "trainable"), "autocast weight copies": autocast})
    moments["optimizer step"] = (0.0, step)
    return moments


def _through_frozen_heads(f: _Formulas, saved: float, autocast: float, backward: str) -> dict[str, tuple[float, dict]]:
    """A loss on frozen heads backed through the backbone under them, with ``saved`` activations: the
    heads' backward into their features (on a CPU their first conv's workspace, which its forward
    takes too), then the backbone's (``backward``: the moment's name)."""
    b = f.s.batch_size
    return {"heads backward": (saved, {"conv workspace": f.conv_workspace(b, "frozen"),
                                       "autocast weight copies": autocast}),
            backward: (saved, {**f.backward(b, "frozen"), "autocast weight copies": autocast})}


# where ADP's pixel work adds to a phase: after the latent discriminator's forward, before the backward
PIXEL_MOMENTS = {
    "generator": dict.fromkeys(("heads backward", "discriminator backward"), lambda p: p.generator_peak),
    "discriminator": {"heads backward": lambda p: p.discriminator_peak},
}


def plan_memory(shape: Shape, sizes: dict[str, NetworkSize], settings: Settings,
                pixel: PixelBranch | None = None, sample_decode: SampleDecode | None = None) -> MemoryPlan:
    """The per-rank memory plan; ``sizes`` as ``counts.py`` gives them for ``settings``' TP (the
    discriminator's with ADP's pixel heads); ``pixel``: ADP's pixel branch, counted on fake tensors
    (``memory/pixel_branch.py``), added to the latent plan where it runs; ``sample_decode``: the
    run's samples' VAE decode (``memory/sample_decode.py``), planned after the last phase."""
    check_settings(shape, settings)
    f = _Formulas(shape, settings)
    latent = shape.frames * shape.latent_channels * shape.height * shape.width
    networks = _resident(sizes, settings)
    text = 2 * (shape.text_tokens * shape.text_dim + shape.pooled_dim)  # prompts and negatives
    rows = settings.batch_size * settings.microbatches  # every micro-batch's inputs are made up front
    fixed = {"run inputs": rows * (text + latent) * 4}
    if settings.method in READS_PAIRS:  # a batch of teacher ODE pairs: x_T, x_0 and their prompts
        fixed["ODE pairs"] = rows * (shape.text_tokens * shape.text_dim + shape.pooled_dim + 2 * latent) * 4
    if settings.sequence_parallel and settings.tensor_parallel > 1:
        fixed["SP all-gather buffer"] = f.tokens * settings.batch_size * shape.hidden * f.e
    if settings.ema:
        fixed["generator EMA (fp32)"] = sizes["generator"].trained * 4
    if pixel is not None:
        fixed["pixel backbone (VAE, vision encoder)"] = pixel.backbone_bytes
    # a micro-batch's generator phase keeps x_fake's features (reused by the discriminator phase, not
    # recomputed: the tapped blocks' outputs and ADP's pixel encoder features) and the two latents
    # (x_fake, x_real; fp32): the discriminator phase starts with every micro-batch's; in the
    # generator phase those of the micro-batches before the running one are kept, and all of them
    # at its optimizer step
    carried = {"kept x_fake / x_real latents": 2 * settings.batch_size * latent * 4,
               "kept x_fake features": f.taps(settings.batch_size, False)
               + (pixel.held_features if pixel is not None else 0)}
    phases = {}
    for phase in METHOD_PHASES[settings.method]:
        resident = _phase_resident(networks, phase, settings) + sum(fixed.values())
        keeps_pairs = phase == "generator" and "discriminator" in METHOD_PHASES[settings.method]
        if phase == "discriminator":
            resident += settings.microbatches * sum(carried.values())
        best = None
        for moment, (saved, transients) in _moments(f, sizes, phase).items():
            if keeps_pairs:
                kept = settings.microbatches if moment == "optimizer step" else settings.microbatches - 1
                transients = {**transients, **{name: kept * size for name, size in carried.items()}}
            if pixel is not None and moment in PIXEL_MOMENTS.get(phase, ()):
                transients = {**transients, "pixel branch": PIXEL_MOMENTS[phase][moment](pixel)}
            total = resident + saved + sum(transients.values())
            if best is None or total > best.peak:
                best = PhasePlan(resident, saved, {k: v for k, v in transients.items() if v}, total, moment)
        phases[phase] = best
    samples = None
    if sample_decode is not None:  # the generator's N-step rollout, then one sample's decode at a time
        resident = _phase_resident(networks, "samples", settings) + sum(fixed.values())
        moments = {"generator rollout": {"forward without grad": f.no_grad(settings.batch_size)},
                   "VAE decode": {"VAE weights": sample_decode.vae_bytes,
                                  "decode and postprocess": sample_decode.decode_peak}}
        moment = max(moments, key=lambda m: sum(moments[m].values()))
        samples = PhasePlan(resident, 0.0, moments[moment], resident + sum(moments[moment].values()), moment)
    return MemoryPlan(settings, networks, phases, fixed, samples, _host(sizes, networks, settings))


def gib(value: float) -> float:
    return value / GIB

