"""QA83 (session 26): the CUDA-only code paths reviewed without a GPU.

1. ``backends.triton._CudaGraph`` (the fused stepper's chunk graphs and the un-fused backend's
   per-launch graphs) captured inside ``torch.cuda.graph(g)`` with no ``stream``: torch then
   captures on ``torch.cuda.graph.default_capture_stream``, ONE stream per process, created on the
   device that is current at the first capture, and entering ``torch.cuda.stream(s)`` makes ``s``'s
   device current (``THCPModule_setStream_wrap`` calls ``c10::cuda::set_device``).  A capture for
   cuda:1 after one for cuda:0 therefore ran on cuda:0's stream: the body's launches (Triton's and
   torch's, on cuda:1's own current stream) ran eagerly instead of being recorded, and the graph
   was empty (torch only warns "The CUDA Graph is empty ... captured on wrong device or stream"):
   the first chunk ran twice and every later replay did nothing.  The fake below models exactly
   those two torch rules; the fix captures on a stream of the current device.
"""
import contextlib
import types

import pytest
import torch

pytest.importorskip("triton")

from reptile_fast.backends import triton as TB  # noqa: E402


class _FakeCuda:
    """torch.cuda's device/stream/graph rules that decide where a capture records (on the CPU)."""

    def __init__(self):
        self.current = 0
        self.captured_on = []  # per capture: (device current when the body ran, capture stream's device)

    def Stream(self, device=None, priority=0):  # noqa: N802 - torch's name
        index = self.current if device is None else (device.index if isinstance(device, torch.device) else device)
        return types.SimpleNamespace(device_index=index, wait_stream=lambda other: None)

    def current_stream(self, device=None):
        return self.Stream(device)

    def current_device(self):
        return self.current

    @contextlib.contextmanager
    def device(self, d):
        prev, self.current = self.current, (d.index if isinstance(d, torch.device) else d)
        try:
            yield
        finally:
            self.current = prev

    def graph_class(self):
        fake = self

        class graph:  # noqa: N801 - torch.cuda.graph
            default_capture_stream = None

            def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
                # torch.cuda.graph.__init__: one default capture stream per process, lazily made
                if stream is None and graph.default_capture_stream is None:
                    graph.default_capture_stream = fake.Stream()
                self.stream = stream if stream is not None else graph.default_capture_stream

            def __enter__(self):
                # torch.cuda.stream(s) -> set_stream(s): the stream's device becomes current
                self.prev, fake.current = fake.current, self.stream.device_index
                return self

            def __exit__(self, *exc):
                fake.current = self.prev
                return False

        return graph


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = _FakeCuda()
    for name in ("Stream", "current_stream", "current_device", "device"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "graph", fake.graph_class())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: types.SimpleNamespace(replay=lambda: None))
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return fake


def test_a_graph_captured_for_a_second_gpu_records_on_that_gpus_stream(fake_cuda):
    """The fused stepper and the un-fused backend capture inside ``_on(device)``; the capture's
    stream must be that device's, whatever device the process captured on first."""
    seen = []
    for index in (0, 1):
        with torch.cuda.device(index):  # what _on(torch.device("cuda", index)) enters
            # the body's launches go to the launch device's current stream (Triton and torch alike):
            # recorded only if that is the device the capture stream belongs to
            TB._CudaGraph(lambda i=index: seen.append((i, torch.cuda.current_device())))
    assert seen == [(0, 0), (1, 1)], (
        f"captures ran with the capture stream's device current: {seen} (launch device, capture device); "
        f"a capture on another device than its launches records nothing")
