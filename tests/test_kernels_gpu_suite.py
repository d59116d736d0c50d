"""benchmarks/gpu_suite.py: its CPU dry run (Triton interpreter, tiny shapes, every section), a failing section that
leaves the others running, its arguments, and its no-CUDA refusal."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"
no_cuda_only = pytest.mark.skipif(torch.cuda.is_available(),
                                  reason="the dry run needs the interpreter set before Triton loads; GPUs run the suite")


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_cleanly_without_cuda(capsys, tmp_path):
    assert load_suite().main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@no_cuda_only
def test_dry_run_runs_every_section_and_writes_report_and_json(tmp_path, capsys):
    suite = load_suite()
    assert suite.main(["--dry-run", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    text = (tmp_path / "report.md").read_text()
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["ok"] and data["checks"] == data["checks_passed"] > 10 and not data["failed_checks"]
    assert [s["key"] for s in data["sections"]] == list(suite.SECTIONS)
    for section in data["sections"]:
        assert section["status"] == "ok", section
        assert section["rows"], section["key"]  # every section measured something
        assert section["seconds"] <= section["budget_s"] * 2
        assert f"### {section['title']}" in text
    assert "FAIL" not in text and "Command: `python benchmarks/gpu_suite.py --dry-run --out" in text
    by_key = {s["key"]: s for s in data["sections"]}
    # the random models and the transformers comparison ran (in the child process)
    assert any("triton == torch" in row[0] and row[-1] == "ok" for row in by_key["model"]["rows"])
    assert by_key["generate"]["rows"][0][4] == "static cache (CPU)"
    assert {row[0] for row in by_key["graphs"]["rows"]} == {"smollm2-135m", "7b-like"}
    assert data["stack"]["transformers"] and "| attention B2 Lq19" in printed  # rows printed as they come


@no_cuda_only
def test_a_failing_section_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    suite = load_suite()

    def broken(self, section):
        section.add(["48", "96", "20", "1", "-", "-", "-", "-"])
        raise RuntimeError("injected failure")

    monkeypatch.setattr(suite.Suite, "section_recall", broken)
    assert suite.main(["--dry-run", "--only", "recall,decode", "--out", str(tmp_path)]) == 1
    data = json.loads((tmp_path / "results.json").read_text())
    status = {s["key"]: s["status"] for s in data["sections"]}
    assert status == {"decode": "ok", "recall": "failed: RuntimeError: injected failure"}
    assert not data["ok"]
    assert "failed: RuntimeError: injected failure" in (tmp_path / "report.md").read_text()


@no_cuda_only
def test_a_spent_budget_skips_cases_and_says_so(tmp_path):
    suite = load_suite()
    assert suite.main(["--dry-run", "--only", "prefill", "--budget", "0.001", "--out", str(tmp_path)]) == 0
    (section,) = json.loads((tmp_path / "results.json").read_text())["sections"]
    assert section["status"].startswith("skipped") or section["status"].startswith("partial")
    assert section["notes"]


def test_the_transformers_child_is_killed_at_its_cap():
    """torch.compile cannot be interrupted: the child process is, and the parent says so."""
    suite = load_suite()
    request = {"model": "smollm2-135m", "dtype": "float32", "batches": [1], "prompt_len": 4, "new": 2, "dry": True,
               "fingerprint": 0.0}
    start = __import__("time").perf_counter()
    rows, note = suite.run_hf_child(request, budget_s=1.0)
    assert __import__("time").perf_counter() - start < 8
    assert rows == {} and "stopped at its 1 s cap after batches []" in note


def test_arguments_are_checked():
    suite = load_suite()
    with pytest.raises(SystemExit):
        suite.parse_args(["--only", "kernels,nonsense"])
    with pytest.raises(SystemExit):
        suite.parse_args(["--budget", "0"])
    assert suite.parse_args(["--only", "graphs, generate"]).only == ["graphs", "generate"]


def test_model_configs_have_the_advertised_shapes():
    suite = load_suite()
    small = suite.load_config("smollm2-135m", tiny=False)
    assert (small.model_type, small.hidden_size, small.num_hidden_layers, small.num_attention_heads,
            small.num_key_value_heads, small.head_dim, small.vocab_size) == ("llama", 576, 30, 9, 3, 64, 49152)
    assert small.tie_word_embeddings and small.intermediate_size == 1536
    big = suite.load_config("7b-like", tiny=False)
    assert (big.hidden_size, big.num_hidden_layers, big.num_attention_heads, big.num_key_value_heads,
            big.head_dim) == (4096, 32, 32, 8, 128)
    tiny = suite.load_config("7b-like", tiny=True)
    assert tiny.num_attention_heads // tiny.num_key_value_heads == 4  # the GQA ratio survives the shrinking


@pytest.mark.slow  # skipped where the real backbone cannot be loaded (tests/conftest.py)
def test_smollm2_config_equals_the_real_backbone():
    from hmt_runtime import load_backbone

    real = load_backbone("smollm2-135m")[0].config.to_dict()
    ours = load_suite().load_config("smollm2-135m", tiny=False).to_dict()
    fields = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
              "rope_parameters", "attention_bias", "mlp_bias", "tie_word_embeddings", "bos_token_id",
              "eos_token_id", "pad_token_id", "model_type"]
    assert {f: ours[f] for f in fields} == {f: real[f] for f in fields}
