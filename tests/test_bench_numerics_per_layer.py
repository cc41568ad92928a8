"""bench/numerics_per_layer.py: per-tensor distances from float64, and its stand-in for the fused
one-output-feature update (QA31's cause) -- which must change the numbers and be undone after."""
from bench import numerics_per_layer as NPL
from reptile_fast.backends import mlp_batched as MB


def test_rows_per_tensor_and_the_fused_form_is_restored(tmp_path):
    plain = NPL.ratios(2, "fomaml")
    with MB.fused_one_output_update():
        assert MB._FUSED_ONE_OUTPUT_UPDATE
        fused = NPL.ratios(2, "fomaml")
    assert not MB._FUSED_ONE_OUTPUT_UPDATE
    names = {f"{kind} {n}" for kind in ("adapted", "meta-grad")
             for n in ("network.0.weight", "network.0.bias", "network.2.weight", "network.2.bias",
                       "network.4.weight", "network.4.bias")}
    assert set(plain) == set(fused) == names
    # the fused form rounds the output layer's update twice: its adapted weights differ
    assert plain["adapted network.4.weight"] != fused["adapted network.4.weight"]
    out = tmp_path / "rows.json"
    result = NPL.main(["--seeds", "1", "--out", str(out)])
    assert out.exists() and set(result["rows"]) == names and result["settings"]["fused_output_update"] is False
