"""Weight-space interpolation of two checkpoints of one model (WiSE-FT: Wortsman et al., "Robust fine-tuning of
zero-shot models", CVPR 2022): a fine-tuned checkpoint pulled part of the way back towards the one it started
from, which keeps much of what fine-tuning taught and gives back much of what it cost.

    python -m hmt_runtime.training.interpolate NEW OLD --alpha 0.65 --out DIR

Every HMT parameter (T, M_init, W_q, W_k) becomes ``alpha * new + (1 - alpha) * old``; each LoRA module's update
becomes ``alpha * B1 A1 + (1 - alpha) * B0 A0`` (peft's scaling applied to both), refactored to the adapter's
rank ``r`` by a truncated SVD in float64, so that the result has the adapter shape both had (the truncation
error is returned and printed: the relative Frobenius norm of what rank ``r`` leaves out, worst module).  The
config, the backbone and everything else are NEW's.  Both checkpoints must share the backbone, the HMT
parameter shapes and the adapter's targets and rank.
"""
from __future__ import annotations

import argparse
import sys

import torch

from ..incremental.engines import _lora_adapters
from ..model.hmt import HMTModel


def _lora_modules(model: HMTModel) -> dict:
    """The backbone's LoRA layers by name (peft's or the lean model's: ``engines._lora_adapters`` recognises them
    and refuses merged layers, DoRA and LoRA biases)."""
    return {name: m for name, m in model.backbone.named_modules() if _lora_adapters(m) is not None}


def _one_adapter(name: str, module) -> tuple[torch.Tensor, torch.Tensor, float]:
    adapters = _lora_adapters(module)
    if len(adapters) != 1:
        raise ValueError(f"{name}: {len(adapters)} active LoRA adapters; expected one")
    return adapters[0]


def interpolate(new: HMTModel, old: HMTModel, alpha: float) -> float:
    """Move ``new``'s weights to ``alpha * new + (1 - alpha) * old`` in place (module docstring); returns the
    worst relative rank-r truncation error of a LoRA update (0 when alpha is 0 or 1)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha!r}: expected a number in [0, 1]")
    if new.backbone_identity() != old.backbone_identity():
        raise ValueError(f"the checkpoints wrap different backbones: {new.backbone_identity()} and "
                         f"{old.backbone_identity()}")
    a_params, b_params = new._hmt_named_parameters(), old._hmt_named_parameters()
    if {k: tuple(v.shape) for k, v in a_params.items()} != {k: tuple(v.shape) for k, v in b_params.items()}:
        raise ValueError("the checkpoints' HMT parameters differ in names or shapes: "
                         f"{sorted(a_params)} and {sorted(b_params)}")
    a_lora, b_lora = _lora_modules(new), _lora_modules(old)
    if sorted(a_lora) != sorted(b_lora):
        raise ValueError(f"the checkpoints' adapters target different modules ({len(a_lora)} and {len(b_lora)})")
    alpha = float(alpha)
    worst = 0.0
    with torch.no_grad():
        for name, param in a_params.items():
            param.copy_((alpha * param.double() + (1 - alpha) * b_params[name].double()).to(param.dtype))
        for name, mod in a_lora.items():
            a1, b1, s1 = _one_adapter(name, mod)
            a0, b0, s0 = _one_adapter(name, b_lora[name])
            if a1.shape != a0.shape or b1.shape != b0.shape:
                raise ValueError(f"{name}: LoRA factors of shapes {tuple(a1.shape)}, {tuple(b1.shape)} and "
                                 f"{tuple(a0.shape)}, {tuple(b0.shape)}: expected one rank and shape")
            update = alpha * s1 * (b1.double() @ a1.double()) + (1 - alpha) * s0 * (b0.double() @ a0.double())
            rank = a1.shape[0]
            u, sv, vh = torch.linalg.svd(update, full_matrices=False)
            root = (sv[:rank] / s1).sqrt()  # update = s1 * B A with B = U_r sqrt(S_r / s1), A = sqrt(S_r / s1) V_r^T
            b_new, a_new = u[:, :rank] * root, root[:, None] * vh[:rank]
            norm = float(update.norm())
            if norm > 0:
                worst = max(worst, float((s1 * (b_new @ a_new) - update).norm()) / norm)
            a1.copy_(a_new.to(a1.dtype))
            b1.copy_(b_new.to(b1.dtype))
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hmt_runtime.training.interpolate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("new", help="the fine-tuned checkpoint (its config is kept)")
    parser.add_argument("old", help="the checkpoint it started from")
    parser.add_argument("--alpha", type=float, required=True, help="weight of NEW, in [0, 1]")
    parser.add_argument("--out", required=True, help="the folder to write (a checkpoint)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        print(f"error: --alpha {args.alpha}: expected a number in [0, 1]", file=sys.stderr)
        return 2
    try:
        new = HMTModel.from_pretrained(args.new)
        old = HMTModel.from_pretrained(args.old)
        worst = interpolate(new, old, args.alpha)
        new.save_pretrained(args.out)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: alpha {args.alpha}; worst relative rank-r truncation error of a LoRA update {worst:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
