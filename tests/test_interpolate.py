"""Weight-space interpolation of two checkpoints (hmt_runtime.training.interpolate): HMT parameters lerped, each
LoRA update lerped and refactored to the adapter's rank, checked against float64 products and SVDs."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from hmt_runtime.training.interpolate import _lora_modules, interpolate, main
from helpers import make_model

RANK = 2


def lora_model(seed, targets=("q_proj", "v_proj", "down_proj")):
    model = make_model("llama", seed=0)  # one backbone for both
    model.backbone = get_peft_model(model.backbone, LoraConfig(r=RANK, lora_alpha=3, target_modules=list(targets)))
    model = model.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in _lora_modules(model).values():
            for lin in (mod.lora_A["default"], mod.lora_B["default"]):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen, dtype=torch.float64))
        for p in model.hmt_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return model


@torch.no_grad()
def updates(model):
    return {name: float(m.scaling["default"]) * m.lora_B["default"].weight @ m.lora_A["default"].weight
            for name, m in _lora_modules(model).items()}


def test_the_ends_give_back_either_checkpoint_and_the_middle_the_best_rank_r_mix():
    new, old = lora_model(1), lora_model(2)
    before_new, before_old = updates(new), updates(old)
    params_new = {k: v.clone() for k, v in new.hmt_state_dict().items()}
    params_old = old.hmt_state_dict()

    one = lora_model(1)
    assert interpolate(one, old, 1.0) < 1e-12
    for name, u in updates(one).items():
        torch.testing.assert_close(u, before_new[name], rtol=1e-10, atol=1e-10)

    zero = lora_model(1)
    assert interpolate(zero, old, 0.0) < 1e-12
    for name, u in updates(zero).items():
        torch.testing.assert_close(u, before_old[name], rtol=1e-10, atol=1e-10)
    for k, v in zero.hmt_state_dict().items():
        torch.testing.assert_close(v, params_old[k])

    worst = interpolate(new, old, 0.3)
    errors = []
    for name, u in updates(new).items():
        mix = 0.3 * before_new[name] + 0.7 * before_old[name]
        sv = torch.linalg.svdvals(mix)
        # the rank-r truncated SVD is the closest rank-r matrix: what it leaves out is the tail of the spectrum
        best = float(sv[RANK:].square().sum().sqrt())
        assert abs(float((u - mix).norm()) - best) < 1e-9 * float(mix.norm())
        assert torch.linalg.matrix_rank(u) <= RANK
        errors.append(best / float(mix.norm()))
    assert worst == pytest.approx(max(errors), rel=1e-9) and worst > 0.01  # two random rank-2 updates: rank 4
    for k, v in new.hmt_state_dict().items():
        torch.testing.assert_close(v, 0.3 * params_new[k] + 0.7 * params_old[k])


def test_alpha_for_gives_the_named_parts_their_own_weight():
    new, old = lora_model(1), lora_model(2)
    before_new, before_old = updates(new), updates(old)
    params_new = {k: v.clone() for k, v in new.hmt_state_dict().items()}
    params_old = old.hmt_state_dict()
    interpolate(new, old, 1.0, {"down_proj": 0.0, "memory_init": 0.25})
    after = updates(new)
    assert any("down_proj" in name for name in after) and any("down_proj" not in name for name in after)
    for name, u in after.items():
        want = before_old[name] if "down_proj" in name else before_new[name]
        torch.testing.assert_close(u, want, rtol=1e-10, atol=1e-10)
    for k, v in new.hmt_state_dict().items():
        want = 0.25 * params_new[k] + 0.75 * params_old[k] if k == "memory_init" else params_new[k]
        torch.testing.assert_close(v, want)
    with pytest.raises(ValueError, match="'nothing_here' names no HMT parameter or LoRA module"):
        interpolate(new, old, 0.5, {"nothing_here": 0.5})
    with pytest.raises(ValueError, match="alpha_for\\['mlp'\\]="):
        interpolate(new, old, 0.5, {"mlp": 2.0})


def test_bad_alpha_and_mismatched_checkpoints_are_refused():
    new, old = lora_model(1), lora_model(2)
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="alpha="):
            interpolate(new, old, bad)
    with pytest.raises(ValueError, match="target different modules"):
        interpolate(new, lora_model(2, targets=("q_proj",)), 0.5)


def test_the_command_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "new"), str(tmp_path / "old"), "--alpha", "2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --alpha 2.0: expected a number in [0, 1]") and err.count("\n") == 1
    assert main([str(tmp_path / "new"), str(tmp_path / "old"), "--alpha", "0.5", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "new" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
    for bad in ("mlp", "mlp=x", "=0.5", "mlp=1.5"):
        assert main([str(tmp_path / "new"), str(tmp_path / "old"), "--alpha", "0.5", "--alpha-for", bad,
                     "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --alpha-for {bad!r}: expected PART=A") and err.count("\n") == 1
