"""Kernel v2's wide x wide products feature-major (``V2Config(transpose=...)``: ``(w @ a.T).T``)
against batch-major (``a @ w.T``), by ahead-of-time compilation (no GPU): static counts of the
inner-step loop's SASS.

    python -m bench.transposed_dots [--arch 90] [--out bench/results/FILE.json]

The same sums in the same order; what changes is the layout Triton gives the FMA dot's output and
so its operands: batch-major, the output ``[16, 64]`` splits its 16 rows across the warps and every
warp reads all of ``w`` from shared memory per product; feature-major, ``[64, 16]`` splits the 64
features and each warp reads a 16-row slice.  For every ``bench.triton_compile.V2_GRID`` case
("ieee" meta-step), the sine MLP's one-task meta-step (the seed's setting) in each precision, the
sine MLP at 8 warps and at batch 32: the fused meta-step compiled with ``transpose=False``, the
kernel's default (``transpose_for``) and ``transpose=True`` -- registers, spill, and the largest inner
loop's instructions, barriers, shared-memory loads/stores, local (spill) loads/stores, shuffles and
FFMAs.  Records of a compiler version, not timings: how many wavefronts each shared load takes
(bank conflicts) only a GPU's profiler shows (``bench/gpu_check.sh``'s ncu stage).  Run without
``TRITON_INTERPRET=1``.
"""
from __future__ import annotations


def rows(arch: int = 90, log=None) -> list:
    from bench.triton_compile import SINE, V2_GRID, option_rows
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    cases = [(name, dims, acts, loss, batch, steps, False, "ieee") for name, dims, acts, loss, batch, steps in V2_GRID]
    cases += [(f"sine-1-64-64-1-one-task{'' if p == 'ieee' else '-' + p}", *SINE, "mse", 10, 5, True, p)
              for p in ("ieee", "tf32x3", "tf32")]
    cases += [("sine-1-64-64-1-tf32x3", *SINE, "mse", 10, 5, False, "tf32x3"),
              ("sine-1-64-64-1-w8", *SINE, "mse", 10, 5, False, "ieee", 8),
              ("sine-b32-s5", *SINE, "mse", 32, 5, False, "ieee")]
    return option_rows("transpose", (("batch-major", False), ("default", None), ("on", True)), cases, arch, log,
                       default=lambda dims, batch, steps, precision: V.transpose_for(dims, batch, precision))


def main(argv=None) -> int:
    from bench.triton_compile import record_main

    return record_main("transposed_dots", __doc__, rows, "compile only (no GPU): static SASS counts of the largest "
                       "inner loop; 'batch-major' = V2Config(transpose=False), 'default' = the kernel's choice, "
                       "'on' = transpose=True", argv)


if __name__ == "__main__":
    raise SystemExit(main())
