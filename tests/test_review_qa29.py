"""QA29: what the Triton interpreter hides and a GPU would expose in the kernels.

The interpreter runs a block operation on a whole tensor at once and one program after another:
a missing CTA barrier between a store and another thread's load (or a load and another thread's
overwrite) never shows there.  ``_race_check.RaceCheck`` records the interpreter's loads, stores
and barriers and reports such hazards (and cross-program conflicts); the kernels must have none.
Integer widths and compilability for sm_90a are checked ahead of time (no GPU needed; skipped
where the Triton wheel has no NVIDIA backend).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from _race_check import RaceCheck
from reptile_fast.kernels import meta_step_guard as G
from reptile_fast.kernels import mlp_inner_loop as K
from reptile_fast.kernels import mlp_meta_step_v2 as V

ROOT = Path(__file__).resolve().parents[1]
needs_interpreter = pytest.mark.skipif(not V.INTERPRETED, reason="the race check runs the kernels interpreted")


# ----------------------------------------------------------------------------- the checker itself
@triton.jit
def _raw_kernel(buf, out, BARRIER: tl.constexpr):
    i = tl.arange(0, 16)
    tl.store(buf + i, i.to(tl.float32))
    if BARRIER:
        tl.debug_barrier()
    tl.store(out + i, tl.load(buf + 15 - i))  # element i written by another thread


@triton.jit
def _war_kernel(buf, out, BARRIER: tl.constexpr):
    i = tl.arange(0, 16)
    v = tl.load(buf + 15 - i)
    if BARRIER:
        tl.debug_barrier()
    tl.store(buf + i, v * 2.0)  # element 15 - i still to be read by another thread
    tl.store(out + i, v)


@triton.jit
def _rmw(ptr):
    p = ptr + tl.arange(0, 16)
    tl.store(p, tl.load(p) + 1.0)


@triton.jit
def _rmw_kernel(buf):
    _rmw(buf)


@triton.jit
def _cross_kernel(buf):
    i = tl.arange(0, 4)
    tl.store(buf + i, i.to(tl.float32) + tl.program_id(0))  # every program the same elements


@needs_interpreter
def test_race_check_finds_what_it_is_for():
    """Positive controls: a RAW and a WAR without a barrier are reported, with one they are not; a
    per-element read-modify-write is no hazard; programs writing one element are reported."""
    buf, out = torch.zeros(16), torch.zeros(16)
    for kernel, kind in ((_raw_kernel, "RAW"), (_war_kernel, "WAR")):
        with RaceCheck() as rc:
            kernel[(1,)](buf, out, BARRIER=False)
        assert rc.hazards and all(h.startswith(kind) for h in rc.hazards), rc.hazards
        with RaceCheck() as rc:
            kernel[(1,)](buf, out, BARRIER=True)
        assert not rc.hazards, rc.report()
    with RaceCheck() as rc:
        _rmw_kernel[(1,)](buf)
    assert not rc.hazards, rc.report()
    with RaceCheck() as rc:
        _cross_kernel[(2,)](buf)
    assert any("program (1, 0, 0) writes" in h for h in rc.hazards), rc.hazards


# ----------------------------------------------------------------------------- the kernels
def _problem(dims, loss="mse", T=3, N=7, R=2, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, dims[0], generator=g)
    y = (torch.randn(T, N, dims[-1], generator=g) if loss == "mse"
         else torch.randint(0, dims[-1], (T, N), generator=g))
    idx = torch.randint(0, N, (T, R, B), generator=g)
    phi = torch.randn(V.n_flat_params(dims), generator=g) * 0.3
    return x, y, idx, phi


#: a narrow first layer under a streamed one (the WAR on the streamed layer's input), a streamed
#: first layer, a narrow layer between streamed ones, cross-entropy
V2_MODELS = [
    ((1, 16, 16, 1), ("tanh", "tanh", "identity"), "mse"),
    ((16, 16, 3, 16, 1), ("relu", "sigmoid", "tanh", "identity"), "cross_entropy"),
]


@needs_interpreter
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "registers"])
@pytest.mark.parametrize("model", V2_MODELS, ids=["1-16-16-1", "16-16-3-16-1-ce"])
def test_v2_kernels_have_no_intra_program_races(model, stream):
    """Every v2 launch (meta-step with the sums in registers and in memory, adapt, the one-program
    guarded meta-step) on 3 tasks over 2 programs: no access pair a GPU would race on.  Before:
    the streamed variant re-wrote a layer's input in the scratch while the previous step's
    backward pass could still be reading it (no barrier when the layer below is not streamed), and
    with the sums in registers the next task's copy of φ overwrote the streamed weights that
    ``_layer_final`` was still reading."""
    dims, acts, loss = model
    x, y, idx, phi = _problem(dims, loss)
    with RaceCheck() as rc:
        for acc in ("registers", "memory"):
            V.meta_step(x, y, idx, phi, dims, acts, lr=0.1, eps=0.5, loss=loss,
                        config=V.V2Config(stream=stream, max_programs=2, accumulate=acc))
        V.inner_loop(x, y, idx, phi, dims, acts, lr=0.1, loss=loss, config=V.V2Config(stream=stream, max_programs=2))
        V.guarded_meta_step(x[:2], y[:2], idx[:2], phi.clone(), dims, acts, lr=0.1, eps=0.5, loss=loss,
                            state=G.new_state("cpu"), iteration=torch.ones(1, dtype=torch.int64),
                            loss_out=torch.zeros(1), config=V.V2Config(stream=stream, max_programs=1))
    assert not rc.hazards, rc.report()


@needs_interpreter
def test_guard_kernel_has_no_races():
    """The accept-or-skip kernel read the guard state and then rewrote it with no barrier between:
    a thread that had not yet read it could see the new flags.  Both passes and both outcomes."""
    with RaceCheck() as rc:
        for bad in (False, True):
            new = torch.randn(3000)
            if bad:
                new[1234] = float("nan")
            G.accept_step(torch.randn(3000), new, torch.ones(1), G.new_state("cpu"),
                          torch.ones(1, dtype=torch.int64), torch.zeros(1))
    assert not rc.hazards, rc.report()


@needs_interpreter
@pytest.mark.parametrize("mode", ["registers", "tiled"])
def test_v1_kernels_have_no_races(mode):
    """Held: v1's registers and tiled variants (the tiled one's scratch and in-place weights)."""
    dims, acts = (2, 16, 3, 16, 3), ["tanh", "relu", "sigmoid", "identity"]
    x, y, idx, phi = _problem(dims, "cross_entropy")
    config = K.choose_launch_config(dims, 3, mode=mode, **({"max_programs": 2} if mode == "tiled" else {}))
    with RaceCheck() as rc:
        K.mlp_inner_loop(x, y, idx, V.unflatten_params(phi, dims), acts, lr=0.1, loss="cross_entropy", config=config)
    assert not rc.hazards, rc.report()


# ----------------------------------------------------------------------------- ahead of time (sm_90a)
def _aot(code: str) -> str:
    """Run ``code`` in a child process with the kernels compiled (no TRITON_INTERPRET)."""
    if not (Path(triton.__file__).parent / "backends" / "nvidia").exists():
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_outer_update_row_offsets_are_64_bit():
    """``_outer_update_kernel`` summed row p at ``p * part_stride`` in int32: wrong rows (or an
    illegal address) once n_programs * part_stride >= 2^31, e.g. a caller's partials with a wide
    row stride.  Its Triton IR must hold no 32-bit multiply."""
    out = _aot(
        "import triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from reptile_fast.kernels import mlp_meta_step_v2 as V\n"
        "sig = {n: '*fp32' for n in ('phi_ptr', 'part_ptr', 'loss_part_ptr', 'eps_ptr', 'new_phi_ptr', 'loss_ptr')}\n"
        "sig.update(n_params='i32', part_stride='i32', n_programs='i32', n_tasks_f='fp32', n_losses_f='fp32',\n"
        "           BLOCK='constexpr')\n"
        "k = triton.compile(triton.compiler.ASTSource(V._outer_update_kernel, sig, constexprs={'BLOCK': 1024}),\n"
        "                   target=GPUTarget('cuda', 90, 32), options={'num_warps': 4})\n"
        "print('\\n'.join(l for l in k.asm['ttir'].splitlines() if 'arith.muli' in l))\n")
    assert not [line for line in out.splitlines() if line.rstrip().endswith(": i32") or ": i32 loc" in line], out


def test_meta_batch_one_launch_compiles_as_the_jit_specialises_it():
    """At meta-batch 1 and batch 1 the JIT compiles n_tasks, n_programs and batch as the constant 1
    (Triton specialises int arguments equal to 1): that kernel, streamed and not, compiles for
    sm_90a (``compile_for_target(ones=...)``; bench/results/triton-compile-sm90-grid-*.json
    records the whole grid)."""
    out = _aot(
        "from reptile_fast.kernels import mlp_meta_step_v2 as V\n"
        "for stream in (False, True):\n"
        "    k = V.compile_for_target((1, 16, 16, 1), ('tanh', 'tanh', 'identity'), batch=1, steps=2,\n"
        "                             config=V.V2Config(stream=stream), finalize=True,\n"
        "                             ones=('n_tasks', 'n_programs', 'batch'))\n"
        "    print(stream, len(k.asm['ptx']) > 0)\n"
        "try:\n"
        "    V.compile_for_target((1, 4, 1), ('tanh', 'identity'), ones=('lr',))\n"
        "except ValueError as exc:\n"
        "    print('refused', exc)\n")
    assert "False True" in out and "True True" in out, out
    assert "refused ones must name integer arguments" in out, out


# ----------------------------------------------------------------------------- v1 forced "registers"
def test_v1_registers_variant_refuses_tiles_a_gpu_block_cannot_hold():
    """``mode="registers"`` forced on 256 x 256 tiles ran under the interpreter, but its dots need
    280-311 KB of shared memory (sm_90a, compile only) where a block gets 227 KB: every GPU launch
    failed with Triton's OutOfResources.  Refused up front, naming the limit; 128 x 256 and
    512 x 64 (140-200 KB) stay allowed."""
    assert K.registers_unsupported_reason((128, 256), 16) is None
    assert K.registers_unsupported_reason((1, 64, 1), 512) is None
    assert K.registers_unsupported_reason((1, 64, 1), 1024) is not None  # twice the 200 KB above
    forced = K.LaunchConfig(mode="registers", num_warps=8)
    for dims, B in (((256, 256), 2), ((1, 256, 1), 200)):
        x, y, idx, phi = _problem(dims, T=1, N=B, R=1, B=B)
        with pytest.raises(ValueError, match=r"'registers' variant .* 256 x 256 tile exceeds its limit of 32768"):
            K.mlp_inner_loop(x, y, idx, V.unflatten_params(phi, dims), ["identity"] * (len(dims) - 1), lr=0.1,
                             config=forced)


def test_backend_v1_refuses_forced_registers_beyond_the_limit():
    """The backend says so when the trainer is built (UnsupportedModelError), not at the first
    meta-step's launch on a GPU; the batch-dependent case when the inner batch is set."""
    from reptile_fast.backends.base import InnerConfig, UnsupportedModelError
    from reptile_fast.backends.triton import TritonBackend

    if not V.INTERPRETED:
        pytest.skip("the CPU check needs the interpreter")
    backend = TritonBackend(kernel="v1", launch={"mode": "registers"})
    with pytest.raises(UnsupportedModelError, match="256 x 256 tile exceeds"):
        backend.check_supported(torch.nn.Sequential(torch.nn.Linear(256, 256)), "cpu", InnerConfig())
    model = torch.nn.Sequential(torch.nn.Linear(1, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))
    backend.check_supported(model, "cpu", InnerConfig())
    backend.check_batch_size(model, 10)
    with pytest.raises(UnsupportedModelError, match="256 x 256 tile exceeds"):
        backend.check_batch_size(model, 200)
    TritonBackend(kernel="v1").check_batch_size(model, 200)  # the default (tiled) runs it
