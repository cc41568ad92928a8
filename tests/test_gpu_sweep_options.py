"""bench/gpu_sweep.py's command line: the precision and the grid of settings to sweep, and
kernel v2's launch defaults chosen from the H200 sweep (bench/results/gpu-h200-2026-12-04)."""
import json
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it on machines without CUDA
    # setting it here would switch every later-imported kernel to the interpreter on a GPU run
    pytest.skip("runs the kernels under the Triton interpreter (TRITON_INTERPRET=1)",
                allow_module_level=True)

pytest.importorskip("triton")

from bench import gpu_sweep as S  # noqa: E402


def _configs(*args, **kw):
    return list(S.settings(*args, **kw))


def test_default_grid_is_the_full_sweep():
    got = _configs(4096, False)
    assert got[0] == {}  # the default first: the correctness baseline
    # unstreamed: warps x accumulate x per-SM x (default, prefetch); streamed: default preload only
    assert len(got) == 1 + 2 * 2 * 4 * 2 + 2 * 2 * 4
    assert {c["stream"] for c in got[1:]} == {False, True}
    assert {c.get("preload", "default") for c in got[1:] if not c["stream"]} == {"default", "prefetch"}
    assert all("preload" not in c for c in got[1:] if c["stream"])
    assert _configs(1, False)[1:] == [c for c in got[1:] if c["programs_per_sm"] == 1]


@pytest.mark.parametrize("precision", ["tf32x3", "tf32"])
def test_other_precisions_leave_streamed_settings_out(precision):
    # streamed layers compute in fp32 whatever the precision: another computation, not a setting
    got = _configs(4096, False, precision)
    assert got[0] == {} and len(got) == 1 + 2 * 2 * 4 * 2
    assert not any(c["stream"] for c in got[1:])
    assert any(c["stream"] for c in _configs(4096, False, "ieee")[1:])


def test_grid_narrows_and_default_accumulation_leaves_the_field_out():
    got = _configs(4096, False, "ieee", {"warps": (4,), "per_sm": (2, 4), "accumulate": ("default",),
                                         "stream": (False,), "preload": ("default",)})
    assert got == [{}, {"num_warps": 4, "stream": False, "programs_per_sm": 2},
                   {"num_warps": 4, "stream": False, "programs_per_sm": 4}]
    got = _configs(4096, False, "ieee", {"warps": (4,), "per_sm": (2,), "accumulate": ("default",),
                                         "stream": (False, True), "preload": ("prefetch", True)})
    # no "default" preload asked for: the streamed kernel runs the ones asked for too
    assert got == [{}] + [{"num_warps": 4, "stream": st, "programs_per_sm": 2, "preload": pre}
                          for st in (False, True) for pre in ("prefetch", True)]


@pytest.mark.parametrize("argv, words", [
    (["--warps", "3"], "--warps"),
    (["--warps", "four"], "--warps"),
    (["--per-sm", "0"], "--per-sm"),
    (["--T", "1,x"], "--T"),
    (["--accumulate", "shared"], "--accumulate"),
    (["--stream", "yes"], "--stream"),
    (["--preload", "maybe"], "--preload"),
    (["--flat", "2d"], "--flat"),
    (["--transpose", "yes"], "--transpose"),
    (["--max-registers", "16"], "--max-registers"),
    (["--max-registers", "lots"], "--max-registers"),
    (["--precision", "fp16"], "--precision"),
])
def test_bad_flags_are_refused_with_the_flag_named(argv, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        S.main([str(tmp_path), "--cpu-smoke", *argv])
    assert exc.value.code == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "sweep.json").exists()


def test_cpu_smoke_sweeps_tf32_checked_against_float64(tmp_path):
    """The whole path at tiny sizes: tf32 meta-steps verified through the inner loop's mean,
    rows stamped with the precision, every setting checked before timing."""
    # --budget 480 in these in-process sweeps: the smoke default (120 s) skips settings past 110 s and its
    # deadline os._exit(3)s at 130 s, which would kill a pytest-xdist worker; one call took 51 s under -n 4
    rc = S.main([str(tmp_path), "--cpu-smoke", "--budget", "480", "--precision", "tf32", "--T", "5",
                 "--warps", "4", "--per-sm", "1,2", "--accumulate", "default", "--stream", "off", "--preload", "default"])
    assert rc == 0
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["precision"] == "tf32"
    rows = data["rows"]
    assert [r["config"] for r in rows] == [{}, {"num_warps": 4, "stream": False, "programs_per_sm": 1},
                                           {"num_warps": 4, "stream": False, "programs_per_sm": 2}]
    assert all(r["T"] == 5 and r["precision"] == "tf32" and r["ok"] and "ms" in r for r in rows), rows


def test_sweep_refuses_a_wrong_tf32_meta_step(monkeypatch):
    """A tf32 meta-step that moves φ at the wrong rate is not timed (the inner loop's mean, which
    verifies tf32 means, is itself checked against float64 first)."""
    import torch

    from bench import gpu_check as G
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    real = V.meta_step

    def half_step(*args, **kw):
        res = real(*args, **kw)
        phi = args[3]
        kw["out"].copy_(phi + 0.5 * (kw["out"] - phi))
        return res

    monkeypatch.setattr(V, "meta_step", half_step)
    monkeypatch.setattr(S, "settings", lambda T, smoke, *a: iter([{}]))
    rows = S.sweep_T(5, torch.device("cpu"), 8, True, G.Budget(120), lambda *a: None, precision="tf32")
    assert len(rows) == 1 and not rows[0]["ok"] and "ms" not in rows[0]
    assert "outer update differs from float64" in rows[0]["status"], rows[0]


def test_v2_launch_defaults_follow_the_h200_sweep():
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    sine, narrow = (1, 64, 64, 1), (1, 4, 1)
    assert V.num_warps_for(sine) == 4 and V.num_warps_for(narrow) == 4
    assert V.programs_per_sm_for(sine) == 2  # wide x wide layer in registers
    assert V.programs_per_sm_for(sine, V.V2Config(stream=True)) == 4
    assert V.programs_per_sm_for(narrow) == 4
    assert V.programs_per_sm_for(sine, V.V2Config(programs_per_sm=8)) == 8
    assert V.num_warps_for(sine, V.V2Config(num_warps=8)) == 8
    with pytest.raises(ValueError, match="programs_per_sm"):
        V.V2Config(programs_per_sm=0)
    with pytest.raises(TypeError, match="programs_per_sm"):
        V.V2Config(programs_per_sm=2.0)


def test_gpu_check_summary_names_the_fastest_variant_per_precision():
    """The H200 run's summary said "fastest Triton variant v2-tf32: ... 2.6x jax": a tf32 figure
    (error ~2e-5) where a reader looks for the exact default's.  Each precision has its own line."""
    from bench import gpu_check as G

    def timed(provider, T, tasks_per_s):
        return {"provider": provider, "T": T, "ms": T / tasks_per_s * 1e3, "tasks_per_s": tasks_per_s}

    rows = [timed("v2", 4096, 4.0e6), timed("v2-tf32x3", 4096, 7.0e6), timed("v2-tf32", 4096, 10.0e6),
            timed("v1-tf32", 4096, 6.0e6), timed("jax", 4096, 4.0e6), timed("torch", 4096, 2.0e6)]
    results = {"stages": {"env": {"gpu": "X", "sms": 1, "mode": "gpu"}, "timing": {"rows": rows, "rotations": 3}},
               "seconds": {}, "budget_s": 1}
    text = "\n".join(G.summary_lines(results))
    assert "T=4096: fastest ieee Triton variant v2: 2.0x torch, 1.0x jax" in text
    assert "T=4096: fastest tf32x3 Triton variant v2-tf32x3: 3.5x torch, 1.8x jax" in text
    assert "T=4096: fastest tf32 Triton variant v2-tf32: 5.0x torch, 2.5x jax" in text


def test_cpu_smoke_sweeps_prefetch_checked(tmp_path):
    """A prefetching setting (``--preload prefetch``) is checked against float64 and the default
    before it is timed, like every other setting; ``off`` reaches V2Config as False."""
    for word, value in (("prefetch", "prefetch"), ("off", False)):
        out = tmp_path / word
        rc = S.main([str(out), "--cpu-smoke", "--budget", "480", "--T", "5", "--warps", "4", "--per-sm", "1",
                     "--accumulate", "default", "--stream", "off", "--preload", word])
        assert rc == 0
        rows = json.loads((out / "sweep.json").read_text())["rows"]
        assert [r["config"] for r in rows] == [{}, {"num_warps": 4, "stream": False, "programs_per_sm": 1,
                                                    "preload": value}]
        assert all(r["ok"] and "ms" in r for r in rows), rows


def test_flat_is_swept_only_when_asked_and_unstreamed():
    """``V2Config.flat`` (1-wide layers in 2-D): the default grid leaves it to the kernel; ``--flat
    default,off`` adds the 3-D form beside each unstreamed setting (streamed ones keep the default)."""
    assert all("flat" not in c for c in _configs(4096, False))
    got = _configs(1, False, "ieee", {"warps": (4,), "per_sm": (2,), "accumulate": ("default",),
                                      "stream": (False, True), "preload": ("default",), "flat": ("default", False)})
    assert got == [{}, {"num_warps": 4, "stream": False, "programs_per_sm": 2},
                   {"num_warps": 4, "stream": False, "programs_per_sm": 2, "flat": False},
                   {"num_warps": 4, "stream": True, "programs_per_sm": 2}]


def test_transpose_is_swept_only_when_asked_and_unstreamed():
    """``V2Config.transpose`` (wide x wide products feature-major): the default grid leaves it to the
    kernel; ``--transpose default,off`` adds batch-major beside each unstreamed setting (a streamed
    layer has no ``tl.dot``: it keeps the default)."""
    assert all("transpose" not in c for c in _configs(4096, False))
    got = _configs(1, False, "ieee", {"warps": (4, 8), "per_sm": (2,), "accumulate": ("default",),
                                      "stream": (False, True), "preload": ("default",),
                                      "transpose": ("default", False)})
    assert got == [{}] + [c for w in (4, 8) for c in (
        {"num_warps": w, "stream": False, "programs_per_sm": 2},
        {"num_warps": w, "stream": False, "programs_per_sm": 2, "transpose": False},
        {"num_warps": w, "stream": True, "programs_per_sm": 2})]


def test_register_caps_are_swept_only_when_asked():
    """``V2Config.max_registers``: the default grid leaves it to the kernel; ``--max-registers
    default,128`` adds the cap beside each setting, streamed ones included (there it replaces the
    streamed kernel's own cap)."""
    assert all("max_registers" not in c for c in _configs(4096, False))
    got = _configs(4096, False, "ieee", {"warps": (4,), "per_sm": (2, 4), "accumulate": ("default",),
                                         "stream": (False, True), "preload": ("default",),
                                         "max_registers": ("default", 128)})
    assert got == [{}] + [dict({"num_warps": 4, "stream": st, "programs_per_sm": p}, **cap)
                          for st in (False, True) for p in (2, 4) for cap in ({}, {"max_registers": 128})]


@pytest.mark.parametrize("option, word, value", [("flat", "off", False), ("transpose", "off", False),
                                                 ("max_registers", "128", 128)])
def test_cpu_smoke_sweeps_a_layout_option_checked(tmp_path, option, word, value):
    """``--flat off`` / ``--transpose off`` / ``--max-registers 128`` reach V2Config and are checked
    against float64 and the default before they are timed."""
    rc = S.main([str(tmp_path), "--cpu-smoke", "--budget", "480", "--T", "5", "--warps", "4", "--per-sm", "1",
                 "--accumulate", "default", "--stream", "off", "--preload", "default",
                 f"--{option.replace('_', '-')}", word])
    assert rc == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [r["config"] for r in rows] == [{}, {"num_warps": 4, "stream": False, "programs_per_sm": 1, option: value}]
    assert all(r["ok"] and "ms" in r for r in rows), rows
