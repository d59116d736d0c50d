"""Converting checkpoints of HMT-pytorch (the paper's reference code) into this project's checkpoint format:
``convert_hmt_pytorch`` and the ``hmt convert`` command.  Reading and validating the checkpoint is
``hmt_runtime.model.hmt_pytorch``; ``from_hmt_pytorch`` is ``HMTModel.from_hmt_pytorch``.
"""
from __future__ import annotations

from ..core.checks import check_output_dir, int_at_least
from .hmt import HMTModel
from .hmt_pytorch import DEFAULT_LORA_ALPHA, DEFAULT_MEMORY_SLOTS, DEFAULT_SUM_FRACTION, SOURCE_FORMATS

from_hmt_pytorch = HMTModel.from_hmt_pytorch


def convert_hmt_pytorch(checkpoint, backbone, out, **kwargs):
    """``HMTModel.from_hmt_pytorch(checkpoint, backbone, **kwargs)`` saved to ``out`` as this project's checkpoint (with
    the merged backbone and its tokenizer; written beside ``out`` and renamed into place).  Returns the model."""
    model = HMTModel.from_hmt_pytorch(checkpoint, backbone, **kwargs)
    model.save_pretrained(out, save_backbone=True)
    return model


# ------------------------------------------------------------------------------------------------ the command
def add_convert_parser(sub) -> None:
    """``hmt convert --from hmt-pytorch CKPT --backbone NAME_OR_DIR --window W --sensory-tokens k --recall-dim d_h
    --out DIR``."""
    parser = sub.add_parser("convert", help="convert a checkpoint trained with HMT-pytorch (the paper's code) into "
                                            "this project's checkpoint format")
    parser.add_argument("--from", dest="source_format", choices=SOURCE_FORMATS, required=True,
                        help="the checkpoint's format: hmt-pytorch (docs/hmt_pytorch.md)")
    parser.add_argument("checkpoint", help="a model_weights_<step>.pth (or .pt / .bin / .safetensors) state dict, or "
                                           "the file or folder DeepSpeed's zero_to_fp32.py writes")
    parser.add_argument("--backbone", required=True,
                        help="the backbone it was trained on: a transformers model folder (its config.json and "
                             "tokenizer; the weights come from the checkpoint) or 'smollm2-135m'")
    parser.add_argument("--window", type=int_at_least(3), required=True,
                        help="W, the reference's --segment_length (Ls = W - 2 - k)")
    parser.add_argument("--sensory-tokens", type=int_at_least(0), required=True,
                        help="k, the reference's --num_sensory")
    parser.add_argument("--recall-dim", type=int_at_least(1), required=True,
                        help="d_h, the reference's --mem_recall_hidden_dim")
    parser.add_argument("--memory-slots", type=int_at_least(1), default=DEFAULT_MEMORY_SLOTS,
                        help=f"N, the reference's --mem_recall_context (default {DEFAULT_MEMORY_SLOTS})")
    parser.add_argument("--sum-fraction", type=float, default=DEFAULT_SUM_FRACTION,
                        help="the reference's --sum_fraction: j = round(Ls * fraction) "
                             f"(default {DEFAULT_SUM_FRACTION})")
    parser.add_argument("--recall-scale", choices=("sqrt", "linear"), default=None,
                        help="recall scores / sqrt(d_h) or / d_h ('linear': the reference's teacher-forced forward at "
                             "d >= 4096 and d_h >= 4096, where this option is required); default sqrt")
    parser.add_argument("--lora-alpha", type=float, default=DEFAULT_LORA_ALPHA,
                        help="the LoRA alpha of the training run, not stored in the file "
                             f"(default {DEFAULT_LORA_ALPHA:g}, the reference's)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="dtype of the written checkpoint (default auto: the checkpoint's)")
    parser.add_argument("--out", required=True, help="the folder to write (a new folder, or a checkpoint to replace)")
    parser.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    check_output_dir("--out", args.out)
    model = convert_hmt_pytorch(args.checkpoint, args.backbone, args.out, window=args.window,
                                sensory_tokens=args.sensory_tokens, recall_dim=args.recall_dim,
                                memory_slots=args.memory_slots, sum_fraction=args.sum_fraction,
                                recall_scale=args.recall_scale, lora_alpha=args.lora_alpha, dtype=args.dtype)
    info = model.hmt_conversion
    identity = model.backbone_identity()
    lora = (f"LoRA merged into the backbone ({info['lora_modules']} layers, rank "
            f"{'/'.join(str(r) for r in info['lora_ranks'])}, alpha {info['lora_alpha']:g})"
            if info["lora_modules"] else "no LoRA")
    print(f"wrote {args.out}: {model.config.describe()}")
    print(f"backbone {identity['source']} ({identity['model_type']}, d = {identity['width']}), {info['dtype']}; {lora}"
          + ("; its LM head kept the base embedding (untied)" if info["untied_lm_head"] else ""))
    return 0
