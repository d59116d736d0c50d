"""benchmarks/gpu_suite.py runs: its CPU dry run (Triton interpreter, tiny shapes) and its no-CUDA refusal."""
import importlib.util
from pathlib import Path

import pytest
import torch

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_cleanly_without_cuda(capsys):
    assert load_suite().main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run needs the interpreter set before Triton loads")
def test_dry_run_passes_and_writes_a_report(tmp_path):
    report = tmp_path / "RESULTS.md"
    assert load_suite().main(["--dry-run", "--quick", "--results", str(report)]) == 0
    text = report.read_text()
    for heading in ("### correctness", "### segment prefill", "### decode", "### recall + memory write"):
        assert heading in text
    assert "FAIL" not in text
    assert "Command: `python benchmarks/gpu_suite.py --dry-run --quick --results" in text
