"""HMTConfig: the sizes of one HMT wrapper, validated (spec "Symbols and configuration").

The backbone sees windows of ``W = Ls + k + 2`` positions: the recalled memory ``P``, ``k`` sensory tokens,
``Ls`` new tokens and ``P`` again.  The paper's "segment length" is ``W``; ``segment_tokens`` here is ``Ls``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .ops import RECALL_SCALES

RECALL_MODES = ("paper", "causal")
MEMORY_SCALES = ("hidden", "input")
MEMORY_READS = ("direct", "sink", "broadcast")
DEFAULT_RECALL = "paper"  # HMTConfig.recall, and `hmt generate|serve --recall` for a fresh HMT
KERNEL_CHOICES = ("auto", "torch", "triton", "native")  # which kernels run the HMT ops (HMTConfig.kernels)
# Fields added after the first checkpoints, and the value a config saved without them means.
SAVED_DEFAULTS = {"recall_scale": "sqrt", "prompt_recall": False, "memory_scale": "hidden", "memory_read": "direct",
                  "replay": 0, "replay_query": 16}


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")


@dataclass
class HMTConfig:
    """Sizes and modes of an HMT wrapper.

    segment_tokens: ``Ls``, new tokens per segment.
    sensory_tokens: ``k``, last token ids of the previous segment re-embedded at the start of a segment (0 = off).
    summary_tokens: ``j``, tokens summarised for the recall query; None means ``segment_tokens // 2``.
    memory_slots: ``N``, memory embeddings kept for recall (the newest N).
    recall_dim: ``d_h``, width of the recall projections W_q and W_k.
    recall: "paper" (query = first j tokens of the segment) or "causal" (query = last j tokens before it).
    recall_scale: "sqrt" (recall scores divided by sqrt(d_h), the spec) or "linear" (divided by d_h: models
        trained with the paper's code at d >= 4096 and d_h >= 4096, docs/hmt_pytorch.md).
    kernels: "auto", "torch", "triton" or "native": the backend of the hot-path ops (hmt_runtime.core.ops).
    prompt_recall: the segment in which a prompt ends recalls with the last j ids of the prompt as its query
        (docs/spec.md "Recall at the end of a prompt"), so that a question closing a prompt steers recall.
        False (the paper's rule, and that of checkpoints that do not record the field) leaves every segment's
        query to the recall mode.
    memory_scale: "hidden" (M_n is the final hidden state at the trailing P, the paper's rule, and that of
        checkpoints that do not record the field) or "input" (M_n is that state RMS-normalised and multiplied by a
        learned gain ``memory_gain`` (d,) that starts at the token embeddings' RMS, so that memories enter the
        backbone at the scale of the tokens beside them: docs/spec.md "Memory at the input scale").
    memory_read: "direct" (the segment's first position holds P, the paper's rule and that of checkpoints that
        do not record the field) or "sink" (it holds E(BOS) + g * P, g = ``memory_read_gain`` (1, d), learned,
        starting at 0.05: the position stays the attention sink the backbone was trained with, so P is read;
        docs/spec.md "Reading memory at the attention sink") or "broadcast" (as "sink", and every sensory and
        segment token's embedding is E(x) + g * P too, so that each position carries P in its own residual
        stream: docs/spec.md "Reading memory at every position").  The trailing position holds P either way.
    replay: how many memory slots the segment in which a prompt ends reads again as tokens (0 = off, the paper's
        rule and that of checkpoints that do not record the field; needs ``prompt_recall``).  Each slot keeps,
        beside its memory embedding, the ids of the window that wrote it (its sensory and segment ids, at most
        k + Ls); the slots whose ids best match the prompt's last ``replay_query`` ids (``core.replay``) are
        placed, oldest first, between P and the sensory tokens of that segment: docs/spec.md "Replay at the end
        of a prompt".  That segment's window then holds up to ``replay * (k + Ls)`` more positions.
    replay_query: how many of the prompt's last ids choose the replayed slots.
    """

    segment_tokens: int = 222
    sensory_tokens: int = 32
    summary_tokens: int | None = None
    memory_slots: int = 300
    recall_dim: int = 1536
    recall: str = DEFAULT_RECALL
    kernels: str = "auto"
    recall_scale: str = "sqrt"
    prompt_recall: bool = False
    memory_scale: str = "hidden"
    memory_read: str = "direct"
    replay: int = 0
    replay_query: int = 16
    window: int = field(init=False)

    def __post_init__(self) -> None:
        _check_int("segment_tokens", self.segment_tokens, 1)
        _check_int("sensory_tokens", self.sensory_tokens, 0)
        if self.sensory_tokens > self.segment_tokens:
            raise ValueError(
                f"sensory_tokens={self.sensory_tokens}: expected at most segment_tokens={self.segment_tokens} "
                "(sensory tokens are the tail of the previous segment)"
            )
        if self.summary_tokens is None:
            self.summary_tokens = max(1, self.segment_tokens // 2)
        _check_int("summary_tokens", self.summary_tokens, 1)
        if self.summary_tokens > self.segment_tokens:
            raise ValueError(
                f"summary_tokens={self.summary_tokens}: expected at most segment_tokens={self.segment_tokens}"
            )
        _check_int("memory_slots", self.memory_slots, 1)
        _check_int("recall_dim", self.recall_dim, 1)
        if self.recall not in RECALL_MODES:
            raise ValueError(f"recall={self.recall!r}: expected one of {RECALL_MODES}")
        if self.recall_scale not in RECALL_SCALES:
            raise ValueError(f"recall_scale={self.recall_scale!r}: expected one of {RECALL_SCALES}")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels={self.kernels!r}: expected one of {KERNEL_CHOICES}")
        if not isinstance(self.prompt_recall, bool):
            raise ValueError(f"prompt_recall={self.prompt_recall!r}: expected True or False")
        if self.memory_scale not in MEMORY_SCALES:
            raise ValueError(f"memory_scale={self.memory_scale!r}: expected one of {MEMORY_SCALES}")
        if self.memory_read not in MEMORY_READS:
            raise ValueError(f"memory_read={self.memory_read!r}: expected one of {MEMORY_READS}")
        _check_int("replay", self.replay, 0)
        _check_int("replay_query", self.replay_query, 1)
        if self.replay and not self.prompt_recall:
            raise ValueError(f"replay={self.replay}: needs prompt_recall=True (slots are replayed at the end of a "
                             "prompt)")
        if self.replay and self.replay_query > self.summary_tokens:
            raise ValueError(f"replay_query={self.replay_query}: expected at most summary_tokens="
                             f"{self.summary_tokens} (the prompt's last ids a segment knows)")
        if self.replay > self.memory_slots:
            raise ValueError(f"replay={self.replay}: expected at most memory_slots={self.memory_slots}")
        self.window = self.segment_tokens + self.sensory_tokens + 2

    def set_replay(self, replay: int) -> None:
        """Replay ``replay`` slots at the end of a prompt from now on (0: off); a value > 0 turns ``prompt_recall``
        on with it.  The whole config is validated again."""
        _check_int("replay", replay, 0)
        self.replay, self.prompt_recall = replay, self.prompt_recall or replay > 0
        self.__post_init__()

    @property
    def slot_tokens(self) -> int:
        """Ids kept per memory slot for replay: k + Ls with ``replay``, else 0."""
        return self.sensory_tokens + self.segment_tokens if self.replay else 0

    @property
    def kv_window(self) -> int:
        """Positions a runtime's KV cache holds per row: W, plus the replayed slots' ids (``replay``)."""
        return self.window + self.replay * self.slot_tokens

    @classmethod
    def from_window(cls, window: int, sensory_tokens: int = 32, **kwargs) -> "HMTConfig":
        """Config for a backbone window of ``window`` positions: ``Ls = window - sensory_tokens - 2``.

        ``HMTConfig.from_window(1024, sensory_tokens=32).segment_tokens == 990``.
        """
        _check_int("window", window, 3)
        _check_int("sensory_tokens", sensory_tokens, 0)
        if "segment_tokens" in kwargs:
            raise ValueError("from_window() derives segment_tokens from window; pass one or the other, not both")
        segment_tokens = window - sensory_tokens - 2
        if segment_tokens < 1:
            raise ValueError(
                f"window={window} with sensory_tokens={sensory_tokens}: leaves {segment_tokens} new tokens per "
                "segment; expected window >= sensory_tokens + 3"
            )
        return cls(segment_tokens=segment_tokens, sensory_tokens=sensory_tokens, **kwargs)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("window")
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "HMTConfig":
        """The config of ``to_dict`` (as a checkpoint's "hmt" section records it); every field is validated."""
        if not isinstance(data, dict):
            raise TypeError(f"HMT config: expected a JSON object of fields, got {type(data).__name__}")
        data = dict(data)
        window = data.pop("window", None)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"HMT config has unknown fields {sorted(unknown)}; expected a subset of {sorted(known)}")
        cfg = cls(**data)
        if window is not None and window != cfg.window:
            raise ValueError(f"HMT config window={window} disagrees with segment_tokens + sensory_tokens + 2 = {cfg.window}")
        return cfg

    def describe(self) -> str:
        return (
            f"window W={self.window} = Ls {self.segment_tokens} + sensory k {self.sensory_tokens} + 2 memory positions; "
            f"summary j={self.summary_tokens}; memory slots N={self.memory_slots}; recall d_h={self.recall_dim}; "
            f"recall mode {self.recall!r}"
            + (f", scores / d_h (recall_scale {self.recall_scale!r})" if self.recall_scale != "sqrt" else "")
            + ("; recall at the end of a prompt" if self.prompt_recall else "")
            + ("; memories at the input scale" if self.memory_scale == "input" else "")
            + {"direct": "", "sink": "; memory read at the attention sink",
               "broadcast": "; memory read at the sink and every position"}[self.memory_read]
            + (f"; {self.replay} slot(s) replayed at the end of a prompt (chosen by its last {self.replay_query} "
               "ids)" if self.replay else "")
            + f"; kernels {self.kernels!r}"
        )


# The defaults of `hmt serve`'s limit flags (hmt_runtime.serving.server's docstring describes them; 0 turns one off).
SERVE_LIMITS = {
    "max_request_bytes": 4 * 2**20, "max_prompt_tokens": 131072, "max_document_tokens": 1048576,
    "max_tokens_limit": 4096, "max_memories": 1000,
}
