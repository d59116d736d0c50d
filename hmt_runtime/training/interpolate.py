"""Weight-space interpolation of two checkpoints of one model (WiSE-FT: Wortsman et al., "Robust fine-tuning of
zero-shot models", CVPR 2022): a fine-tuned checkpoint pulled part of the way back towards the one it started
from, which keeps much of what fine-tuning taught and gives back much of what it cost.

    python -m hmt_runtime.training.interpolate NEW OLD --alpha 0.65 --out DIR
    python -m hmt_runtime.training.interpolate NEW OLD --alpha 1 --alpha-for mlp=0.5 --out DIR

Every HMT parameter (T, M_init, W_q, W_k) becomes ``alpha * new + (1 - alpha) * old``; each LoRA module's update
becomes ``alpha * B1 A1 + (1 - alpha) * B0 A0`` (peft's scaling applied to both), refactored to the adapter's
rank ``r`` by a truncated SVD in float64, so that the result has the adapter shape both had (the truncation
error is returned and printed: the relative Frobenius norm of what rank ``r`` leaves out, worst module).  The
config, the backbone and everything else are NEW's.  Both checkpoints must share the backbone, the HMT
parameter shapes and the adapter's targets and rank.

``--alpha-for PART=A`` (repeatable) gives the parameters and LoRA modules whose name contains PART their own
weight (``mlp``, ``self_attn``, ``layers.3.``, ``memory_init``; the first PART that matches wins), so that fine-tuning
can be kept where it is needed and given back elsewhere; a PART that matches nothing is refused.
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


def _check_alpha(what: str, alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"{what}={alpha!r}: expected a number in [0, 1]")
    return float(alpha)


def interpolate(new: HMTModel, old: HMTModel, alpha: float, alpha_for: dict | None = None) -> float:
    """Move ``new``'s weights to ``alpha * new + (1 - alpha) * old`` in place (module docstring), with
    ``alpha_for[part]`` instead of ``alpha`` for the names containing ``part`` (the first that matches); returns
    the worst relative rank-r truncation error of a LoRA update (0 when every alpha is 0 or 1)."""
    alpha = _check_alpha("alpha", alpha)
    alpha_for = {str(part): _check_alpha(f"alpha_for[{part!r}]", a) for part, a in (alpha_for or {}).items()}
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
    names = list(a_params) + list(a_lora)
    for part in alpha_for:
        if not any(part in name for name in names):
            raise ValueError(f"alpha_for: {part!r} names no HMT parameter or LoRA module (they are "
                             f"{sorted(a_params)} and modules such as {next(iter(sorted(a_lora)), 'none')!r})")

    def weight(name: str) -> float:
        return next((a for part, a in alpha_for.items() if part in name), alpha)

    worst = 0.0
    with torch.no_grad():
        for name, param in a_params.items():
            w = weight(name)
            param.copy_((w * param.double() + (1 - w) * b_params[name].double()).to(param.dtype))
        for name, mod in a_lora.items():
            w = weight(name)
            a1, b1, s1 = _one_adapter(name, mod)
            a0, b0, s0 = _one_adapter(name, b_lora[name])
            if a1.shape != a0.shape or b1.shape != b0.shape:
                raise ValueError(f"{name}: LoRA factors of shapes {tuple(a1.shape)}, {tuple(b1.shape)} and "
                                 f"{tuple(a0.shape)}, {tuple(b0.shape)}: expected one rank and shape")
            update = w * s1 * (b1.double() @ a1.double()) + (1 - w) * s0 * (b0.double() @ a0.double())
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
    parser.add_argument("--alpha-for", action="append", default=[], metavar="PART=A",
                        help="weight of NEW for the parameters and LoRA modules whose name contains PART "
                             "(repeatable; the first match wins)")
    parser.add_argument("--out", required=True, help="the folder to write (a checkpoint)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        print(f"error: --alpha {args.alpha}: expected a number in [0, 1]", file=sys.stderr)
        return 2
    alpha_for = {}
    for item in args.alpha_for:
        part, sep, value = item.partition("=")
        try:
            a = float(value)
        except ValueError:
            a = -1.0
        if not sep or not part or not 0.0 <= a <= 1.0:
            print(f"error: --alpha-for {item!r}: expected PART=A with A a number in [0, 1]", file=sys.stderr)
            return 2
        alpha_for[part] = a
    try:
        new = HMTModel.from_pretrained(args.new)
        old = HMTModel.from_pretrained(args.old)
        worst = interpolate(new, old, args.alpha, alpha_for)
        new.save_pretrained(args.out)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    parts = "".join(f", {part} {a}" for part, a in alpha_for.items())
    print(f"{args.out}: alpha {args.alpha}{parts}; worst relative rank-r truncation error of a LoRA update {worst:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
