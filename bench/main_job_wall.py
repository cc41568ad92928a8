"""Wall time of the main job, cold and warm, beside the same experiment written plainly in JAX.

Each round, in a rotating order so that the shared machine's drifting load hits every side alike:

* ``cold``: ``python -m reptile_fast sine --out <tmp> --no-progress`` with empty compile caches
  (fresh ``REPTILE_FAST_CACHE_DIR``, ``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR``,
  ``XDG_CACHE_HOME``): a newcomer's first run;
* ``warm``: the same command again on the caches ``cold`` filled: every run after the first;
* ``jax``: ``bench/jax_sine_job.py`` (jit + ``lax.scan`` over chunks of 500 meta-steps, the same
  evaluation) with ``--jax-python`` (an interpreter that has JAX; JAX keeps no compile cache across
  processes by default, so each of its runs compiles).

Whole process wall time (subprocess start to exit, imports included).  Optionally, once each:
``--baseline REV`` — the main job of an earlier commit (``git archive REV``, e.g. 3f7f800, whose
compiled path was ``torch.compile``'s ``scan``), cold and warm; ``--seed-program`` — the seed's
own ``seed_program.py`` (its 30000 iterations and its demo; ``SEED_THREADS=1`` pins its threads);
``--no-compiler`` — each round also runs the main job as on a slim image with no C or C++ compiler
(``PATH`` an empty folder, ``CC``/``CXX`` unset, warm caches otherwise): the eager fallback.

    python -m bench.main_job_wall --rounds 5 --jax-python /work/venvs/cpu/bin/python \\
        --baseline 3f7f800 --seed-program --out bench/results/main_job_wall_cpu.json

Reports each series' median and the median of the per-round ratios cold/jax and warm/jax (the
issue's targets: cold ≤ 2, warm ≤ 1).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT.parent / "shared" / "seed" / "seed_program.py"


def _fresh_cache_env(base: Path) -> dict:
    env = dict(os.environ)
    for var, sub in (("REPTILE_FAST_CACHE_DIR", "reptile_fast"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
                     ("TRITON_CACHE_DIR", "triton"), ("XDG_CACHE_HOME", "xdg")):
        env[var] = str(base / sub)
    return env


#: A job's run counts as a timing only if its post-adaptation MSE is a trained model's: the seed's
#: own program gives 0.016-0.038 over training seeds 0-5 (bench/results/seed_experiment_cpu*.json);
#: an untrained or barely trained model scores 0.15 or more.
MAX_TRAINED_MSE = 0.06


def _timed(cmd, *, env, cwd=None, metrics: Path = None) -> dict:
    """Run ``cmd``, time it, and (with ``metrics``) check its answer: a run that writes no
    metrics, or whose post-adaptation MSE is not finite or above ``MAX_TRAINED_MSE``, raises
    instead of being recorded as a timing."""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    out = {"wall_seconds": wall, "loadavg_1min": os.getloadavg()[0]}
    if metrics is not None:
        if not metrics.exists():
            raise RuntimeError(f"{' '.join(map(str, cmd))} wrote no {metrics.name}: its answer cannot be checked, "
                               f"so its time is not a result")
        m = json.loads(metrics.read_text())
        mse = m.get("post_adaptation_mse")
        if not isinstance(mse, (int, float)) or not 0 <= mse <= MAX_TRAINED_MSE:
            raise RuntimeError(f"{' '.join(map(str, cmd))}: post-adaptation MSE {mse!r} is not a trained model's "
                               f"(<= {MAX_TRAINED_MSE}), so its time is not a result")
        out.update({k: m[k] for k in ("post_adaptation_mse", "train_seconds", "compile_seconds", "eval_seconds",
                                      "ms_per_iteration", "import_seconds", "eval_compile_seconds", "backend",
                                      "mode")
                    if k in m})
    return out


def no_compiler_env(env: dict, empty: Path) -> dict:
    """``env`` as on a machine with no C or C++ compiler: nothing on ``PATH`` (the interpreter is
    called by its full path) and no ``CC``/``CXX``."""
    empty.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in env.items() if k not in ("CC", "CXX")}
    env["PATH"] = str(empty)
    return env


def main_job(python: str, src: Path, out: Path, env: dict) -> dict:
    env = dict(env, PYTHONPATH=str(src))
    shutil.rmtree(out, ignore_errors=True)
    return _timed([python, "-m", "reptile_fast", "sine", "--out", str(out), "--no-progress"], env=env,
                  cwd=str(src), metrics=out / "metrics.json")


def jax_job(python: str, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    return _timed([python, str(ROOT / "bench" / "jax_sine_job.py"), "--out", str(out)], env=dict(os.environ),
                  metrics=out / "metrics.json")


def summary(runs) -> dict:
    walls = [r["wall_seconds"] for r in runs]
    return {"median_wall_seconds": statistics.median(walls), "min_wall_seconds": min(walls),
            "max_wall_seconds": max(walls), "n": len(walls)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--python", default=sys.executable, help="interpreter of the main job")
    p.add_argument("--jax-python", default=None, help="interpreter that has JAX (default: --python)")
    p.add_argument("--baseline", default=None, help="also time this git revision's main job once, cold and warm")
    p.add_argument("--seed-program", action="store_true", help="also time the seed's own program once")
    p.add_argument("--no-compiler", action="store_true",
                   help="each round, also time the main job with no C/C++ compiler on PATH (the eager fallback)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "main_job_wall_cpu.json"))
    args = p.parse_args(argv)
    jax_python = args.jax_python or args.python
    sys.path.insert(0, str(ROOT))
    from bench.env import machine_stamp

    series = {"cold": [], "warm": [], "jax": []}
    ratios = {"cold_over_jax": [], "warm_over_jax": []}
    if args.no_compiler:
        series["no_compiler"], ratios["no_compiler_over_warm"] = [], []
    result = {"experiment": "the main job (reptile-fast sine, defaults: the seed's experiment) wall time, "
                            "cold (empty compile caches) and warm, beside the same experiment in JAX",
              "main_job_command": "python -m reptile_fast sine --out <tmp> --no-progress",
              "jax_command": f"{jax_python} bench/jax_sine_job.py --out <tmp>",
              "note": "whole-process wall time; rounds in rotating order; the machine's 2 cores are shared "
                      "with other jobs (load average recorded per run), so ratios are taken within a round"}
    def write(final: bool = False) -> None:
        """Write what has been measured so far (a crash or Ctrl-C later keeps it)."""
        if series["cold"] and series["warm"] and (series["jax"] or not has_jax):
            result["summary"] = {k: summary(v) for k, v in series.items() if v}
            measured = {k: v for k, v in ratios.items() if v}
            if measured:
                result["ratios"] = {k: {"per_round": v, "median": statistics.median(v)} for k, v in measured.items()}
            if has_jax and ratios["cold_over_jax"]:
                result["targets"] = {"cold_over_jax_max": 2.0, "warm_over_jax_max": 1.0,
                                     "cold_met": result["ratios"]["cold_over_jax"]["median"] <= 2.0,
                                     "warm_met": result["ratios"]["warm_over_jax"]["median"] <= 1.0}
        result["runs"] = series
        result["complete"] = final
        result.update(machine_stamp(), jax=jax_version)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    try:
        jax_version = subprocess.run([jax_python, "-c", "import jax; print(jax.__version__)"],
                                     capture_output=True, text=True).stdout.strip()
    except OSError:
        jax_version = None
    # without JAX the main job's series still run (the no-compiler one included), with no ratios to
    # JAX; before QA46 a missing JAX crashed the run after its first two jobs, writing nothing
    has_jax = bool(jax_version)
    if not has_jax:
        result["jax_skipped"] = f"JAX is not importable by {jax_python}: pass --jax-python an interpreter that has it"
        print(f"main_job_wall: {result['jax_skipped']}; timing the main job alone", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="main_job_wall_") as tmp:
        tmp = Path(tmp)
        for r in range(args.rounds):
            env = _fresh_cache_env(tmp / f"caches{r}")
            order = [("cold", "warm", "jax"), ("jax", "cold", "warm"), ("cold", "jax", "warm")][r % 3]
            if args.no_compiler:  # after cold, on the caches it filled (which hold no program it can use)
                order = order + ("no_compiler",) if r % 2 == 0 else ("cold", "no_compiler") + tuple(
                    k for k in order if k != "cold")
            order = tuple(k for k in order if k != "jax" or has_jax)
            got = {}
            for kind in order:
                if kind == "jax":
                    got[kind] = jax_job(jax_python, tmp / "jax")
                elif kind == "no_compiler":
                    got[kind] = main_job(args.python, ROOT, tmp / "job", no_compiler_env(env, tmp / "no_bin"))
                    if got[kind].get("mode") != "eager":
                        raise RuntimeError(f"the main job without a compiler ran mode {got[kind].get('mode')!r}, "
                                           f"not the eager fallback: a compiler was still found")
                else:  # warm always runs after cold, on the caches cold filled
                    got[kind] = main_job(args.python, ROOT, tmp / "job", env)
                series[kind].append(got[kind])
                print(r, kind, json.dumps(got[kind]), flush=True)
            if has_jax:
                ratios["cold_over_jax"].append(got["cold"]["wall_seconds"] / got["jax"]["wall_seconds"])
                ratios["warm_over_jax"].append(got["warm"]["wall_seconds"] / got["jax"]["wall_seconds"])
            if args.no_compiler:
                ratios["no_compiler_over_warm"].append(got["no_compiler"]["wall_seconds"]
                                                       / got["warm"]["wall_seconds"])
            write()
        if args.baseline:
            src = tmp / "baseline"
            src.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline], capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
            env = _fresh_cache_env(tmp / "caches_baseline")
            base = {"revision": args.baseline}
            for kind in ("cold", "warm", "jax") if has_jax else ("cold", "warm"):
                base[kind] = (jax_job(jax_python, tmp / "jax") if kind == "jax" else
                              main_job(args.python, src, tmp / "job", env))
                print("baseline", kind, json.dumps(base[kind]), flush=True)
            if has_jax:
                base["cold_over_jax"] = base["cold"]["wall_seconds"] / base["jax"]["wall_seconds"]
                base["warm_over_jax"] = base["warm"]["wall_seconds"] / base["jax"]["wall_seconds"]
            result["baseline"] = base
            write()
        if args.seed_program:
            if not SEED.exists():
                result["seed_program"] = {"skipped": f"{SEED} not found"}
            else:
                cwd = tmp / "seed"
                (cwd / "Imgs").mkdir(parents=True)
                env = dict(os.environ, MPLBACKEND="Agg")
                threads = os.environ.get("SEED_THREADS")
                if threads:  # e.g. 1: torch's default two threads crawl on a loaded 2-core machine
                    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
                result["seed_program"] = _timed([args.python, str(SEED)], env=env, cwd=str(cwd))
                result["seed_program"]["command"] = f"python {SEED.name} (its 30000 iterations and demo)"
                result["seed_program"]["threads"] = (f"OMP_NUM_THREADS=MKL_NUM_THREADS={threads} (SEED_THREADS)"
                                                     if threads else "torch's default")
                print("seed", json.dumps(result["seed_program"]), flush=True)
    write(final=True)
    print(json.dumps({"summary": result.get("summary"),
                      "ratios": {k: v["median"] for k, v in result.get("ratios", {}).items()}}, indent=2))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
