"""The trainer on tiny random backbones: objective, exact resume, DDP equivalence, bad input, and a task that
needs memory."""
import random

import pytest
import torch
import torch.multiprocessing as mp

from hmt_runtime import HMTConfig, HMTModel
from hmt_runtime.training.data import Windows, WindowSampler, as_documents, read_text, text_files, tokenize_files
from hmt_runtime.training.objective import LastSegmentLoss, distillation_kl, segment_checkpointing, teacher_topk
from hmt_runtime.training.train import TrainConfig, load_checkpoint_state, save_checkpoint, train
from tiny import VOCAB, tiny_backbone

SEGMENT, SENSORY = 8, 2  # W = 12


def tiny_model(family="llama", seed=0, dtype=torch.float64, segment=SEGMENT, sensory=SENSORY):
    cfg = HMTConfig(segment_tokens=segment, sensory_tokens=sensory, summary_tokens=4, memory_slots=4,
                    recall_dim=16, recall="causal", kernels="torch")
    torch.manual_seed(seed)
    model = HMTModel(tiny_backbone(family, seed, dtype=dtype), cfg)
    return model.to(dtype)


def tiny_config(tmp, **kw):
    base = dict(output_dir=str(tmp), window=SEGMENT + SENSORY + 2, sensory_tokens=SENSORY, memory_slots=4,
                recall_dim=16, stage1_steps=2, stage2_steps=3, stage2_segments=3, batch_size=2, lr=1e-2,
                lr_step=2, lr_gamma=0.5, checkpoint_every=2, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def corpus(seed=0, docs=3, length=70):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (docs, length), generator=gen)


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class CharTokenizer:
    """Stand-in for a tokenizer: one id per character."""

    def __call__(self, text, add_special_tokens=False):
        return type("Encoding", (), {"input_ids": [ord(c) % VOCAB for c in text]})()


# ------------------------------------------------------------------------------------------------ objective
@pytest.mark.parametrize("loss_on", ["last_segment", "after_first", "all"])
def test_the_objective_scores_what_the_forward_scores(loss_on):
    """One set of loss_on choices (core.segment.loss_start) for the forward and the training objective."""
    model = tiny_model()
    for length in (3 * SEGMENT, 2 * SEGMENT + 3, SEGMENT - 2):
        ids = corpus(1, docs=2, length=length)
        expected = model(ids, labels=ids, loss_on=loss_on).loss
        assert torch.allclose(LastSegmentLoss(model, loss_on)(ids, True), expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="loss_on='every'"):
        LastSegmentLoss(model, "every")
    with pytest.raises(ValueError, match="loss_on='every'"):
        model(ids, labels=ids, loss_on="every")


def test_last_segment_loss_equals_model_loss_and_checkpointing_keeps_gradients():
    model = tiny_model()
    ids = corpus(1, docs=2, length=3 * SEGMENT)
    expected = model(ids, labels=ids, use_recall=True, loss_on="last_segment").loss
    objective = LastSegmentLoss(model)
    loss = objective(ids, True)
    assert torch.allclose(loss, expected, rtol=1e-12, atol=0)
    loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with segment_checkpointing(model, True):
        objective(ids, True).backward()
    assert "run_backbone" not in vars(model)  # the override is removed again
    again = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert set(again) == set(plain) and "recall.w_q.weight" in plain
    for name in plain:
        assert torch.allclose(again[name], plain[name], rtol=1e-9, atol=1e-12), name


def test_modes_choose_trainable_parameters(tmp_path):
    for mode, expect_backbone, expect_lora in (("frozen", False, False), ("full", True, False), ("lora", False, True)):
        model = train(tiny_config(tmp_path / mode, mode=mode, stage1_steps=1, stage2_steps=0),
                      model=tiny_model(), corpus=corpus(), progress=False)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert "summary_prompt" in names and "recall.w_k.weight" in names
        assert any(n.startswith("backbone.") and "lora_" not in n for n in names) == expect_backbone, mode
        assert any("lora_" in n for n in names) == expect_lora, mode
        assert (tmp_path / mode / "final" / "hmt.safetensors").is_file()
        assert ((tmp_path / mode / "final" / "adapter").is_dir()) == expect_lora


def test_training_lowers_the_loss_and_logs(tmp_path):
    losses = []
    data = torch.arange(40).repeat(4)[None] % VOCAB  # a periodic text: easy to learn
    train(tiny_config(tmp_path, mode="full", stage1_steps=0, stage2_steps=40, lr=5e-3, lr_step=100,
                      checkpoint_every=100),
          model=tiny_model(), corpus=data, progress=False, on_step=lambda step, loss: losses.append(loss))
    assert len(losses) == 40 and sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    log = (tmp_path / "train.log").read_text().splitlines()
    assert log[0].startswith("# start") and len(log) == 41
    assert all(f in log[-1] for f in ("step 40/40", "loss", "ppl", "tok/s", "lr"))


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("mode,extra", [("full", {}), ("lora", {}),
                                        ("lora", dict(distill_weight=0.5, loss_on="after_first", hmt_lr_scale=5.0))])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, mode, extra):
    data = corpus()
    whole = train(tiny_config(tmp_path / "whole", mode=mode, **extra), model=tiny_model(), corpus=data, progress=False)

    def crash(step, loss):
        if step == 3:
            raise KeyboardInterrupt  # after the checkpoint of step 2 and one more step
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "cut", mode=mode, **extra), model=tiny_model(), corpus=data, progress=False,
              on_step=crash)
    assert load_checkpoint_state(tmp_path / "cut" / "checkpoint")["step"] == 2
    torch.manual_seed(999)  # the resumed run must restore every RNG itself
    resumed = train(tiny_config(tmp_path / "cut", mode=mode, **extra), model=tiny_model(), corpus=data,
                    progress=False, resume=True)
    a, b = trainable(whole), trainable(resumed)
    assert set(a) == set(b) and len(a) >= 4
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert load_checkpoint_state(tmp_path / "cut" / "checkpoint")["step"] == 5
    assert not torch.equal(a["summary_prompt"], trainable(tiny_model())["summary_prompt"])  # it did train


def test_resume_errors_and_checkpoints_are_never_damaged(tmp_path, monkeypatch):
    data = corpus()
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        train(tiny_config(tmp_path / "none"), model=tiny_model(), corpus=data, resume=True, progress=False)
    train(tiny_config(tmp_path / "run", stage1_steps=1, stage2_steps=1), model=tiny_model(), corpus=data,
          progress=False)
    ckpt = tmp_path / "run" / "checkpoint"
    before = (ckpt / "trainer_state.pt").read_bytes()
    # a fresh run into the same folder refuses instead of replacing the checkpoint
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train(tiny_config(tmp_path / "run"), model=tiny_model(), corpus=data, progress=False)
    # a checkpoint of another backbone family
    with pytest.raises(ValueError, match="another backbone"):
        train(tiny_config(tmp_path / "run", stage2_steps=2), model=tiny_model("qwen2"), corpus=data, resume=True,
              progress=False)
    # a save that fails half-way leaves the old checkpoint as it was
    model = tiny_model()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("hmt_runtime.training.train.torch.save", broken_save)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(ckpt, model, opt, torch.optim.lr_scheduler.StepLR(opt, 1), [], 7, tiny_config(tmp_path))
    monkeypatch.undo()
    assert (ckpt / "trainer_state.pt").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint", "final", "train.log"]
    # a damaged checkpoint
    (ckpt / "trainer_state.pt").write_bytes(before[: len(before) // 2])
    with pytest.raises(ValueError, match="corrupted"):
        train(tiny_config(tmp_path / "run"), model=tiny_model(), corpus=data, resume=True, progress=False)


# ------------------------------------------------------------------------------------------------ data
def test_bad_text_and_short_corpus_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        read_text(empty)
    with pytest.raises(ValueError, match="latin.txt.*not UTF-8"):
        read_text(latin)
    with pytest.raises(FileNotFoundError, match="nope"):
        text_files([tmp_path / "nope"])
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="no text file"):
        text_files(tmp_path / "folder")
    short = tmp_path / "folder" / "short.txt"
    short.write_text("A short text.")
    model = tiny_model()
    model.tokenizer = CharTokenizer()
    with pytest.raises(ValueError, match="shorter than one training window"):
        train(tiny_config(tmp_path / "out", data=[str(tmp_path / "folder")]), model=model, progress=False)
    with pytest.raises(ValueError, match="not UTF-8"):
        train(tiny_config(tmp_path / "out", data=[str(latin)]), model=model, progress=False)
    assert not (tmp_path / "out" / "checkpoint").exists()
    docs = tokenize_files(tmp_path / "folder", CharTokenizer())
    assert len(docs) == 1 and docs[0].tolist() == [ord(c) % VOCAB for c in "A short text."]


def test_windows_cover_each_segment_once_as_last_and_sampler_resumes():
    docs = as_documents([torch.arange(50), torch.arange(100, 120)])
    win = Windows.build(docs, segment_tokens=8, segments=3)
    # doc 0: windows of 24 tokens start at 0, 8, 16, 24; doc 1 (20 tokens) is too short for one
    assert win.starts.tolist() == [[0, 0], [0, 8], [0, 16], [0, 24]]
    assert win.batch([3]).tolist() == [list(range(24, 48))]
    sampler = WindowSampler(len(win), batch_size=3, seed=1)
    first = [sampler.next_batch() for _ in range(2)]
    saved = sampler.state_dict()
    rest = [sampler.next_batch() for _ in range(3)]
    other = WindowSampler(len(win), batch_size=3, seed=1)
    other.load_state_dict(saved)
    assert [other.next_batch() for _ in range(3)] == rest
    assert sorted(first[0] + first[1][:1]) == [0, 1, 2, 3]  # an epoch is a permutation


# ------------------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank, out_dir, init_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        train(tiny_config(out_dir, mode="full", stage1_steps=1, stage2_steps=1), model=tiny_model(),
              corpus=corpus(), progress=False)
    finally:
        dist.destroy_process_group()


def test_gloo_two_process_run_equals_single_process(tmp_path):
    single = train(tiny_config(tmp_path / "single", mode="full", stage1_steps=1, stage2_steps=1),
                   model=tiny_model(), corpus=corpus(), progress=False)
    mp.spawn(_ddp_worker, args=(str(tmp_path / "ddp"), str(tmp_path / "init")), nprocs=2, join=True)
    ddp = load_checkpoint_state(tmp_path / "ddp" / "checkpoint")
    assert ddp["step"] == 2
    expected = trainable(single)
    assert set(ddp["trainable"]) == set(expected)
    initial = trainable(tiny_model())
    for name, value in expected.items():
        assert torch.allclose(ddp["trainable"][name], value, rtol=1e-9, atol=1e-12), name
    assert not torch.equal(expected["memory_init"], initial["memory_init"])


# ------------------------------------------------------------------------------------------------ memory task
KEYS = 8  # chance = 1/8
FILL, QUERY = 3, 4


def copy_task(n, seed):
    """3 segments of 8 tokens: the key sits in segment 0; the last token of segment 2 must repeat it.

    With 2 sensory tokens, segment 2 sees nothing of segment 0 except through memory."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randint(10, 10 + KEYS, (n,), generator=gen)
    ids = torch.full((n, 3 * SEGMENT), FILL)
    ids[:, 1] = keys
    ids[:, -2] = QUERY
    ids[:, -1] = keys
    return ids


def accuracy(logits, ids):
    return float((logits[:, -2].argmax(-1) == ids[:, -1]).double().mean())


def test_memory_solves_a_task_two_segments_back_where_plain_windows_cannot(tmp_path, one_thread):
    test = copy_task(256, seed=1)
    model = train(tiny_config(tmp_path, mode="full", stage1_steps=0, stage2_steps=500, stage2_segments=3,
                              batch_size=16, lr=2e-3, lr_step=100, lr_gamma=0.7, checkpoint_every=1000),
                  model=tiny_model(dtype=torch.float32), corpus=copy_task(4000, seed=0), progress=False)
    with torch.no_grad():
        hmt_acc = accuracy(model(test).logits, test)
    # no memory: the backbone alone on the last W tokens (segment 2 and the tail of segment 1, never the key)
    torch.manual_seed(0)
    backbone = tiny_backbone("llama", 0, dtype=torch.float32).train()
    opt = torch.optim.AdamW(backbone.parameters(), lr=2e-3)
    train_ids = copy_task(4000, seed=0)[:, -(SEGMENT + SENSORY + 2):]
    for step in range(500):
        batch = train_ids[torch.randint(0, len(train_ids), (16,))]
        loss = backbone(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        window_acc = accuracy(backbone(input_ids=test[:, -(SEGMENT + SENSORY + 2):]).logits, test)
    assert hmt_acc > 0.9, hmt_acc
    assert window_acc < 0.35, window_acc


# ------------------------------------------------------------------------------------------------ command line
def save_tiny_backbone_with_tokenizer(folder):
    """A tiny llama and a character-level tokenizer (97 ids) saved as a transformers model folder."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, " ": 3, "\n": 4}
    for code in range(33, 33 + VOCAB - len(vocab)):
        vocab[chr(code)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    tiny_backbone("llama", 0, dtype=torch.float32).save_pretrained(folder)


def test_hmt_train_and_eval_commands(tmp_path, capsys):
    import json

    from hmt_runtime.cli import main

    save_tiny_backbone_with_tokenizer(tmp_path / "bb")
    texts = tmp_path / "texts"
    texts.mkdir()
    rng = random.Random(0)
    for name in ("a.txt", "b.txt"):
        words = [rng.choice(["the", "cat", "sat", "on", "a", "mat.", "It", "was", "warm."]) for _ in range(60)]
        (texts / name).write_text(" ".join(words))
    out = tmp_path / "run"
    common = ["--backbone", str(tmp_path / "bb"), "--output-dir", str(out), "--window", "12", "--sensory-tokens", "2",
              "--memory-slots", "4", "--recall-dim", "16", "--stage1-steps", "1", "--stage2-steps", "2",
              "--stage2-segments", "3", "--mode", "lora", "--checkpoint-every", "1", "--no-progress"]
    assert main(["train", str(texts), *common]) == 0
    assert (out / "final" / "adapter").is_dir()
    assert load_checkpoint_state(out / "checkpoint")["step"] == 3
    # extending a finished run: resume continues at step 3 and only adds the new steps
    more = [a if a != "2" or common[i - 1] != "--stage2-steps" else "4" for i, a in enumerate(common)]
    assert main(["train", str(texts), *more, "--resume"]) == 0
    log = (out / "train.log").read_text()
    assert "resumed at step 3" in log and "step 5/5" in log and log.count("step 4/5") == 1
    capsys.readouterr()
    result_file = tmp_path / "eval.json"
    assert main(["eval", str(texts / "a.txt"), "--model", str(out / "final"), "--max-tokens", "100",
                 "--methods", "hmt", "windows", "adapted-windows", "--json", str(result_file), "--no-progress"]) == 0
    table = capsys.readouterr().out
    result = json.loads(result_file.read_text())
    assert result["tokens"] == 99 and set(result["methods"]) == {"hmt", "windows", "adapted-windows"}
    assert "| HMT, window 12" in table and "| backbone, non-overlapping windows of 12 |" in table
    assert main(["eval", str(tmp_path / "missing.txt"), "--model", str(out / "final")]) == 2


# ------------------------------------------------------------------------------------------ distillation, groups
def test_after_first_loss_and_distillation_terms():
    model = tiny_model()
    ids = corpus(2, docs=2, length=3 * SEGMENT + 3)  # a short last segment
    logits = model(ids, use_recall=True).logits
    expected_ce = torch.nn.functional.cross_entropy(logits[:, SEGMENT:-1].reshape(-1, VOCAB),
                                                    ids[:, SEGMENT + 1 :].reshape(-1))
    parts = {}
    assert torch.allclose(LastSegmentLoss(model, "after_first")(ids, True, parts=parts), expected_ce, rtol=1e-12)
    assert torch.allclose(parts["ce"], expected_ce, rtol=1e-12) and "kl" not in parts
    # the teacher: the backbone alone over the whole window, top-k of its log-softmax
    with torch.no_grad():
        full = torch.log_softmax(model.backbone(input_ids=ids).logits, -1)
    values, index = teacher_topk(model, ids, k=VOCAB)
    assert values.shape == (2, ids.shape[1], VOCAB)
    assert torch.allclose(values, full.gather(-1, index), rtol=1e-12, atol=1e-12)
    assert torch.allclose(values[..., 0], full.max(-1).values, rtol=1e-12)
    # with k = V the KL term is the exact KL divergence; smaller k renormalises the teacher's top-k
    exact = torch.nn.functional.kl_div(torch.log_softmax(logits[:, SEGMENT:-1], -1), full[:, SEGMENT:-1],
                                       log_target=True, reduction="none").sum(-1).mean()
    parts = {}
    loss = LastSegmentLoss(model, "after_first")(ids, True, (values, index), 0.5, parts)
    assert torch.allclose(parts["kl"], exact, rtol=1e-10)
    assert torch.allclose(loss, expected_ce + 0.5 * exact, rtol=1e-10)
    v5, i5 = teacher_topk(model, ids, k=5)
    p = torch.softmax(v5, -1)
    q = torch.log_softmax(logits, -1).gather(-1, i5)
    approx = (p * (p.log() - q))[:, SEGMENT:-1].sum(-1).mean()
    assert torch.allclose(distillation_kl(logits[:, SEGMENT:-1], v5[:, SEGMENT:-1], i5[:, SEGMENT:-1]), approx,
                          rtol=1e-10)
    assert float(distillation_kl(full, full.topk(5, -1).values, full.topk(5, -1).indices)) > -1e-12


def test_distillation_on_answer_batches_stops_at_each_rows_last_label():
    model = tiny_model()
    ids = corpus(2, docs=2, length=3 * SEGMENT - 2)
    labels = torch.full_like(ids, -100)
    labels[0, 2 * SEGMENT + 1 : 2 * SEGMENT + 4] = ids[0, 2 * SEGMENT + 1 : 2 * SEGMENT + 4]  # row 0: padding after
    labels[1, 2 * SEGMENT + 5 : 2 * SEGMENT + 7] = ids[1, 2 * SEGMENT + 5 : 2 * SEGMENT + 7]
    values, index = teacher_topk(model, ids, k=VOCAB)
    parts = {}
    loss = LastSegmentLoss(model)(ids, True, (values, index), 0.25, parts, labels=labels)
    logits = model(ids, use_recall=True).logits
    first = 2 * SEGMENT  # the segment predicting the first label
    ce = torch.nn.functional.cross_entropy(logits[:, first:-1].reshape(-1, VOCAB), labels[:, first + 1 :].reshape(-1))
    full = values.gather(-1, index.argsort(-1))  # the teacher's log-probs in vocabulary order (k = V)
    kl = torch.nn.functional.kl_div(torch.log_softmax(logits[:, first:-1], -1), full[:, first:-1],
                                    log_target=True, reduction="none").sum(-1)
    # positions first .. last label - 1 of each row predict its prompt and answer; those after it are padding
    expected_kl = torch.cat([kl[0, : 2 * SEGMENT + 3 - first], kl[1, : 2 * SEGMENT + 6 - first]]).mean()
    assert torch.allclose(parts["ce"], ce, rtol=1e-10)
    assert torch.allclose(parts["kl"], expected_kl, rtol=1e-10)
    assert not torch.allclose(parts["kl"], kl.mean(), rtol=1e-3)  # the padding would have counted
    assert torch.allclose(loss, ce + 0.25 * expected_kl, rtol=1e-10)
    with pytest.raises(ValueError, match="retrieval_distill"):
        TrainConfig(retrieval_distill=-1.0)


def test_hmt_learning_rate_scale_and_option_errors(tmp_path):
    model = tiny_model()
    seen = {}

    def record(step, loss):
        pass
    cfg = tiny_config(tmp_path / "g", mode="lora", hmt_lr_scale=10.0, stage1_steps=1, stage2_steps=0)
    train(cfg, model=model, corpus=corpus(), progress=False, on_step=record)
    state = load_checkpoint_state(tmp_path / "g" / "checkpoint")
    groups = state["optimizer"]["param_groups"]
    assert len(groups) == 2
    assert groups[0]["lr"] == pytest.approx(10 * groups[1]["lr"])
    assert len(groups[0]["params"]) == 2  # W_q, W_k
    # recall_init_scale multiplies W_q and W_k before training (stage 1 has no recall: they get no gradient)
    model = tiny_model()
    w_q, w_k = model.recall.w_q.weight.detach().clone(), model.recall.w_k.weight.detach().clone()
    train(tiny_config(tmp_path / "s", recall_init_scale=0.25, stage1_steps=2, stage2_steps=0), model=model,
          corpus=corpus(), progress=False)
    assert torch.allclose(model.recall.w_q.weight, 0.25 * w_q, rtol=1e-12)
    assert torch.allclose(model.recall.w_k.weight, 0.25 * w_k, rtol=1e-12)
    for kw, match in ((dict(loss_on="every"), "loss_on"), (dict(distill_weight=-1.0), "distill_weight"),
                      (dict(recall_init_scale=0.0), "recall_init_scale"),
                      (dict(distill_top_k=0), "distill_top_k"), (dict(hmt_lr_scale=0.0), "hmt_lr_scale")):
        with pytest.raises(ValueError, match=match):
            tiny_config(tmp_path, **kw)


def test_recall_max_norm_caps_the_spectral_norm_of_w_q_and_w_k(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.recall.w_q.weight.mul_(50.0)  # far above the cap: scaled down before the first step
    cap = 0.2
    seen = []

    def record(step, loss):
        seen.append([float(torch.linalg.matrix_norm(w.detach(), ord=2))
                     for w in (model.recall.w_q.weight, model.recall.w_k.weight)])
    train(tiny_config(tmp_path / "c", recall_max_norm=cap, stage1_steps=0, stage2_steps=3, lr=0.5), model=model,
          corpus=corpus(), progress=False, on_step=record)
    assert len(seen) == 3
    for norms in seen:
        assert all(n <= cap * (1 + 1e-9) for n in norms), norms
    assert any(n > 0.5 * cap for n in seen[-1])  # a cap, not a collapse
    for value in (0.0, -1.0, True):
        with pytest.raises(ValueError, match="recall_max_norm"):
            tiny_config(tmp_path, recall_max_norm=value)


def test_lora_targets_all_extends_an_attention_adapter_without_changing_the_function(tmp_path):
    from hmt_runtime.training.train import apply_mode

    model = apply_mode(tiny_model(), "lora", 2)
    with torch.no_grad():
        for name, param in model.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    kept = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if "lora_" in n}
    assert not any("mlp" in n for n in kept)
    ids = corpus(2, docs=2, length=3 * SEGMENT)
    model.eval()
    before = model(ids).logits
    apply_mode(model, "lora", 2, "all")
    after = model(ids).logits
    assert torch.equal(before, after)  # the new MLP adapters start at B = 0
    now = {n: p for n, p in model.backbone.named_parameters() if "lora_" in n}
    for name, value in kept.items():
        assert torch.equal(now[name], value), name
    mlp = [n for n in now if ".mlp." in n]
    assert {n.split(".mlp.")[1].split(".")[0] for n in mlp} == {"gate_proj", "up_proj", "down_proj"}
    assert all(now[n].requires_grad for n in mlp)
    # the extended adapter trains, saves and loads back to the same function
    model = train(tiny_config(tmp_path / "a", mode="lora", lora_rank=2, lora_targets="all", stage1_steps=1,
                              stage2_steps=1), model=model, corpus=corpus(), progress=False)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.backbone.named_parameters()
               if ".mlp." in n and "lora_B" in n)
    loaded = HMTModel.from_pretrained(tmp_path / "a" / "final", backbone=tiny_backbone("llama", 0, dtype=torch.float64))
    loaded.to(torch.float64).eval()
    model.eval()
    assert torch.allclose(loaded(ids).logits, model(ids).logits, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="lora_targets"):
        tiny_config(tmp_path, lora_targets="mlp")
    with pytest.raises(ValueError, match="lora_rank"):
        apply_mode(tiny_model_with_adapter(rank=2), "lora", 4, "all")


def tiny_model_with_adapter(rank):
    from hmt_runtime.training.train import apply_mode

    return apply_mode(tiny_model(), "lora", rank)
