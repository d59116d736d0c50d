"""Bad input and faults: saves that cannot lose anything (a writer killed at every step), everything loaded is
validated, every public argument is checked up front, and the CLI answers one line per error."""
import errno
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from hmt_runtime import HMTConfig, HMTModel
from hmt_runtime.core import atomic
from hmt_runtime.core.checks import check_eos_token_id, check_text
from hmt_runtime.core.memory import MemoryState
from hmt_runtime.model.hmt import CONFIG_NAME, WEIGHTS_NAME
from tiny import VOCAB, tiny_backbone

CFG = dict(segment_tokens=8, sensory_tokens=2, summary_tokens=4, memory_slots=3, recall_dim=16, recall="causal",
           kernels="torch")


def small_model(family="llama", seed=0):
    backbone = tiny_backbone(family, 0)  # the same backbone; HMT parameters drawn from ``seed``
    torch.manual_seed(seed)
    return HMTModel(backbone, HMTConfig(**CFG)).double().eval()


def hmt_weights(model):
    return {k: v.clone() for k, v in model.hmt_state_dict().items()}


def same_weights(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ fault injection
class Fault(OSError):
    pass


def _install_faults(k, mode):
    """Make the k-th file-system mutation (os calls, safetensors / torch writes, Path.write_text) fail: "exit"
    ends the process on the spot (as kill -9 would), "raise" raises an OSError (as a full disk would)."""
    import hmt_runtime.core.memory as memory_module
    import hmt_runtime.model.hmt as model_module
    import hmt_runtime.training.train as train_module

    count = [0]

    def wrap(fn):
        def patched(*args, **kwargs):
            count[0] += 1
            if count[0] == k:
                if mode == "exit":
                    os._exit(9)
                raise Fault(errno.EIO, "injected fault")
            return fn(*args, **kwargs)
        return patched

    for name in ("rename", "replace", "mkdir", "rmdir", "unlink", "remove", "fsync", "ftruncate", "pwrite", "chmod"):
        setattr(os, name, wrap(getattr(os, name)))
    model_module.save_file = wrap(model_module.save_file)
    memory_module.save_file = wrap(memory_module.save_file)
    train_module.torch.save = wrap(torch.save)
    pathlib.Path.write_text = wrap(pathlib.Path.write_text)
    return count


def in_child(fn, k, mode):
    """Run ``fn`` in a forked child with the k-th mutation failing.  Exit status: 0 = it finished without
    reaching k, 4 = it finished although the k-th failed (a best-effort step), 1 = it raised the fault, 9 = killed."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            count = _install_faults(k, mode)
            fn()
            code = 0 if count[0] < k else 4
        except Fault:
            code = 1
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def every_step(fn, check, mode):
    """Fail the writer at its 1st, 2nd, ... mutation until it completes; ``check(k)`` after each."""
    for k in range(1, 400):
        code = in_child(fn, k, mode)
        assert code in (0, 1, 4, 9), f"step {k}: the writer failed in an unexpected way (exit {code})"
        check(k)
        if code == 0:
            return k
    raise AssertionError("the writer never completed")


@pytest.mark.parametrize("mode", ["exit", "raise"])
@pytest.mark.parametrize("existing", [True, False])
def test_save_pretrained_killed_at_every_step_leaves_old_or_new(tmp_path, mode, existing):
    old_model, new_model = small_model(seed=1), small_model(seed=2)
    old_weights, new_weights = hmt_weights(old_model), hmt_weights(new_model)
    target = tmp_path / "ck"
    outcomes = set()

    def reset():
        for p in tmp_path.iterdir():
            import shutil
            shutil.rmtree(p)
        if existing:
            old_model.save_pretrained(target)

    def check(k):
        names = sorted(p.name for p in tmp_path.iterdir())
        try:
            loaded = HMTModel.from_pretrained(target, backbone=old_model.backbone)
        except FileNotFoundError:
            assert not existing, f"step {k}: no checkpoint at the target after a kill ({names})"
            outcomes.add("nothing")  # a first save that died before anything was published
            assert sorted(p.name for p in tmp_path.iterdir()) == [], f"step {k}: the load left {names}"
        else:
            got = hmt_weights(loaded)
            if same_weights(got, old_weights) and existing:
                outcomes.add("old")
            elif same_weights(got, new_weights):
                outcomes.add("new")
            else:
                raise AssertionError(f"step {k}: the checkpoint at the target is neither the old nor the new one")
        # the load recovered and cleaned: at most the target (and leftovers of a save that died before
        # publishing anything are gone after the next save)
        new_model.save_pretrained(target)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"], f"step {k}: leftovers {names}"
        assert same_weights(hmt_weights(HMTModel.from_pretrained(target, backbone=old_model.backbone)), new_weights)
        reset()

    reset()
    steps = every_step(lambda: new_model.save_pretrained(target), check, mode)
    assert steps > 8
    assert "new" in outcomes and (("old" in outcomes) if existing else ("nothing" in outcomes))


def test_killed_between_the_renames_the_load_finishes_the_swap(tmp_path, monkeypatch):
    old_model, new_model = small_model(seed=1), small_model(seed=2)
    target = tmp_path / "ck"
    old_model.save_pretrained(target)
    real = os.replace
    calls = []

    def second_rename_dies(src, dst, *a, **kw):
        calls.append((src, dst))
        if pathlib.Path(dst) == target and len(calls) == 2:  # the staging folder's rename into place
            raise Fault(errno.EIO, "injected fault")
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", second_rename_dies)
    monkeypatch.setattr(os, "rename", second_rename_dies)
    with pytest.raises(Fault):
        new_model.save_pretrained(target)
    monkeypatch.undo()
    # the writer's own undo put the old one back
    assert same_weights(hmt_weights(HMTModel.from_pretrained(target, backbone=old_model.backbone)),
                        hmt_weights(old_model))
    # without the undo (a killed writer): the target is missing, the complete staging folder is moved in
    new_model.save_pretrained(target)
    stage = tmp_path / "ck.tmp-abcdefgh"
    (tmp_path / "ck").rename(stage)
    old_model.save_pretrained(tmp_path / "other")
    (tmp_path / "other").rename(tmp_path / "ck.old-abcdefgh")
    marker = json.loads((stage / atomic.MARKER).read_text())
    marker.update(complete=True, old="ck.old-abcdefgh")
    (stage / atomic.MARKER).write_text(json.dumps(marker))
    assert not target.exists()
    # a read-only parent: the recovered copy is read where it is
    monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "read-only")))
    assert atomic.recover(target) == stage
    monkeypatch.undo()
    loaded = HMTModel.from_pretrained(target, backbone=old_model.backbone)
    assert same_weights(hmt_weights(loaded), hmt_weights(new_model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_trainer_checkpoint_killed_at_every_step(tmp_path):
    from hmt_runtime.training.train import TrainConfig, load_checkpoint_state, save_checkpoint

    model = small_model()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    config = TrainConfig(output_dir=str(tmp_path), mode="frozen", window=12, sensory_tokens=2)
    target = tmp_path / "checkpoint"
    save_checkpoint(target, model, opt, sched, [], 1, config)

    def check(k):
        assert load_checkpoint_state(target)["step"] in (1, 2), k
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"], k
        save_checkpoint(target, model, opt, sched, [], 1, config)

    assert every_step(lambda: save_checkpoint(target, model, opt, sched, [], 2, config), check, "exit") > 8


def test_state_save_killed_at_every_step_and_partials_are_cleaned(tmp_path):
    cfg = HMTConfig(**CFG)
    old = MemoryState.empty(cfg, 1, 32, dtype=torch.float64)
    new = old.clone()
    new.memory.fill_(0.5)
    path = tmp_path / "s.safetensors"
    old.save(path, cfg)

    def check(k):
        got = MemoryState.load(path, cfg, width=32, vocab_size=VOCAB)
        assert torch.equal(got.memory, old.memory) or torch.equal(got.memory, new.memory), k
        old.save(path, cfg)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"], k

    assert every_step(lambda: new.save(path, cfg), check, "exit") >= 3


# ------------------------------------------------------------------------------------------------ no data loss
def test_save_never_deletes_foreign_files_or_replaces_a_file(tmp_path):
    model = small_model()
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "notes.txt").write_text("mine")
    (proj / "data").mkdir()
    with pytest.raises(FileExistsError, match=r"'data', 'notes.txt'.*nothing is deleted"):
        model.save_pretrained(proj)
    assert (proj / "notes.txt").read_text() == "mine" and (proj / "data").is_dir()
    # a checkpoint with a user's file added later is refused too
    model.save_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "README.md").write_text("about this run")
    with pytest.raises(FileExistsError, match="README.md"):
        model.save_pretrained(tmp_path / "ck")
    assert (tmp_path / "ck" / "README.md").is_file()
    # onto a regular file, under one
    (tmp_path / "file").write_text("keep")
    with pytest.raises(FileExistsError, match="is a file"):
        model.save_pretrained(tmp_path / "file")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        model.save_pretrained(tmp_path / "file" / "ck")
    assert (tmp_path / "file").read_text() == "keep"
    # an empty folder and an older checkpoint (no marker) are fine to replace
    (tmp_path / "empty").mkdir()
    model.save_pretrained(tmp_path / "empty")
    legacy = tmp_path / "legacy"
    model.save_pretrained(legacy)
    (legacy / atomic.MARKER).unlink()
    model.save_pretrained(legacy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "empty", "file", "legacy", "proj"]


def test_save_refuses_the_current_folder_and_empty_paths(tmp_path, monkeypatch):
    model = small_model()
    monkeypatch.chdir(tmp_path)
    for bad in (".", "", str(tmp_path), "..", "/"):
        with pytest.raises(ValueError, match="save_directory="):
            model.save_pretrained(bad)
    with pytest.raises(TypeError, match="save_directory=None"):
        model.save_pretrained(None)
    assert list(tmp_path.iterdir()) == []


def test_live_saves_and_foreign_lookalikes_are_never_touched(tmp_path):
    model = small_model()
    target = tmp_path / "ck"
    model.save_pretrained(target)
    lookalike = tmp_path / "ck.tmp-zzzzzzzz"  # the pattern, but no marker: not ours
    lookalike.mkdir()
    (lookalike / "x").write_text("x")
    with atomic.staged_dir(target, owned=("hmt_config.json",)) as stage:
        (stage / "hmt_config.json").write_text("{}")
        atomic.recover(target)  # e.g. a load in another thread while this save runs
        assert stage.is_dir() and (stage / atomic.MARKER).is_file()
    model.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "ck.tmp-zzzzzzzz"]


# ------------------------------------------------------------------------------------------------ validation
def tamper(path, **changes):
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
    for name, value in changes.items():
        tensors[name] = value
    meta.pop("sha256", None)  # as an edit by hand would
    save_file(tensors, path, metadata=meta)


def test_damaged_states_are_refused_with_the_field_named(tmp_path):
    cfg = HMTConfig(**CFG)
    state = MemoryState.empty(cfg, 2, 32, dtype=torch.float64)
    state.started[:] = True
    state.segment_len[:] = 3
    path = tmp_path / "s.safetensors"
    cases = [
        (dict(segment_len=torch.tensor([3, 9])), r"'segment_len' holds 9; expected values in \[0, 8\]"),
        (dict(sensory_len=torch.tensor([-1, 0])), r"'sensory_len' holds -1"),
        (dict(segment_ids=torch.full((2, 8), VOCAB)), rf"'segment_ids' holds token id {VOCAB}; expected ids in \[0, {VOCAB}\)"),
        (dict(memory=torch.full((2, 3, 32), float("nan"), dtype=torch.float64)), "'memory' holds NaN"),
        (dict(recalled=torch.full((2, 32), float("inf"), dtype=torch.float64)), "'recalled' holds NaN or infinite"),
        (dict(keys=torch.zeros(2, 3, 15, dtype=torch.float64)), r"'keys' has shape \(2, 3, 15\); expected \(B, N, d_h\)"),
        (dict(written=torch.zeros(3, dtype=torch.long)), r"'written' has shape \(3,\)"),
        (dict(started=torch.tensor([True, False])), "row 1 has segment_len=3 but started=False"),
        (dict(started=torch.tensor([1, 1])), "'started' has dtype torch.int64; expected torch.bool"),
        (dict(tail_ids=torch.zeros(2, 4)), "'tail_ids' has dtype torch.float32; expected an integer"),
    ]
    for changes, message in cases:
        state.save(path, cfg)
        MemoryState.load(path, cfg, width=32, vocab_size=VOCAB)  # the untouched file loads
        tamper(path, **changes)
        with pytest.raises(ValueError, match=message):
            MemoryState.load(path, cfg, width=32, vocab_size=VOCAB)
        assert str(path) in str(pytest.raises(ValueError, MemoryState.load, path, cfg, width=32, vocab_size=VOCAB).value)
    # without a config the state's own buffer sizes bound its lengths
    state.save(path)
    tamper(path, segment_len=torch.tensor([3, 9]))
    with pytest.raises(ValueError, match="'segment_len' holds 9"):
        MemoryState.load(path)
    # a missing field, a flipped byte (checksummed), not a state at all
    state.save(path, cfg)
    tensors = load_file(path)
    del tensors["tail_len"]
    save_file(tensors, path, metadata={"format": "hmt-memory-state"})
    with pytest.raises(ValueError, match=r"\['tail_len'\] are missing"):
        MemoryState.load(path)
    state.save(path, cfg)
    flip_last_data_byte(path)
    with pytest.raises(ValueError, match="checksum"):
        MemoryState.load(path)
    # validate() is usable directly (the scheduler's check of a state handed to it)
    good = MemoryState.empty(cfg, 1, 32)
    assert good.validate(cfg, width=32, vocab_size=VOCAB) is good
    with pytest.raises(ValueError, match=r"state: field 'memory' has shape \(1, 3, 32\); expected \(B, N, d\) = \(1, 3, 24\)"):
        good.validate(cfg, width=24)


def flip_last_data_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def test_state_paths_are_checked(tmp_path, monkeypatch):
    cfg = HMTConfig(**CFG)
    state = MemoryState.empty(cfg, 1, 32)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IsADirectoryError, match=r"MemoryState.load\('.'\): is a folder"):
        MemoryState.load(".")
    with pytest.raises(ValueError, match="path='': expected a file path"):
        state.save("")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        state.save(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        state.save(tmp_path / "no" / "s.safetensors")
    with pytest.raises(FileNotFoundError, match="no such file"):
        MemoryState.load("missing.safetensors")
    with pytest.raises(TypeError, match="path=None"):
        MemoryState.load(None)


def test_damaged_checkpoints_are_refused_with_file_and_field(tmp_path):
    model = small_model()
    ck = tmp_path / "ck"
    model.save_pretrained(ck)
    meta = json.loads((ck / CONFIG_NAME).read_text())

    def with_config(**changes):
        data = dict(meta)
        for key, value in changes.items():
            if value is None:
                data.pop(key)
            else:
                data[key] = value
        (ck / CONFIG_NAME).write_text(json.dumps(data))
        return pytest.raises(ValueError, HMTModel.from_pretrained, ck, backbone=model.backbone).value

    assert 'field "hmt" (the HMT config) is missing' in str(with_config(hmt=None))
    err = str(with_config(hmt={**meta["hmt"], "segment_tokens": -1}))
    assert CONFIG_NAME in err and 'field "hmt"' in err and "segment_tokens=-1: expected an integer >= 1" in err
    assert "unknown fields ['colour']" in str(with_config(hmt={**meta["hmt"], "colour": 1}))
    assert 'field "version" is 7' in str(with_config(version=7))
    assert 'field "adapter" is \'../x\'' in str(with_config(adapter="../x"))
    assert 'field "backbone.width" is \'wide\'' in str(with_config(backbone={"width": "wide"}))
    (ck / CONFIG_NAME).write_text(json.dumps(meta))
    HMTModel.from_pretrained(ck, backbone=model.backbone)
    # a flipped byte in the weights is caught by the checksum; NaN is refused even without one
    good = (ck / WEIGHTS_NAME).read_bytes()
    flip_last_data_byte(ck / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="does not match its recorded sha256 checksum"):
        HMTModel.from_pretrained(ck, backbone=model.backbone)
    (ck / WEIGHTS_NAME).write_bytes(good)
    tamper(ck / WEIGHTS_NAME, memory_init=torch.full((1, 32), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="'memory_init' holds 32 NaN or infinite"):
        HMTModel.from_pretrained(ck, backbone=model.backbone)
    # files without checksums (older checkpoints) still load
    (ck / WEIGHTS_NAME).write_bytes(good)
    tamper(ck / WEIGHTS_NAME)
    loaded = HMTModel.from_pretrained(ck, backbone=model.backbone)
    assert same_weights(hmt_weights(loaded), hmt_weights(model))
    # a diverged model is not saved over a good checkpoint
    with torch.no_grad():
        model.summary_prompt[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'summary_prompt' holds NaN"):
        model.save_pretrained(ck)
    assert (ck / WEIGHTS_NAME).is_file()


def test_from_pretrained_arguments(tmp_path, monkeypatch):
    with pytest.raises(TypeError, match="name_or_path=None: expected 'default' or a checkpoint folder"):
        HMTModel.from_pretrained(None)
    with pytest.raises(ValueError, match="name_or_path='': expected"):
        HMTModel.from_pretrained("")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HMTModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(TypeError, match="dtype='half'"):
        HMTModel.from_pretrained(tmp_path, dtype="half")
    with pytest.raises(TypeError, match="expected a JSON object"):
        HMTConfig.from_dict(["segment_tokens", 8])


def test_trainer_state_missing_or_wrong_fields(tmp_path):
    from hmt_runtime.training.train import STATE_NAME, load_checkpoint_state

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    full = {"format": "hmt-trainer-state", "step": 3, "trainable": {"a": torch.zeros(2)}, "optimizer":
            {"state": {}, "param_groups": []}, "scheduler": {}, "rng": {"torch": torch.get_rng_state(), "python": 1},
            "samplers": [{}, {}], "train_config": "{}", "hmt_config": "{}", "backbone": "{}"}
    torch.save(full, folder / STATE_NAME)
    assert load_checkpoint_state(folder)["step"] == 3
    for key in ("step", "rng", "optimizer", "samplers", "hmt_config"):
        torch.save({k: v for k, v in full.items() if k != key}, folder / STATE_NAME)
        with pytest.raises(ValueError, match=f"has no field '{key}'"):
            load_checkpoint_state(folder)
    for key, value, message in (("step", -1, "'step' is -1"), ("step", "3", "'step' is a str"),
                                ("backbone", "{nope", "'backbone' is not valid JSON"),
                                ("trainable", {"a": torch.tensor([float("nan")])}, "'a' holds NaN"),
                                ("optimizer", {"state": {}}, "'optimizer' has no 'param_groups'")):
        torch.save({**full, key: value}, folder / STATE_NAME)
        with pytest.raises(ValueError, match=message):
            load_checkpoint_state(folder)


# ------------------------------------------------------------------------------------------------ arguments
def test_eos_token_id_check():
    assert check_eos_token_id(None, VOCAB) == set()
    assert check_eos_token_id(61, VOCAB) == {61}
    assert check_eos_token_id([3, 4, 3], VOCAB) == {3, 4}
    assert check_eos_token_id(torch.tensor([5, 6]), VOCAB) == {5, 6}
    for bad, kind in (("61", TypeError), (2.7, TypeError), ([1, 2.0], TypeError), (True, TypeError),
                      ([1, None], TypeError), (torch.tensor([1.0]), TypeError), (VOCAB, ValueError), ([-1], ValueError)):
        with pytest.raises(kind, match="eos_token_id"):
            check_eos_token_id(bad, VOCAB)
    with pytest.raises(TypeError, match="'61'"):
        check_eos_token_id("61", VOCAB)


def test_text_with_a_lone_surrogate():
    assert check_text("ok") == "ok"
    with pytest.raises(ValueError, match="prompt: not valid Unicode text.*position 2 is a lone surrogate"):
        check_text("ab\udcff")


def test_forward_labels_and_masks_are_checked():
    model = small_model()
    ids = torch.randint(0, VOCAB, (2, 10))
    labels = ids.clone()
    labels[1, 4] = VOCAB + 5
    with pytest.raises(ValueError, match=rf"labels: id {VOCAB + 5} at position \(1, 4\) is outside the vocabulary"):
        model(ids, labels=labels)
    with pytest.raises(TypeError, match="labels: expected an integer tensor"):
        model(ids, labels=ids.double())
    labels[1, 4] = -100
    assert model(ids, labels=labels).loss is not None
    mask = torch.ones(2, 10)
    mask[0, 9] = 0.5
    with pytest.raises(ValueError, match=r"attention_mask: value 0.5 at position \(0, 9\); expected only 0"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"attention_mask: expected a tensor of shape \(2, 10\)"):
        model(ids, attention_mask=torch.ones(2, 9))


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_window_beyond_learned_positions_is_refused_at_construction(family):
    backbone = tiny_backbone(family)  # 512 positions
    HMTModel(backbone, HMTConfig.from_window(512, sensory_tokens=2, recall_dim=16))
    with pytest.raises(ValueError, match=r"config.window=513 .*expected at most 512"):
        HMTModel(backbone, HMTConfig.from_window(513, sensory_tokens=2, recall_dim=16))
    HMTModel(tiny_backbone("llama"), HMTConfig.from_window(4096, sensory_tokens=2, recall_dim=16))  # rotary: no limit


# ------------------------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny llama with a character-level tokenizer whose decode concatenates (so text round-trips)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("bb")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, " ": 3, "\n": 4}
    for code in range(33, 33 + VOCAB - len(vocab)):
        vocab[chr(code)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    tiny_backbone("llama", 0, dtype=torch.float32).save_pretrained(folder)
    return folder


def run_cli(args, capsys):
    from hmt_runtime.cli import main

    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


FRESH = ["--window", "12", "--sensory-tokens", "2", "--memory-slots", "4", "--kernels", "torch"]


def test_cli_bad_values_are_one_line_errors(tmp_path, capsys, model_folder):
    cases = [
        (["generate", "--prompt", "x", "--threads", "-1"], "--threads: -1: expected an integer >= 1"),
        (["generate", "--prompt", "x", "--threads", "many"], "'many' is not an integer"),
        (["generate", "--prompt", "x", "--prompt-tokens", "0"], "--prompt-tokens: 0: expected an integer >= 1"),
        (["generate", "--prompt", "x", "--prompt-tokens", "-2"], "--prompt-tokens: -2"),
        (["generate", "--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens: -1"),
        (["generate", "--prompt", "ab\udcff", "--model", str(model_folder)], "lone surrogate"),
        (["generate", "--prompt-file", str(tmp_path / "none.txt")], "cannot read --prompt-file"),
        (["generate", "--prompt", "x", "--model", str(tmp_path / "none")], "does not exist"),
        (["info", "--model", str(model_folder), "--window", "2"], "--window: 2: expected an integer >= 3"),
    ]
    for args, message in cases:
        try:  # argparse's own checks end with SystemExit(2)
            code, out, err = run_cli(args, capsys)
        except SystemExit as exit_:
            code, (out, err) = exit_.code, capsys.readouterr()
        assert code == 2, (args, err)
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)


def test_cli_serve_without_the_server_libraries_is_a_one_line_error(monkeypatch, capsys, model_folder):
    import sys

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "hmt_runtime.serving.server", raising=False)
    code, _, err = run_cli(["serve", "--model", str(model_folder), "--port", "0"], capsys)
    assert code == 2 and "needs 'fastapi'" in err and "pip install" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_checkpoint_and_output_dir_errors(tmp_path, capsys, model_folder):
    model = small_model()
    ck = tmp_path / "ck"
    model.save_pretrained(ck)
    meta = json.loads((ck / CONFIG_NAME).read_text())
    del meta["hmt"]
    (ck / CONFIG_NAME).write_text(json.dumps(meta))
    code, _, err = run_cli(["info", "--model", str(ck)], capsys)
    assert code == 2 and 'field "hmt"' in err and err.count("\n") == 1
    (tmp_path / "file").write_text("x")
    texts = tmp_path / "t.txt"
    texts.write_text("the cat sat on the mat " * 20)
    code, _, err = run_cli(["train", str(texts), "--backbone", str(model_folder), "--output-dir",
                            str(tmp_path / "file" / "run"), "--threads", "-3"], capsys)
    assert code == 2 and "--threads -3" in err and err.count("\n") == 1
    code, _, err = run_cli(["train", str(texts), "--backbone", str(model_folder), "--output-dir",
                            str(tmp_path / "file" / "run")], capsys)
    assert code == 2 and "is a file, not a folder" in err and err.count("\n") == 1
    assert (tmp_path / "file").read_text() == "x"


def test_cli_generate_echoes_the_whole_prompt(capsys, model_folder):
    for prompt in ("Hello, world!", "Z"):
        code, out, err = run_cli(["generate", "--prompt", prompt, "--model", str(model_folder), "--max-new-tokens",
                                  "5", *FRESH], capsys)
        assert code == 0, err
        assert out.startswith(prompt) and len(out.rstrip("\n")) > len(prompt), out
    code, out, _ = run_cli(["generate", "--prompt", "abcdefgh", "--prompt-tokens", "3", "--model",
                            str(model_folder), "--max-new-tokens", "0", *FRESH], capsys)
    assert code == 0 and out == "abc\n"
    code, out2, _ = run_cli(["generate", "--prompt", "abcdefgh", "--prompt-tokens", "3", "--model",
                             str(model_folder), "--max-new-tokens", "4", "--stream", *FRESH], capsys)
    code, out3, _ = run_cli(["generate", "--prompt", "abcdefgh", "--prompt-tokens", "3", "--model",
                             str(model_folder), "--max-new-tokens", "4", *FRESH], capsys)
    assert out2 == out3 and out2.startswith("abc")


def test_cli_broken_pipe_ends_quietly(model_folder):
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "hmt_runtime.cli", "generate", "--prompt", "a b c", "--model",
                             str(model_folder), "--max-new-tokens", "300", "--stream", *FRESH],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.read(1) == b"a"
    proc.stdout.close()  # as `| head -c 1` does
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=300)
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    assert code == 141, err
