"""CUDA graphs of the scheduler's fixed-shape steps (decode per batch bucket, boundary prefills, summary passes)."""
from __future__ import annotations

import warnings
from typing import Callable

import torch


class CUDAGraphs:
    """CUDA graphs of fixed-shape steps, captured on their third call (two eager warm-up calls first).

    A captured function reads only static tensors (its inputs are copied into a static buffer first) and does
    no host-side work; replaying it redoes exactly what the eager call did.
    """

    def __init__(self):
        self.graphs: dict = {}
        self.calls: dict = {}
        self.failed: set = set()
        self.pool = None

    def run(self, key, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self.graphs:
            graph, out = self.graphs[key]
            graph.replay()
            return out
        calls = self.calls.get(key, 0)
        self.calls[key] = calls + 1
        if calls < 2:  # warm-up, on a side stream as capture requires
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = fn()
            torch.cuda.current_stream().wait_stream(stream)
            return out
        if key in self.failed:
            return fn()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = fn()
        except Exception as err:  # e.g. an op that reads the device during capture: stay eager for this step
            self.failed.add(key)
            warnings.warn(f"hmt: CUDA graph capture of {key[0]!r} failed ({err}); running it eagerly", stacklevel=3)
            return fn()
        self.pool = graph.pool()
        self.graphs[key] = (graph, out)
        graph.replay()  # capture records without running: run it now
        return out

