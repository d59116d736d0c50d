"""Shared setup of the generation benchmarks (bench_generate.py).

Environment:
    HMT_BENCH_TINY=1          a tiny random Llama and small contexts (to debug the benchmarks in seconds)
    HMT_BENCH_THREADS=2       torch threads (default 2)
    HMT_BENCH_WINDOW=256      HMT window W
    HMT_BENCH_KERNELS=torch   HMTConfig.kernels of the HMT side ("torch": the scheduler's own attention)
    HMT_BENCH_MAX_CONTEXT     the largest context measured for memory (default 131072)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import bench_generate as bg  # noqa: E402  (the settings live there, so the subprocess mode sees the same ones)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(bg.settings().threads)


@pytest.fixture(scope="session")
def settings():
    return bg.settings()


@pytest.fixture(scope="session")
def hf_backbone(settings):
    """The backbone for transformers' own generate (its own copy: the HMT side may switch attention backends)."""
    backbone, _ = bg.load(settings)
    return backbone


@pytest.fixture(scope="session")
def hmt_model(settings):
    return bg.hmt_model(settings)


@pytest.fixture(scope="session")
def corpus(settings):
    """Token ids of real text (long enough for the largest in-process context)."""
    return bg.corpus_ids(settings, max(settings.contexts) + 512)
