"""bench/triton_compile.py's ``dot_operand_bytes``: the shared-memory bytes an fp32 FMA ``tt.dot``'s
warps need per product, read from a TTGIR's layouts (the compile itself needs Triton without the
interpreter, so the records are bench commands, not tests)."""
from bench.triton_compile import dot_operand_bytes

# the two orientations of the sine MLP's forward product as Triton 3.6 laid them out for sm_90a
# (4 warps): batch-major [16, 64] = [16, 64] x [64, 64], feature-major [64, 16] = [64, 64] x [64, 16]
TTGIR = """#blocked = #ttg.blocked<{sizePerThread = [2, 2], threadsPerWarp = [1, 32], warpsPerCTA = [4, 1], order = [1, 0]}>
#blocked3 = #ttg.blocked<{sizePerThread = [2, 2], threadsPerWarp = [4, 8], warpsPerCTA = [4, 1], order = [1, 0]}>
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 64, 8]}>
module {
        %z = tt.dot %a, %b, %c : tensor<16x64xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * tensor<64x64xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<16x64xf32, #blocked> loc(#loc1)
        %t = tt.dot %w, %x, %c : tensor<64x64xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked3}>> * tensor<64x16xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked3}>> -> tensor<64x16xf32, #blocked3> loc(#loc2)
        %m = tt.dot %w, %x, %c : tensor<64x64xf32, #ttg.dot_op<{opIdx = 0, parent = #mma}>> * tensor<64x16xf32, #ttg.dot_op<{opIdx = 1, parent = #mma}>> -> tensor<64x16xf32, #mma> loc(#loc3)
}
"""


def test_each_warp_reads_the_rows_and_columns_its_tile_needs():
    batch_major, feature_major = dot_operand_bytes(TTGIR)  # the tensor-core dot is not an FMA dot: left out
    # batch-major: the 16 rows split over 4 warps (4 each), every warp spans all 64 columns, so every
    # warp reads all of w: 4 warps x (4 + 64) x 64 x 4 B
    assert batch_major == {"shape": [16, 64, 64], "sizePerThread": [2, 2], "threadsPerWarp": [1, 32],
                           "warpsPerCTA": [4, 1], "operand_bytes": 4 * (4 + 64) * 64 * 4}
    # feature-major: the 64 features split over 4 warps (16 each), each warp all 16 batch columns
    assert feature_major["shape"] == [64, 64, 16]
    assert feature_major["operand_bytes"] == 4 * (16 + 16) * 64 * 4


def test_a_dim_smaller_than_its_layout_tile_holds_copies():
    # rows: 2 per thread x 4 threads x 4 warps = 32 > 8, so each warp holds min(8, 2 x 4) = 8 rows (the
    # warps hold copies); columns: 4 x 8 x 1 = 32, the shape: each warp all 32
    ttgir = ("#blocked = #ttg.blocked<{sizePerThread = [2, 4], threadsPerWarp = [4, 8], warpsPerCTA = [4, 1], "
             "order = [1, 0]}>\n"
             "%z = tt.dot %a, %b, %c : tensor<8x16xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * "
             "tensor<16x32xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<8x32xf32, #blocked>\n")
    (dot,) = dot_operand_bytes(ttgir)
    assert dot["operand_bytes"] == 4 * (8 + 32) * 16 * 4
