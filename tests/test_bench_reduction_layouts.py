"""bench/reduction_layouts.py's TTGIR reading (the compile itself needs Triton without the
interpreter, so it runs as a bench command, not here): every ``tt.reduce`` with its layout
aliases expanded, and the alignment that names reductions laid out unlike the default's."""
from bench.reduction_layouts import compare, reductions

TTGIR = """#blocked = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [8, 4], warpsPerCTA = [4, 1], order = [1, 0]}>
#blocked1 = #ttg.blocked<{sizePerThread = [1], threadsPerWarp = [32], warpsPerCTA = [4], order = [0]}>
module {
    %a = "tt.reduce"(%x) <{axis = 1 : i32}> ({
    ^bb0(%p: f32, %q: f32):
      %s = arith.addf %p, %q : f32
      tt.reduce.return %s : f32
    }) : (tensor<4x4xf32, #blocked>) -> tensor<4xf32, #ttg.slice<{dim = 1, parent = #blocked}>>
    %b = "tt.reduce"(%y) <{axis = 0 : i32}> ({
    ^bb0(%p: f32, %q: f32):
      %s = arith.addf %p, %q : f32
      tt.reduce.return %s : f32
    }) : (tensor<4xf32, #ttg.slice<{dim = 1, parent = #blocked}>>) -> f32
    %c = "tt.reduce"(%z) <{axis = 0 : i32}> ({
    ^bb0(%p: f32, %q: f32):
      %s = arith.addf %p, %q : f32
      tt.reduce.return %s : f32
    }) : (tensor<4xf32, #blocked1>) -> f32
}
"""
BLOCKED = "#ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [8, 4], warpsPerCTA = [4, 1], order = [1, 0]}>"


def test_reductions_in_code_order_with_aliases_expanded():
    got = reductions(TTGIR)
    assert got == [f"axis 1 of 4x4xf32 in {BLOCKED}",
                   f"axis 0 of 4xf32 in #ttg.slice<{{dim = 1, parent = {BLOCKED}}}>",
                   "axis 0 of 4xf32 in #ttg.blocked<{sizePerThread = [1], threadsPerWarp = [32], "
                   "warpsPerCTA = [4], order = [0]}>"]


def test_compare_aligns_by_axis_and_shape_and_names_other_layouts():
    base = reductions(TTGIR)
    select = "axis 0 of 8x4x2xf32 in #L"  # a preloaded plan's row selection: only in the default
    same = compare([select] + base, base)
    assert same == {"aligned": 3, "only_in_default": 1, "only_here": 0, "aligned_with_other_layout": []}
    moved = base[:2] + ["axis 0 of 4xf32 in #other"]
    diff = compare([select] + base, moved)
    assert diff["aligned"] == 3 and diff["only_in_default"] == 1
    assert diff["aligned_with_other_layout"] == [f"axis 0 of 4xf32 in #other | default: {base[2].split(' in ', 1)[1]}"]
