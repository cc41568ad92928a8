"""Kernel v2's 1-wide layers in 2-D (``V2Config(flat=...)``) against the 3-D broadcast products, by
ahead-of-time compilation (no GPU): static counts of the inner-step loop's SASS.

    python -m bench.flat_layers [--arch 90] [--out bench/results/FILE.json]

For every ``bench.triton_compile.V2_GRID`` case (the configurations the public API can reach), the
sine MLP's one-task meta-step (the seed's setting) in each precision and the sine MLP at batch 32,
the fused meta-step compiled with
``flat=False``, with the kernel's default (``flat_for``) and with ``flat=True``: registers,
spill, and the largest inner loop's instructions, barriers (``BAR``), shared-memory loads/stores,
shuffles and FFMAs (``bench.triton_compile.sass_loop_facts``).  Every other option is the kernel's
default at the time of the run: the committed records (session 16) had the products batch-major;
since ``V2Config.transpose`` (session 17) a re-run compiles them feature-major where
``transpose_for`` says so (``bench/transposed_dots.py`` compares the two).  At T = 1 one program waits out
every barrier and shared-memory round trip of its steps, so these counts are the latency proxy
available without a GPU; they are records of a compiler version, not timings.  Run without
``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

def rows(arch: int = 90, log=None) -> list:
    from bench.triton_compile import SINE, V2_GRID, option_rows
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    cases = [(name, dims, acts, loss, batch, steps, False, "ieee") for name, dims, acts, loss, batch, steps in V2_GRID]
    # the seed's setting in each precision (tensor cores for the 64 x 64 layer in tf32x3 / tf32)
    cases += [(f"sine-1-64-64-1-one-task{'' if p == 'ieee' else '-' + p}", *SINE, "mse", 10, 5, True, p)
              for p in ("ieee", "tf32x3", "tf32")]
    # batch 32 (padded rows above 16) with a preloaded plan of 5 steps: where the default stays 3-D
    cases.append(("sine-b32-s5", *SINE, "mse", 32, 5, False, "ieee"))
    return option_rows("flat", (("3d", False), ("default", None), ("on", True)), cases, arch, log,
                       default=lambda dims, batch, steps, precision: V.flat_for(dims, batch, steps))


def main(argv=None) -> int:
    from bench.triton_compile import record_main

    return record_main("flat_layers", __doc__, rows, "compile only (no GPU): static SASS counts of the largest "
                       "inner loop; '3d' = V2Config(flat=False), 'default' = the kernel's choice, 'on' = flat=True", argv)


if __name__ == "__main__":
    raise SystemExit(main())
