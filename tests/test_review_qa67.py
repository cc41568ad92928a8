"""QA67 (session 25): the indexed sampler's random streams and the task samplers' limits.

* torch's CPU generator (mt19937) keeps only the low 32 bits of ``manual_seed``, so the 64-bit
  stream seeds of ``IndexedSampler`` repeated within ordinary runs (birthday bound): at
  meta-batch 1, seed 0, meta-steps 18540 and 147296 drew the same task and plan; a 30000-step
  run at meta-batch 1024 repeated 24 blocks of 64 tasks.  Stream seeds are now 32-bit and
  distinct within a run (``sampler.STREAMS`` = 2); a checkpoint written with the former ones
  (no ``"streams"`` in its sampler state) resumes drawing as it began.
"""
import pytest
import torch

from reptile_fast import Sine
from reptile_fast.distributed.sampler import STREAMS, IndexedSampler, stream_seed


def test_the_premise_torch_keeps_32_bits_of_a_seed():
    a = torch.rand(4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    b = torch.rand(4, generator=torch.Generator().manual_seed(5 + 2 ** 32), dtype=torch.float64)
    assert torch.equal(a, b)


def test_stream_seeds_are_32_bit_and_distinct_over_a_long_run():
    n_blocks = 16  # meta-batch 1024 in blocks of 64, 30000 meta-steps
    seeds = [stream_seed(0, t, b, n_blocks=n_blocks) for t in range(30000) for b in range(n_blocks)]
    assert all(0 <= s < 2 ** 32 for s in seeds)
    assert len(set(seeds)) == len(seeds)
    # the former seeds, as torch used them, repeated
    low = [stream_seed(0, t, b, n_blocks=n_blocks, streams=1) & 0xFFFFFFFF for t in range(30000) for b in range(n_blocks)]
    assert len(set(low)) < len(low)


def test_meta_steps_that_drew_the_same_task_now_differ():
    s = IndexedSampler(Sine(), 1, seed=0, plan_rows=5, batch_size=10)
    assert s.streams == STREAMS == 2
    t1, p1 = s.draw_step(18539)
    t2, p2 = s.draw_step(147295)
    assert not (torch.equal(t1.y, t2.y) and torch.equal(p1, p2))
    old = IndexedSampler(Sine(), 1, seed=0, plan_rows=5, batch_size=10)
    old.streams = 1  # the former streams: these two meta-steps were one
    o1, q1 = old.draw_step(18539)
    o2, q2 = old.draw_step(147295)
    assert torch.equal(o1.y, o2.y) and torch.equal(q1, q2)


def test_blocks_that_repeated_now_differ():
    a = IndexedSampler(Sine(), 1024, seed=0, plan_rows=5, batch_size=10, rank=15, world_size=16)
    b = IndexedSampler(Sine(), 1024, seed=0, plan_rows=5, batch_size=10, rank=5, world_size=16)
    ta, pa = a.draw_step(1530)
    tb, pb = b.draw_step(2106)
    assert not (torch.equal(ta.y, tb.y) and torch.equal(pa, pb))


def test_a_checkpoint_with_the_former_streams_resumes_drawing_as_it_began():
    s = IndexedSampler(Sine(), 8, seed=3, plan_rows=2, batch_size=4, block_size=4)
    saved = s.state_dict()
    assert saved["streams"] == 2
    former = {k: v for k, v in saved.items() if k != "streams"}  # written before the key existed
    s.check_resumable(former)
    assert s.streams == 1
    g = torch.Generator().manual_seed(stream_seed(3, 5, 1, streams=1))
    want = Sine().sample(4, generator=g)
    assert torch.equal(s.draw_step(5)[0].y[4:], want.y)
    with pytest.raises(ValueError, match="random streams of kind 3"):
        s.check_resumable({**saved, "streams": 3})


def test_streams_beyond_2_to_the_32_are_refused_by_name():
    with pytest.raises(ValueError, match="beyond the 2..32 distinct seeds"):
        stream_seed(0, 2 ** 28, 0, n_blocks=16)  # stream 2**32 (block 20 of 16 is refused as such: QA88)


# ----------------------------------------------------------------------------- sizes beyond memory
@pytest.mark.parametrize("n_points", [2 ** 62, 2 ** 45])
def test_a_sine_grid_beyond_memory_is_a_value_error_naming_n_points(n_points):
    """torch's "Storage size calculation overflowed" / allocator RuntimeError before."""
    with pytest.raises(ValueError, match=f"n_points = {n_points}"):
        Sine(n_points=n_points)


def test_an_indexed_meta_batch_beyond_memory_fails_at_once(tmp_path):
    """``distributed_fit`` drew 2**40 tasks block by block (64 at a time), joining them only at the
    end, so it drew for ever instead of failing as ``Reptile.fit``'s one draw does.  In a child
    process with its address space capped (6 GiB) and a time limit."""
    import subprocess
    import sys

    code = ("import resource\n"
            "resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
            "from reptile_fast import MLP, Reptile, Sine\n"
            "from reptile_fast.distributed import DistContext, distributed_fit\n"
            "try:\n"
            "    distributed_fit(Reptile(MLP(1, 8, 1), backend='torch'), Sine(), 1, meta_batch_size=2 ** 40, seed=0,\n"
            "                    context=DistContext.single('cpu'), progress=False)\n"
            "except ValueError as exc:\n"
            "    print('refused:', exc)\n")
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert "refused: meta_batch_size = 1099511627776" in proc.stdout and "out of memory" in proc.stdout, \
        (proc.stdout[-2000:], proc.stderr[-2000:])
