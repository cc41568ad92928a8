"""Every fused-kernel launch and ahead-of-time compile pins FMA contraction
(``kernels/special_functions.COMPILE_OPTIONS``).

Triton 3.6-3.8 contract ``a * b + c`` into FMAs by default; 3.9 warns when the option is left
unset, and 3.10 turns it off by default, which would change every kernel's roundings (and the
special functions' error budget, ``ACCURACY``) without a word.  ``TRITON_DEFAULT_FP_FUSION=0``
flips the default on every supported Triton, so a launch or compile that leaves the option unset
shows up here.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from reptile_fast import MLP, Reptile, Sine  # noqa: E402
from reptile_fast.kernels import meta_step_guard as G  # noqa: E402
from reptile_fast.kernels import mlp_inner_loop as K  # noqa: E402
from reptile_fast.kernels import mlp_meta_step_v2 as V  # noqa: E402
from reptile_fast.kernels.special_functions import COMPILE_OPTIONS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"v1 registers": (K, "_inner_loop_registers_kernel"), "v1 tiled": (K, "_inner_loop_tiled_kernel"),
           "v2 meta-step": (V, "_meta_step_kernel"), "v2 outer update": (V, "_outer_update_kernel"),
           "guard": (G, "_accept_kernel")}


def test_compile_options_keep_fma_contraction_on():
    assert COMPILE_OPTIONS == {"enable_fp_fusion": True}


def test_every_launch_passes_the_compile_options(monkeypatch):
    """Each kernel's launches through the public API (kernel v1 in both modes, kernel v2's
    meta-step, adapt and outer update, the fused stepper's guard) carry ``COMPILE_OPTIONS``."""
    seen = {name: [] for name in KERNELS}
    for name, (module, attr) in KERNELS.items():
        kernel = getattr(module, attr)
        run = kernel.run

        def recording(*args, _name=name, _run=run, **kwargs):
            seen[_name].append({k: kwargs.get(k) for k in COMPILE_OPTIONS})
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", recording)
    sine = Sine()
    for options in ({"kernel": "v1", "launch": {"mode": "registers"}}, {"kernel": "v1", "launch": {"mode": "tiled"}},
                    {"kernel": "v2"}, {"kernel": "v2", "fused": True}):
        torch.manual_seed(0)
        trainer = Reptile(MLP(1, 8, 1), backend="triton", inner_steps=2, inner_batch_size=4,
                          backend_options=options)
        trainer.fit(sine, 2, meta_batch_size=3, progress=False, handle_signals=False)
        trainer.adapt(sine.sample(2, generator=torch.Generator().manual_seed(1)), 2)
    for name, calls in seen.items():
        assert calls, f"{name}: never launched (the test no longer reaches it)"
        assert all(c == COMPILE_OPTIONS for c in calls), f"{name}: launched without {COMPILE_OPTIONS}: {calls}"


def test_ahead_of_time_compiles_keep_fma_contraction_with_the_default_off():
    """``compile_for_target`` of v1, v2 and the guard (sm_90a, no GPU) with Triton's default
    turned off: each compiled kernel still contracts."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia").exists():
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    code = ("from reptile_fast.kernels import mlp_meta_step_v2 as V, mlp_inner_loop as K, meta_step_guard as G\n"
            "print('v2', V.compile_for_target((1, 8, 1), ('tanh', 'identity'), batch=4, steps=2).metadata.enable_fp_fusion)\n"
            "print('v1', K.compile_for_target((1, 8, 1), ('tanh', 'identity'), batch=4).metadata.enable_fp_fusion)\n"
            "print('guard', G.compile_for_target().metadata.enable_fp_fusion)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = dict(line.split() for line in proc.stdout.strip().splitlines())
    assert got == {"v2": "True", "v1": "True", "guard": "True"}, proc.stdout
