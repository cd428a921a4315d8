"""engine/step.py's OVERLAP_INPUT_COPY switch: `StagedInputCopy` fills a CUDA graph's static inputs from host
batches through two staging buffers and a copy stream. On the CPU it is plain copies (checked here for the buffer
rotation); the stream ordering is checked on a GPU."""

import os

import pytest
import torch

from mmfuse_fast.engine import step as step_module
from mmfuse_fast.engine.step import StagedInputCopy


def _batches(seed, n=2):
    gen = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(3, 4, generator=gen), "label": torch.randint(0, 9, (3,), generator=gen)}
            for _ in range(n)]


def test_every_load_lands_in_the_static_buffers_on_the_cpu():
    static = [{k: torch.empty_like(v) for k, v in b.items()} for b in _batches(0)]
    stager = StagedInputCopy(static, torch.device("cpu"))
    for seed in range(5):  # both staging buffers, twice over
        batches = _batches(seed)
        stager.load(batches)
        for buf, batch in zip(static, batches):
            for k in buf:
                assert torch.equal(buf[k], batch[k])
    assert stager.next_slot == 1


def test_the_switch_defaults_off():
    assert step_module.OVERLAP_INPUT_COPY is (os.environ.get("MMFUSE_OVERLAP_INPUT_COPY", "0") == "1")


@pytest.mark.gpu
def test_replays_read_each_batch_with_the_copy_overlapped():
    """A graph whose work is long enough to overlap the next copy: every replay must see its own batch."""
    device = torch.device("cuda")
    weight = torch.randn(512, 512, device=device) / 512**0.5
    batches = [[{"x": torch.randn(256, 512).pin_memory()}] for _ in range(6)]
    results = {}
    for overlap in (False, True):
        static = [{"x": torch.empty(256, 512, device=device)}]
        static[0]["x"].copy_(batches[0][0]["x"])
        stager = StagedInputCopy(static, device) if overlap else None

        def work():
            y = static[0]["x"]
            for _ in range(20):
                y = torch.tanh(y @ weight)
            return y.sum(0)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            work()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = work()
        outs = []
        for batch in batches:
            if stager is not None:
                stager.load(batch)
            else:
                static[0]["x"].copy_(batch[0]["x"], non_blocking=True)
            graph.replay()
            outs.append(out.clone())
        torch.cuda.synchronize()
        results[overlap] = torch.stack(outs)
    torch.testing.assert_close(results[True], results[False], rtol=0, atol=0)
