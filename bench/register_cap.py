"""Kernel v2 with a per-thread register cap (``V2Config(max_registers=...)``, PTX ``.maxnreg``)
against none, by ahead-of-time compilation (no GPU): registers, spill and the inner-step loop's
local (spill) loads and stores.

    python -m bench.register_cap [--arch 90] [--out bench/results/FILE.json]

An SM holds 65536 registers: 4-warp programs at 255 registers fit 2 per SM, at 168 three, at 128
four.  More programs per SM hide more of each program's latency (barriers, shared-memory round
trips: a T = 4096 launch runs ~15 tasks per program one after another), and a cap below what
ptxas chooses buys them with spills to local memory (L1-resident at these sizes).  Which wins is
a GPU's measurement (``bench/gpu_check.sh --sweep ... --max-registers default,168,128 --per-sm 2,3,4``);
this records what each cap costs in spills, for the sine MLP's meta-step in each precision, the
seed's one-task meta-step, and the Omniglot-style cross-entropy MLP.  Run without
``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

#: (label, V2Config.max_registers): None, the kernel's own choice (no cap unless streamed)
CAPS = (("uncapped", None), ("cap-168", 168), ("cap-160", 160), ("cap-128", 128))


def rows(arch: int = 90, log=None) -> list:
    from bench.triton_compile import SINE, option_rows

    cases = [(f"sine-1-64-64-1{'' if p == 'ieee' else '-' + p}", *SINE, "mse", 10, 5, False, p)
             for p in ("ieee", "tf32x3", "tf32")]
    cases += [("sine-1-64-64-1-one-task", *SINE, "mse", 10, 5, True, "ieee"),
              ("ce-4-64-64-5-relu", (4, 64, 64, 5), ("relu", "relu", "identity"), "cross_entropy", 10, 5, False,
               "ieee")]
    return option_rows("max_registers", CAPS, cases, arch, log)


def main(argv=None) -> int:
    from bench.triton_compile import record_main

    return record_main("register_cap", __doc__, rows, "compile only (no GPU): registers, spill and static SASS "
                       "counts of the largest inner loop per V2Config.max_registers ('uncapped' = the kernel's "
                       "default, no cap)", argv)


if __name__ == "__main__":
    raise SystemExit(main())
