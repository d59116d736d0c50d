"""Two-stage BPTT training of HMT (spec "Training"), single process or DDP under torchrun.

One plain loop: each step draws a global batch of windows (``S`` segments of ``Ls`` tokens from one document),
runs the teacher-forced forward through every segment and the memory cache (no detach), takes the cross-entropy
of the last segment, and makes one AdamW step with gradient clipping and a step-decayed learning rate.
Stage 1 (``stage1_steps``) runs 2-segment windows without recall; stage 2 (``stage2_steps``) runs
``stage2_segments``-segment windows with recall on.

Checkpoints (``<output_dir>/checkpoint``, every ``checkpoint_every`` steps and at the end) hold the model
(``model/``, as ``HMTModel.save_pretrained`` writes it) and ``trainer_state.pt`` (trainable tensors, optimizer,
scheduler, RNG states, data position, step).  They are written beside the target and swapped in, so a run that
fails never damages an existing checkpoint; ``resume=True`` continues exactly where the checkpoint stopped.

    hmt train data/austen/emma.txt data/austen/prideprejudice.txt --output-dir runs/hmt --mode lora --precision bf16
    torchrun --nproc_per_node=2 -m hmt_runtime.train data/austen/emma.txt --output-dir runs/ddp --batch-size 4

Over 500 lines: the config, the two-stage loop, checkpoints and the command share TrainConfig and the
training state.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import retrieval
from ..core.config import MEMORY_READS, MEMORY_SCALES, SAVED_DEFAULTS, HMTConfig
from .data import Windows, WindowSampler, as_documents, tokenize_files
from ..core.atomic import recover, staged_dir
from ..model.hmt import HMTModel
from ..model.loading import DEFAULT_BACKBONE, load_backbone
from ..core.segment import LOSS_ON
from .objective import LastSegmentLoss, segment_checkpointing, teacher_topk

MODES = ("full", "frozen", "lora")
PRECISIONS = ("fp32", "bf16")
LORA_TARGETS = ("attention", "all")
_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj", "out_proj")
_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3")
CHECKPOINT_DIR = "checkpoint"
FINAL_DIR = "final"
STATE_NAME = "trainer_state.pt"
MODEL_DIR = "model"
STATE_FORMAT = "hmt-trainer-state"
CHECKPOINT_ENTRIES = (MODEL_DIR, STATE_NAME)  # what a training checkpoint folder holds


@dataclass
class TrainConfig:
    """Everything a training run depends on (recorded in its checkpoints).

    data: text files or folders (ignored when ``train`` is given token ids).  backbone: ``load_backbone`` name or
    folder.  window / sensory_tokens / memory_slots / recall_dim / recall: the HMT config
    (``HMTConfig.from_window``).  mode: "full" (every weight), "frozen" (HMT parameters only) or "lora" (HMT
    parameters + a LoRA adapter of rank ``lora_rank`` on the attention projections).  batch_size: the global
    batch (split over DDP ranks).  lr decays by ``lr_gamma`` every ``lr_step`` steps.  precision: "fp32" or
    "bf16" (autocast; the weights stay fp32).  grad_checkpointing: recompute each backbone pass of a segment in
    the backward pass instead of keeping its activations.  init_from: an HMT checkpoint folder (or "default")
    whose T, M_init, W_q, W_k and adapter the run starts from (its HMT config must match).  loss_on:
    "last_segment" (the paper's loss) or "after_first" (every segment but the first, each of which reads memory).
    distill_weight: weight of the distillation term, the KL divergence from the backbone's own predictions with
    the whole window as context (adapter off, top ``distill_top_k`` tokens) to HMT's, on the scored positions.
    hmt_lr_scale: learning-rate multiplier of the recall projections W_q and W_k against the other parameters.
    recall_init_scale: W_q and W_k are multiplied by this before training starts (a resumed run then loads its
    checkpoint's values): recall scores scale with its square, so a value below 1 takes a saturated softmax
    (one-hot weights, zero gradients; docs/training.md) back to a trainable range.
    recall_max_norm: a cap c on the spectral norm (largest singular value) of W_q and of W_k, applied before
    training and after every optimizer step (None: no cap).  It bounds every recall score by
    c^2 |S_n| |C_i| / sqrt(d_h), so the softmax cannot saturate and always passes gradient; the recall formula
    and the saved weights are unchanged (a constraint on training, not a change of the model).
    prompt_recall: the HMT config's rule (docs/spec.md "Recall at the end of a prompt"); a run started from a
    checkpoint sets it on that checkpoint's config.
    replay: slots replayed at the end of a prompt (docs/spec.md "Replay at the end of a prompt"; it turns
    ``prompt_recall`` on); None keeps a checkpoint's own (``init_from``) and means 0 for a new model.
    memory_scale: the HMT config's ``memory_scale`` ("hidden" or "input", docs/spec.md "Memory at the input
    scale"); None keeps a checkpoint's own (``init_from``) and means "hidden" for a new model.  A run that sets
    "input" on a "hidden" checkpoint starts the memory gain at the token embeddings' RMS.  memory_read: the
    same for ``memory_read`` ("direct" or "sink", docs/spec.md "Reading memory at the attention sink").
    retrieval_every: every n-th step of stage 2 is a batch of retrieval prompts (``hmt_runtime.training.retrieval``,
    ``split="train"``: a needle in segment-long haystacks of the training text, the question at the end, the
    loss on the answer only), the others language modelling (0: never).  retrieval_segments: such a prompt
    spans 2 to this many segments (drawn per step), so the answer is only in memory.  retrieval_tasks: the
    tasks drawn from (``retrieval.TASKS``); retrieval_tail: at most this many prompt ids in such a prompt's last
    segment (None: up to the segment's length; fewer make cheaper steps).  detach_memory: the segments before
    the scored ones run without gradient, so only the read side trains (``LastSegmentLoss``), at about half the
    cost of a step.  retrieval_distill: weight of a distillation term on the retrieval batches too (the
    backbone's full-window predictions over the scored segments' prompt and answer, as ``distill_weight`` does on
    language modelling; 0 = off): the backbone, which sees the needle, predicts the answer as well, and the prose
    around it holds the adapter to the backbone's language modelling where retrieval alone would not.
    lora_targets: "attention" (q/k/v/o projections) or "all" (also the MLP's projections).  A model started
    from a checkpoint whose adapter covers only the attention keeps those weights; the new MLP adapters start
    at zero (LoRA's B = 0), so the run starts from exactly the checkpoint's function.
    """

    data: list[str] = field(default_factory=list)
    output_dir: str = "runs/hmt"
    backbone: str = DEFAULT_BACKBONE
    window: int = 256
    sensory_tokens: int = 32
    memory_slots: int = 300
    recall_dim: int = 1536
    recall: str = "causal"  # the shipped model's mode; deliberately not HMTConfig's default ("paper")
    mode: str = "lora"
    lora_rank: int = 8
    warm_start: bool = True
    stage1_steps: int = 100
    stage2_steps: int = 200
    stage1_segments: int = 2
    stage2_segments: int = 4
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_step: int = 100
    lr_gamma: float = 0.9
    grad_clip: float = 1.0
    grad_checkpointing: bool = False
    precision: str = "fp32"
    checkpoint_every: int = 20
    seed: int = 0
    threads: int | None = None
    init_from: str | None = None
    loss_on: str = "last_segment"
    distill_weight: float = 0.0
    distill_top_k: int = 64
    hmt_lr_scale: float = 1.0
    recall_init_scale: float = 1.0
    recall_max_norm: float | None = None
    lora_targets: str = "attention"
    prompt_recall: bool = False
    replay: int | None = None
    memory_scale: str | None = None
    memory_read: str | None = None
    memory_read_gain: float | None = None
    center_memory_read: bool = False
    probe_every: int = 0
    retrieval_every: int = 0
    retrieval_segments: int = 3
    retrieval_tasks: list[str] = field(default_factory=lambda: list(retrieval.TASKS))
    retrieval_tail: int | None = None
    detach_memory: bool = False
    retrieval_distill: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: expected one of {MODES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: expected one of {PRECISIONS}")
        for name, minimum in (("stage1_steps", 0), ("stage2_steps", 0), ("stage1_segments", 1),
                              ("stage2_segments", 1), ("batch_size", 1), ("lr_step", 1), ("lora_rank", 1),
                              ("checkpoint_every", 1), ("retrieval_every", 0), ("retrieval_segments", 2),
                              ("probe_every", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")
        if self.stage1_steps + self.stage2_steps < 1:
            raise ValueError("stage1_steps + stage2_steps = 0: expected at least one training step")
        for name in ("lr", "lr_gamma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a number > 0")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on={self.loss_on!r}: expected one of {LOSS_ON}")
        if not self.distill_weight >= 0:
            raise ValueError(f"distill_weight={self.distill_weight!r}: expected a number >= 0 (0 = off)")
        if isinstance(self.distill_top_k, bool) or not isinstance(self.distill_top_k, int) or self.distill_top_k < 1:
            raise ValueError(f"distill_top_k={self.distill_top_k!r}: expected an integer >= 1")
        if not self.recall_init_scale > 0:
            raise ValueError(f"recall_init_scale={self.recall_init_scale!r}: expected a number > 0")
        if self.recall_max_norm is not None and (isinstance(self.recall_max_norm, bool)
                                                 or not self.recall_max_norm > 0):
            raise ValueError(f"recall_max_norm={self.recall_max_norm!r}: expected a number > 0 or None (no cap)")
        if self.lora_targets not in LORA_TARGETS:
            raise ValueError(f"lora_targets={self.lora_targets!r}: expected one of {LORA_TARGETS}")
        if not self.retrieval_tasks or any(t not in retrieval.TASKS for t in self.retrieval_tasks):
            raise ValueError(f"retrieval_tasks={self.retrieval_tasks!r}: expected one or more of {retrieval.TASKS}")
        if self.retrieval_tail is not None and (isinstance(self.retrieval_tail, bool)
                                                or not isinstance(self.retrieval_tail, int) or self.retrieval_tail < 24):
            raise ValueError(f"retrieval_tail={self.retrieval_tail!r}: expected an integer >= 24 or None")
        if not isinstance(self.detach_memory, bool):
            raise ValueError(f"detach_memory={self.detach_memory!r}: expected True or False")
        if not self.retrieval_distill >= 0:
            raise ValueError(f"retrieval_distill={self.retrieval_distill!r}: expected a number >= 0 (0 = off)")
        if not isinstance(self.prompt_recall, bool):
            raise ValueError(f"prompt_recall={self.prompt_recall!r}: expected True or False")
        if self.replay is not None and (isinstance(self.replay, bool) or not isinstance(self.replay, int)
                                        or self.replay < 0):
            raise ValueError(f"replay={self.replay!r}: expected an integer >= 0 or None")
        if self.memory_read is not None and self.memory_read not in MEMORY_READS:
            raise ValueError(f"memory_read={self.memory_read!r}: expected one of {MEMORY_READS} or None")
        if self.memory_read_gain is not None:
            if self.memory_read not in ("sink", "broadcast"):
                raise ValueError(f"memory_read_gain={self.memory_read_gain!r} needs memory_read 'sink' or 'broadcast', got "
                                 f"memory_read={self.memory_read!r}")
            if isinstance(self.memory_read_gain, bool) or not self.memory_read_gain > 0:
                raise ValueError(f"memory_read_gain={self.memory_read_gain!r}: expected a number > 0")
        if self.center_memory_read and self.memory_read != "broadcast":
            raise ValueError(f"center_memory_read=True needs memory_read='broadcast', got memory_read={self.memory_read!r}")
        if self.memory_scale is not None and self.memory_scale not in MEMORY_SCALES:
            raise ValueError(f"memory_scale={self.memory_scale!r}: expected one of {MEMORY_SCALES} or None")
        if not self.hmt_lr_scale > 0:
            raise ValueError(f"hmt_lr_scale={self.hmt_lr_scale!r}: expected a number > 0")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip={self.grad_clip!r}: expected a number >= 0 (0 = no clipping)")
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [str(self.data)]

    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps

    def hmt_config(self) -> HMTConfig:
        return HMTConfig.from_window(self.window, sensory_tokens=self.sensory_tokens, memory_slots=self.memory_slots,
                                     recall_dim=self.recall_dim, recall=self.recall, kernels="auto",
                                     prompt_recall=self.prompt_recall or bool(self.replay),
                                     replay=self.replay or 0, memory_scale=self.memory_scale or "hidden",
                                     memory_read=self.memory_read or "direct")


# --------------------------------------------------------------------------------------------- model set-up
def apply_mode(model: HMTModel, mode: str, lora_rank: int = 8, lora_targets: str = "attention") -> HMTModel:
    """Make the parameters of ``mode`` trainable: "full" all, "frozen" the HMT ones, "lora" the HMT ones and a
    LoRA adapter (rank ``lora_rank``, alpha 2 x rank) on the attention projections, and with
    ``lora_targets="all"`` on the MLP's projections too.  A backbone without an adapter gets one; one whose
    adapter lacks some of the targets gets a new adapter over all of them that keeps the old weights (the added
    ones start at zero: the function is unchanged)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    if lora_targets not in LORA_TARGETS:
        raise ValueError(f"lora_targets={lora_targets!r}: expected one of {LORA_TARGETS}")
    if mode == "lora":
        _ensure_lora(model, lora_rank, lora_targets)
    for name, param in model.backbone.named_parameters():
        param.requires_grad_(mode == "full" or (mode == "lora" and "lora_" in name))
    for param in model.hmt_parameters():
        param.requires_grad_(True)
    return model


def _ensure_lora(model: HMTModel, lora_rank: int, lora_targets: str) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    backbone = model.backbone
    old = getattr(backbone, "peft_config", None)
    base = backbone.get_base_model() if old is not None else backbone
    wanted = _ATTENTION_PROJECTIONS + (_MLP_PROJECTIONS if lora_targets == "all" else ())
    names = [name for name, module in base.named_modules() if isinstance(module, nn.Linear) or hasattr(module, "base_layer")]
    targets = [t for t in wanted if any(name.endswith("." + t) for name in names)]
    if not targets:
        raise ValueError("mode='lora': found no attention projection (q_proj/k_proj/v_proj/o_proj) to adapt")
    if old is not None:
        have = set(old["default"].target_modules or ()) if "default" in old else set()
        if set(targets) <= have:
            return
        if old["default"].r != lora_rank:
            raise ValueError(f"lora_rank={lora_rank}: the model's adapter has rank {old['default'].r}; extending it "
                             "to more targets needs the same rank")
        kept = {k: v.detach().clone() for k, v in get_peft_model_state_dict(backbone).items()}
        source = getattr(backbone, "hmt_source", None)
        base = backbone.base_model.unload()  # the base model without the adapter layers (not merged)
    else:
        kept, source = None, getattr(backbone, "hmt_source", None)
    lora = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=targets)
    model.backbone = get_peft_model(base, lora)
    model.backbone.hmt_source = source
    if kept is not None:
        result = set_peft_model_state_dict(model.backbone, kept)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"extending the LoRA adapter: {len(result.unexpected_keys)} of its weights found no "
                             f"place (e.g. {result.unexpected_keys[0]})")


def build_model(config: TrainConfig) -> HMTModel:
    """Load the backbone, wrap it in HMT (warm-started from BOS when asked) and apply the training mode."""
    if config.init_from:
        model = _scale_recall(HMTModel.from_pretrained(config.init_from, weights="fp32"), config.recall_init_scale)
        ours, theirs = config.hmt_config().to_dict(), model.config.to_dict()
        # recall_scale has no training option: the checkpoint's own is kept; prompt_recall is this run's
        diff = {k: (theirs.get(k), v) for k, v in ours.items()
                if k not in ("kernels", "recall_scale", "prompt_recall", "memory_scale", "memory_read", "replay",
                             "replay_query")
                and theirs.get(k) != v}
        if diff:
            raise ValueError(f"init_from={config.init_from!r}: its HMT config differs from this run's: {diff} "
                             "(checkpoint, this run); pass the matching --window / --sensory-tokens / ... options")
        model.config.prompt_recall = config.prompt_recall
        model.config.set_replay(model.config.replay if config.replay is None else config.replay)
        if config.memory_scale is not None:
            model.set_memory_scale(config.memory_scale)
        if config.memory_read is not None:
            model.set_memory_read(config.memory_read, config.memory_read_gain)
        return apply_mode(model, config.mode, config.lora_rank, config.lora_targets)
    backbone, tokenizer = load_backbone(config.backbone)
    model = HMTModel(backbone, config.hmt_config(), tokenizer=tokenizer)
    if config.warm_start:
        model.warm_start()
    return apply_mode(_scale_recall(model, config.recall_init_scale), config.mode, config.lora_rank,
                      config.lora_targets)


CENTER_WINDOWS = 8  # 2-segment windows whose memories set memory_read_center


@torch.no_grad()
def center_memory_read(model: HMTModel, docs: list[torch.Tensor]) -> None:
    """Set ``memory_read_center`` to the mean memory embedding of ``CENTER_WINDOWS`` 2-segment windows spread
    over ``docs`` (deterministic), so that a broadcast read adds what distinguishes a memory rather than what all
    share (docs/spec.md "Reading memory at every position")."""
    windows = Windows.build(docs, model.config.segment_tokens, 2)
    if not len(windows):
        raise ValueError("center_memory_read: the data holds no window of 2 segments")
    picks = sorted({i * len(windows) // CENTER_WINDOWS for i in range(CENTER_WINDOWS)})
    was_training = model.training
    model.eval()
    try:
        memories = model(windows.batch(picks).to(model.device)).memories
    finally:
        model.train(was_training)
    model.memory_read_center.copy_(memories.reshape(-1, memories.shape[-1]).mean(0, keepdim=True))


def cap_recall_norm(model: HMTModel, cap: float | None) -> None:
    """Scale W_q and W_k down (each on its own) where their spectral norm exceeds ``cap`` (None: no-op)."""
    if cap is None:
        return
    with torch.no_grad():
        for weight in (model.recall.w_q.weight, model.recall.w_k.weight):
            norm = float(torch.linalg.matrix_norm(weight.double(), ord=2))
            if norm > cap:
                weight.mul_(cap / norm)


def _scale_recall(model: HMTModel, scale: float) -> HMTModel:
    if scale != 1.0:
        with torch.no_grad():
            model.recall.w_q.weight.mul_(scale)
            model.recall.w_k.weight.mul_(scale)
    return model


# --------------------------------------------------------------------------------------------- distributed
def _init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); starts a process group under torchrun (nccl on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable(model: HMTModel) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path, model, optimizer, scheduler, samplers, step, config: TrainConfig) -> None:
    """Write a resumable checkpoint to ``path`` atomically (beside it, then swapped in; ``hmt_runtime.core.atomic``):
    a failed or killed save leaves the previous checkpoint loadable, and a folder holding other files is refused."""
    with staged_dir(path, owned=CHECKPOINT_ENTRIES, what="checkpoint folder") as tmp:
        model.save_pretrained(tmp / MODEL_DIR, save_backbone=config.mode == "full")
        state = {
            "format": STATE_FORMAT,
            "step": step,
            "trainable": {k: v.detach().cpu().clone() for k, v in _trainable(model).items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "samplers": [s.state_dict() for s in samplers],
            "train_config": json.dumps(dataclasses.asdict(config)),
            "hmt_config": json.dumps(model.config.to_dict()),
            "backbone": json.dumps(model.backbone_identity()),
        }
        torch.save(state, tmp / STATE_NAME)


# key: (expected type(s), what it is) of a trainer state
_STATE_FIELDS = {
    "step": (int, "the number of optimizer steps done (an integer >= 0)"),
    "trainable": (dict, "the trainable tensors by name"),
    "optimizer": (dict, "the optimizer's state_dict"),
    "scheduler": (dict, "the learning-rate scheduler's state_dict"),
    "rng": (dict, "the random number generator states"),
    "samplers": (list, "the data samplers' states"),
    "train_config": (str, "the TrainConfig as JSON"),
    "hmt_config": (str, "the HMTConfig as JSON"),
    "backbone": (str, "the backbone identity as JSON"),
}


def load_checkpoint_state(path) -> dict:
    """Read and validate ``trainer_state.pt`` of a checkpoint folder (a save interrupted there is recovered
    first).  Clear errors, naming the file and the field, for a missing, damaged or incomplete one."""
    folder = recover(Path(path))
    file = folder / STATE_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"resume: no training checkpoint at {str(path)!r} ({STATE_NAME} is missing); expected a folder "
            "written by a previous run, or start without resume"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many error types for a truncated or foreign file
        raise ValueError(f"resume: checkpoint {str(file)!r} is corrupted or not a trainer state ({err})") from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"resume: {str(file)!r} is not an HMT trainer state (format field missing or wrong)")
    for key, (kind, meaning) in _STATE_FIELDS.items():
        if key not in state:
            raise ValueError(f"resume: {str(file)!r} has no field {key!r} ({meaning}); the checkpoint is incomplete "
                             "or was written by another program")
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"resume: {str(file)!r}: field {key!r} is a {type(value).__name__}; expected {meaning}")
    if state["step"] < 0:
        raise ValueError(f"resume: {str(file)!r}: field 'step' is {state['step']}; expected an integer >= 0")
    for key in ("train_config", "hmt_config", "backbone"):
        try:
            decoded = json.loads(state[key])
        except ValueError as err:
            raise ValueError(f"resume: {str(file)!r}: field {key!r} is not valid JSON ({err})") from None
        if not isinstance(decoded, dict):
            raise ValueError(f"resume: {str(file)!r}: field {key!r} is not a JSON object")
    for name, value in state["trainable"].items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"resume: {str(file)!r}: field 'trainable' entry {name!r} is a "
                             f"{type(value).__name__}; expected a tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"resume: {str(file)!r}: trainable tensor {name!r} holds NaN or infinite values; "
                             "expected finite values")
    for key in ("state", "param_groups"):
        if key not in state["optimizer"]:
            raise ValueError(f"resume: {str(file)!r}: field 'optimizer' has no {key!r}; expected an optimizer "
                             "state_dict")
    rng = state["rng"]
    if not isinstance(rng.get("torch"), torch.Tensor) or "python" not in rng:
        raise ValueError(f"resume: {str(file)!r}: field 'rng' lacks 'torch' (a tensor) or 'python'; expected the "
                         "random number generator states")
    if not all(isinstance(s, dict) for s in state["samplers"]):
        raise ValueError(f"resume: {str(file)!r}: field 'samplers' holds a non-dict entry; expected sampler states")
    return state


def _check_compatible(state: dict, model: HMTModel, config: TrainConfig, path) -> None:
    saved_bb, ours_bb = json.loads(state["backbone"]), model.backbone_identity()
    diff = {k: (saved_bb.get(k), ours_bb.get(k)) for k in ("source", "model_type", "width", "vocab_size")
            if saved_bb.get(k) != ours_bb.get(k)}
    if diff:
        raise ValueError(f"resume: checkpoint {str(path)!r} was made for another backbone: {diff} (checkpoint, this run)")
    saved_cfg, ours_cfg = {**SAVED_DEFAULTS, **json.loads(state["hmt_config"])}, model.config.to_dict()
    diff = {k: (saved_cfg.get(k), v) for k, v in ours_cfg.items() if k != "kernels" and saved_cfg.get(k) != v}
    if diff:
        raise ValueError(f"resume: checkpoint {str(path)!r} has another HMT config: {diff} (checkpoint, this run)")
    saved_mode = json.loads(state["train_config"]).get("mode")
    if saved_mode != config.mode:
        raise ValueError(f"resume: checkpoint {str(path)!r} was trained with mode={saved_mode!r}, this run has "
                         f"mode={config.mode!r}")
    trainable = _trainable(model)
    if set(state["trainable"]) != set(trainable):
        missing = sorted(set(trainable) ^ set(state["trainable"]))[:5]
        raise ValueError(f"resume: checkpoint {str(path)!r} holds other trainable tensors than this model "
                         f"(differences include {missing})")
    for name, value in state["trainable"].items():
        if value.shape != trainable[name].shape:
            raise ValueError(f"resume: checkpoint tensor {name} has shape {tuple(value.shape)}, this model needs "
                             f"{tuple(trainable[name].shape)}")
    if len(state["samplers"]) != 2:
        raise ValueError(f"resume: checkpoint {str(path)!r}: field 'samplers' holds {len(state['samplers'])} "
                         "sampler states; expected 2 (one per training stage)")


def _restore(state: dict, model: HMTModel, optimizer, scheduler, samplers, path) -> int:
    """Load a validated trainer state into the run; returns its step.  Errors name the checkpoint and field."""
    with torch.no_grad():
        for name, param in _trainable(model).items():
            param.copy_(state["trainable"][name].to(param.device))
    for key, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        try:
            target.load_state_dict(state[key])
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as err:
            raise ValueError(f"resume: checkpoint {str(path)!r}: field {key!r} does not fit this run "
                             f"({type(err).__name__}: {err})") from None
    for index, (sampler, saved) in enumerate(zip(samplers, state["samplers"])):
        try:
            sampler.load_state_dict(saved)
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"resume: checkpoint {str(path)!r}: field 'samplers'[{index}] does not fit this run "
                             f"({type(err).__name__}: {err})") from None
    try:
        _set_rng_state(state["rng"])
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"resume: checkpoint {str(path)!r}: field 'rng' is damaged ({type(err).__name__}: "
                         f"{err})") from None
    return int(state["step"])


# --------------------------------------------------------------------------------------------- the loop
def _probe(model: HMTModel) -> str:
    """``diagnose.memory_use`` on 2-segment pass-key prompts (validation phrasings), as one log line: answer
    cross-entropy with the prompt's own memory, another prompt's, and M_init (own < other: memory is read)."""
    from .diagnose import memory_use

    model.eval()
    try:
        use = memory_use(model, batches=2)
    finally:
        model.train()
    gain = "" if model.memory_read_gain is None else f" read_gain {float(model.memory_read_gain.abs().mean()):.4f}"
    return " ".join(f"{k.removeprefix('answer_ce_')} {v:.4f}" for k, v in use.items() if k.startswith("answer_ce_")) + gain


def _log(line: str, log_file, bar) -> None:
    if bar is not None:
        bar.write(line)
    else:
        print(line, file=sys.stderr, flush=True)
    if log_file is not None:
        log_file.write(line + "\n")
        log_file.flush()


def train(config: TrainConfig, model: HMTModel | None = None, corpus=None, resume: bool | str = False,
          overwrite: bool = False, progress: bool = True, on_step=None) -> HMTModel:
    """Train HMT as ``config`` says; returns the trained model (also saved to ``<output_dir>/final``).

    model: an HMTModel to train (default: ``build_model(config)``); its trainable parameters are set by
    ``config.mode``.  corpus: token ids (a 1-D tensor, a (B, S) tensor or a list of 1-D tensors) instead of
    tokenising ``config.data``.  resume: True continues from ``<output_dir>/checkpoint``, a path from that
    checkpoint folder.  overwrite: allow a fresh run to replace an existing checkpoint in ``output_dir`` (else
    an error: a new run never silently destroys one).  on_step: called as ``on_step(step, loss)`` after each
    optimizer step.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    if config.threads:
        torch.set_num_threads(config.threads)
    rank, world, device = _init_distributed()
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size}: expected a multiple of the {world} processes")
    out_dir = Path(config.output_dir)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    resume_dir = None
    if resume:
        resume_dir = ckpt_dir if resume is True else Path(resume)
        state = load_checkpoint_state(resume_dir)  # fails before any work when missing or damaged
    elif (recover(ckpt_dir) / STATE_NAME).exists() and not overwrite:
        raise ValueError(
            f"output_dir={str(out_dir)!r} already holds a checkpoint; pass resume=True (--resume) to continue it "
            "or overwrite=True (--overwrite) to start over"
        )

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if model is None:
        model = build_model(config)
    else:
        if not isinstance(model, HMTModel):
            raise TypeError(f"model: expected an HMTModel, got {type(model).__name__}")
        apply_mode(_scale_recall(model, config.recall_init_scale), config.mode, config.lora_rank, config.lora_targets)
    model.to(device)
    model.train()
    cap_recall_norm(model, config.recall_max_norm)

    if corpus is not None:
        docs = as_documents(corpus)
    else:
        if not config.data:
            raise ValueError("data: expected at least one text file or folder (or pass corpus=token ids)")
        docs = tokenize_files(config.data, model.tokenizer)
    windows, samplers = [], []
    for stage, (steps, segments) in enumerate(((config.stage1_steps, config.stage1_segments),
                                               (config.stage2_steps, config.stage2_segments))):
        win = Windows.build(docs, model.config.segment_tokens, segments) if steps else None
        windows.append(win)
        samplers.append(WindowSampler(len(win) if win else 1, config.batch_size, seed=config.seed + 1000 * stage))

    if config.center_memory_read and resume_dir is None:
        center_memory_read(model, docs)
    params = list(_trainable(model).values())
    hmt_ids = {id(p) for p in model.recall.parameters()}
    groups = [{"params": [p for p in params if id(p) in hmt_ids], "lr": config.lr * config.hmt_lr_scale},
              {"params": [p for p in params if id(p) not in hmt_ids], "lr": config.lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step, gamma=config.lr_gamma)
    step = 0
    if resume_dir is not None:
        _check_compatible(state, model, config, resume_dir)
        step = _restore(state, model, optimizer, scheduler, samplers, resume_dir)
        del state

    objective = LastSegmentLoss(model, config.loss_on)
    if world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")

    log_file = bar = None
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(out_dir / "train.log", "a")
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.total_steps, initial=step, unit="step", desc="hmt train", dynamic_ncols=True)
        n_train = sum(p.numel() for p in params)
        _log(f"# {'resumed at step ' + str(step) if step else 'start'}: {model.config.describe()}; mode "
             f"{config.mode}, {n_train} trainable parameters, {world} process(es), {sum(d.numel() for d in docs)} "
             f"tokens in {len(docs)} document(s)", log_file, bar)
    try:
        while step < config.total_steps:
            stage = 0 if step < config.stage1_steps else 1
            use_recall = stage == 1
            started = time.perf_counter()
            teacher, parts, extra = None, {}, {}
            if use_recall and config.retrieval_every and (step + 1) % config.retrieval_every == 0:
                rng = random.Random(config.seed * 1_000_003 + step)  # a function of the step: resumes exactly
                segments = rng.randint(2, config.retrieval_segments)
                ids, prompt_end, labels = retrieval.training_batch(model.tokenizer, docs, config.batch_size,
                                                                   model.config, segments, rng,
                                                                   config.retrieval_tasks,
                                                                   max_tail=config.retrieval_tail)
                ids = ids[rank::world].to(device)
                extra = {"prompt_end": prompt_end[rank::world], "labels": labels[rank::world].to(device),
                         "detach_memory": config.detach_memory}
                parts["segments"] = torch.tensor(float(segments))
                weight = config.retrieval_distill
            else:
                indices = samplers[stage].next_batch()[rank::world]
                ids = windows[stage].batch(indices).to(device)
                weight = config.distill_weight
            if weight:
                with autocast:
                    teacher = teacher_topk(model, ids, config.distill_top_k)
            with segment_checkpointing(model, config.grad_checkpointing), autocast:
                loss = objective(ids, use_recall, teacher, weight, parts, **extra)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            lr = optimizer.param_groups[-1]["lr"]
            optimizer.step()
            cap_recall_norm(model, config.recall_max_norm)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            value = loss.detach().float()
            if world > 1:
                dist.all_reduce(value)
                value /= world
            value = float(value)
            elapsed = time.perf_counter() - started
            if rank == 0:
                tokens = config.batch_size * ids.shape[1]
                _log(f"step {step}/{config.total_steps} stage {stage + 1} loss {value:.4f} "
                     f"ppl {math.exp(min(value, 50)):.2f} tok/s {tokens / elapsed:.0f} lr {lr:.3g}"
                     + "".join(f" {k} {float(v):.4f}" for k, v in parts.items()), log_file, bar)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.3f}")
            if rank == 0 and config.probe_every and step % config.probe_every == 0:
                _log(f"probe {step} " + _probe(model), log_file, bar)
            if step % config.checkpoint_every == 0 or step == config.total_steps:
                if rank == 0:
                    save_checkpoint(ckpt_dir, model, optimizer, scheduler, samplers, step, config)
                _barrier()
            if on_step is not None:
                on_step(step, value)
        if rank == 0:
            model.save_pretrained(out_dir / FINAL_DIR, save_backbone=config.mode == "full")
        _barrier()
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
    model.eval()
    return model


# --------------------------------------------------------------------------------------------- command line
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("data", nargs="+", help="text files or folders (*.txt, *.md, *.text, searched recursively)")
    parser.add_argument("--output-dir", default=d.output_dir, help="checkpoints, log and final model (default %(default)s)")
    parser.add_argument("--backbone", default=d.backbone, help="load_backbone name or local folder (default %(default)s)")
    parser.add_argument("--window", type=int, default=d.window, help="backbone window W = Ls + k + 2 (default %(default)s)")
    parser.add_argument("--sensory-tokens", type=int, default=d.sensory_tokens)
    parser.add_argument("--memory-slots", type=int, default=d.memory_slots)
    parser.add_argument("--recall-dim", type=int, default=d.recall_dim)
    parser.add_argument("--recall", choices=("paper", "causal"), default=d.recall,
                        help="the recall mode the model trains with and records in its checkpoint (default "
                             "%(default)s, the shipped model's; HMTConfig's own default is 'paper')")
    parser.add_argument("--mode", choices=MODES, default=d.mode, help="what trains (default %(default)s)")
    parser.add_argument("--lora-rank", type=int, default=d.lora_rank)
    parser.add_argument("--no-warm-start", dest="warm_start", action="store_false",
                        help="keep random T and M_init instead of the BOS embedding")
    parser.add_argument("--stage1-steps", type=int, default=d.stage1_steps)
    parser.add_argument("--stage2-steps", type=int, default=d.stage2_steps)
    parser.add_argument("--stage1-segments", type=int, default=d.stage1_segments)
    parser.add_argument("--stage2-segments", type=int, default=d.stage2_segments)
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (default %(default)s)")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--lr-step", type=int, default=d.lr_step)
    parser.add_argument("--lr-gamma", type=float, default=d.lr_gamma)
    parser.add_argument("--grad-clip", type=float, default=d.grad_clip)
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--precision", choices=PRECISIONS, default=d.precision)
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                        help="start from this HMT checkpoint folder (or 'default') instead of a fresh HMT")
    parser.add_argument("--loss-on", choices=LOSS_ON, default=d.loss_on,
                        help="segments scored: the last (paper) or every one but the first (default %(default)s)")
    parser.add_argument("--distill-weight", type=float, default=d.distill_weight,
                        help="weight of the KL term against the backbone's full-window predictions (0 = off)")
    parser.add_argument("--distill-top-k", type=int, default=d.distill_top_k)
    parser.add_argument("--hmt-lr-scale", type=float, default=d.hmt_lr_scale,
                        help="learning-rate multiplier of the recall projections W_q, W_k (default %(default)s)")
    parser.add_argument("--recall-init-scale", type=float, default=d.recall_init_scale,
                        help="multiply W_q, W_k by this before training (scores scale with its square)")
    parser.add_argument("--recall-max-norm", type=float, default=d.recall_max_norm, metavar="C",
                        help="cap the spectral norm of W_q and W_k at C during training (bounded recall scores)")
    parser.add_argument("--lora-targets", choices=LORA_TARGETS, default=d.lora_targets,
                        help="projections the LoRA adapter covers (default %(default)s)")
    parser.add_argument("--prompt-recall", action="store_true",
                        help="the segment in which a prompt ends recalls with the prompt's last j ids")
    parser.add_argument("--replay", type=int, default=None, metavar="R",
                        help="slots replayed as tokens at the end of a prompt (turns --prompt-recall on); default: "
                             "the --init-from checkpoint's, else 0")
    parser.add_argument("--memory-scale", choices=MEMORY_SCALES, default=None,
                        help="memories as final hidden states ('hidden') or RMS-normalised to the token scale "
                             "('input'); default: the --init-from checkpoint's, else 'hidden'")
    parser.add_argument("--memory-read", choices=MEMORY_READS, default=None,
                        help="a segment's first position holds P ('direct') or E(BOS) + g P ('sink'); default: the "
                             "--init-from checkpoint's, else 'direct'")
    parser.add_argument("--memory-read-gain", type=float, default=None, metavar="G",
                        help="with --memory-read sink or broadcast: where the read gain g starts (default 0.05; a checkpoint's "
                             "own gain is kept unless this is given)")
    parser.add_argument("--center-memory-read", action="store_true",
                        help="with --memory-read broadcast: start memory_read_center at the mean memory of a few "
                             "windows of the data (default: 0)")
    parser.add_argument("--probe-every", type=int, default=d.probe_every, metavar="N",
                        help="every N steps, log the answer cross-entropy of 2-segment pass-key prompts with each "
                             "prompt's own memory, another's and none (diagnose.memory_use; 0 = never)")
    parser.add_argument("--retrieval-every", type=int, default=d.retrieval_every, metavar="N",
                        help="every N-th stage-2 step is a batch of retrieval prompts (0 = never)")
    parser.add_argument("--retrieval-segments", type=int, default=d.retrieval_segments,
                        help="retrieval prompts span 2 to this many segments (default %(default)s)")
    parser.add_argument("--retrieval-tasks", nargs="+", choices=retrieval.TASKS, default=d.retrieval_tasks,
                        help="retrieval tasks drawn from (default: all)")
    parser.add_argument("--retrieval-tail", type=int, default=d.retrieval_tail, metavar="N",
                        help="at most N prompt ids in a retrieval prompt's last segment (cheaper steps)")
    parser.add_argument("--detach-memory", action="store_true",
                        help="retrieval steps train the read side only (memories written without gradient)")
    parser.add_argument("--retrieval-distill", type=float, default=d.retrieval_distill, metavar="W",
                        help="weight of the distillation term on retrieval batches too: the backbone's full-window "
                             "predictions over the scored segments' prompt and answer (default 0 = off)")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue from <output-dir>/checkpoint (or the given checkpoint folder)")
    parser.add_argument("--overwrite", action="store_true", help="start over even if output-dir holds a checkpoint")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run_from_args(args: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    train(config, resume=args.resume, overwrite=args.overwrite, progress=args.progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained model: {Path(config.output_dir) / FINAL_DIR}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``hmt train`` on an argparse subparsers object."""
    parser = subparsers.add_parser("train", help="train HMT on text files (two-stage BPTT)",
                                   description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    parser.set_defaults(func=run_from_args)
    return parser


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hmt_runtime.train", description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
