"""QA89 (session 26): concurrency and re-entrancy as users meet them — trainers fitting in two
threads (a hyper-parameter search with ``ThreadPoolExecutor``), ``fit``/``meta_step`` called from a
``fit`` callback, two trainers sharing one model.
"""
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from reptile_fast import MLP, Reptile, Sine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_model_recognition_is_safe_while_other_threads_trace_or_run_modules():
    """torch.fx's trace replaces ``nn.Module.__call__``/``__getattr__`` process-wide while it runs.
    Two trainers built at once in two threads (backends compiled, torch, auto) traced their models
    at the same moment: one was refused with a bogus ``UnsupportedModelError`` ("module is not
    installed as a submodule", "CURRENT_PATCHER is None"), a plain forward in a third thread raised
    ``NameError``, and the two traces put the methods back in the wrong order, leaving every later
    module call in the process broken.  Run in a subprocess: before the fix it broke torch there."""
    script = textwrap.dedent("""
        import sys, threading, torch
        from reptile_fast import MLP
        from reptile_fast.mlp_spec import extract_mlp_spec
        call, getattr_ = torch.nn.Module.__call__, torch.nn.Module.__getattr__
        sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows at once
        errors, stop = [], threading.Event()
        def trace():
            for _ in range(15):
                try:
                    spec = extract_mlp_spec(MLP())
                    assert spec.dims == (1, 64, 64, 1) and spec.activations == ("tanh", "tanh", "identity")
                except Exception as exc:
                    errors.append(f"trace: {type(exc).__name__}: {exc}"[:160])
        def forward():
            model, x = MLP(), torch.zeros(4, 1)
            while not stop.is_set():
                try:
                    model(x)
                except Exception as exc:
                    errors.append(f"forward: {type(exc).__name__}: {exc}"[:160])
        threads = [threading.Thread(target=trace) for _ in range(2)]
        runner = threading.Thread(target=forward)
        runner.start()
        [t.start() for t in threads]
        [t.join() for t in threads]
        stop.set(); runner.join()
        sys.setswitchinterval(0.005)
        print("errors", len(errors), sorted(set(errors))[:3])
        print("restored", torch.nn.Module.__call__ is call and torch.nn.Module.__getattr__ is getattr_)
        MLP()(torch.zeros(2, 1))
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert "errors 0 []" in out.stdout and "restored True" in out.stdout and "ok" in out.stdout, out.stdout


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_trainers_fitting_in_a_thread_pool_match_the_sequential_runs(backend):
    """A hyper-parameter search: four trainers, each with its own model and generator, fit at the
    same time in a ``ThreadPoolExecutor`` and end with exactly the parameters and losses of the
    same fits run one after the other (the native program holds no state between calls; the
    trace that recognises the model is safe across threads)."""
    jobs = [(0, 0.02), (1, 0.03), (2, 0.02), (3, 0.01)]
    models = []
    for seed, _ in jobs:
        torch.manual_seed(seed)
        models.append(MLP(hidden_dim=16))

    def run(job, model):
        seed, lr = job
        trainer = Reptile(model, inner_lr=lr, inner_steps=3, inner_batch_size=10, outer_lr=0.1, backend=backend)
        history = trainer.fit(Sine(), 30, meta_batch_size=2, generator=torch.Generator().manual_seed(seed),
                              progress=False)
        return _flat(model), history["loss"]

    copies = [MLP(hidden_dim=16) for _ in jobs]
    for c, m in zip(copies, models):
        c.load_state_dict(m.state_dict())
    sequential = [run(job, c) for job, c in zip(jobs, copies)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        concurrent = list(pool.map(run, jobs, models))
    for (p_seq, l_seq), (p_par, l_par) in zip(sequential, concurrent):
        assert torch.equal(p_seq, p_par)
        assert l_seq == l_par


def _hold_fit(trainer, started, release, errors):
    """``trainer.fit`` in this thread, paused inside its first callback until ``release`` is set."""
    def callback(iteration, metrics):
        if iteration == 1:
            started.set()
            release.wait(60)
    try:
        trainer.fit(Sine(), 3, generator=torch.Generator().manual_seed(0), progress=False, callback=callback)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        errors.append(exc)
        started.set()


@pytest.mark.parametrize("shared", ["model", "trainer"])
def test_a_second_concurrent_fit_of_one_model_is_refused(shared):
    """Two fits updating one model in place at once — two trainers sharing the model, or one
    trainer's ``fit`` in two threads — interleaved their outer updates, or one's result silently
    replaced the other's (backend compiled), each reporting its own iterations.  The second is now
    refused with a ``ValueError`` saying why, before anything changes, and the first runs on."""
    torch.manual_seed(0)
    model = MLP(hidden_dim=8)
    first = Reptile(model, inner_steps=2, backend="torch")
    second = first if shared == "trainer" else Reptile(model, inner_steps=2, backend="torch")
    started, release, errors = threading.Event(), threading.Event(), []
    thread = threading.Thread(target=_hold_fit, args=(first, started, release, errors))
    thread.start()
    try:
        assert started.wait(60)
        before = _flat(model)
        with pytest.raises(ValueError, match="cannot run while a fit trains this model"):
            second.fit(Sine(), 5, generator=torch.Generator().manual_seed(1), progress=False)
        with pytest.raises(ValueError, match="meta_step cannot run while a fit trains this model"):
            second.meta_step(Sine().sample(2, generator=torch.Generator().manual_seed(2)))
        assert torch.equal(_flat(model), before)
    finally:
        release.set()
        thread.join(60)
    assert not errors and first.iteration == 3
    # once the first fit has ended, the model is free again
    second.fit(Sine(), first.iteration + 2 if shared == "trainer" else 2, generator=torch.Generator().manual_seed(1),
               progress=False)


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_fit_and_meta_step_from_a_fit_callback_are_refused(backend):
    """``meta_step`` from a ``fit`` callback took a meta-step that the running loop did not count:
    φ ended one update ahead of ``trainer.iteration`` (backends reference and torch; on backend
    compiled ``iteration`` counted it but the history did not), and a nested ``fit`` was refused
    with a message about ``total_iterations``.  Both are now refused with a ``ValueError`` naming
    the running fit, and the run equals one without those calls; ``evaluate`` from a callback runs."""
    def run(reenter):
        torch.manual_seed(0)
        model = MLP(hidden_dim=8)
        trainer = Reptile(model, inner_steps=2, backend=backend)
        tasks = Sine().sample(2, generator=torch.Generator().manual_seed(5))
        seen = []

        def callback(iteration, metrics):
            if reenter and iteration == 2:
                for call in (lambda: trainer.meta_step(tasks),
                             lambda: trainer.fit(Sine(), 9, generator=torch.Generator().manual_seed(1),
                                                 progress=False)):
                    with pytest.raises(ValueError) as info:
                        call()
                    seen.append(str(info.value))
                assert trainer.evaluate(tasks, 2).shape == (2,)
        history = trainer.fit(Sine(), 4, generator=torch.Generator().manual_seed(0), progress=False,
                              callback=callback)
        return _flat(model), trainer.iteration, history["loss"], seen

    plain, reentered = run(False), run(True)
    assert [m.split(" (")[0] for m in reentered[3]] == ["meta_step cannot run while a fit trains this model",
                                                      "fit cannot run while a fit trains this model"]
    assert torch.equal(plain[0], reentered[0]) and plain[1] == reentered[1] == 4 and plain[2] == reentered[2]


def test_the_claim_on_a_model_ends_with_the_fit_whatever_its_outcome():
    """A fit refused for a bad argument, one that raises from its callback, and one that ends
    normally all leave the model free: another trainer of it (sequential use) fits afterwards."""
    torch.manual_seed(0)
    model = MLP(hidden_dim=8)
    a, b = Reptile(model, inner_steps=2, backend="torch"), Reptile(model, inner_steps=2, backend="torch")
    with pytest.raises(NotADirectoryError):
        a.fit(Sine(), 3, progress=False, checkpoint_dir=os.devnull)  # a file, not a folder

    def boom(iteration, metrics):
        raise RuntimeError("stop")
    with pytest.raises(RuntimeError, match="stop"):
        a.fit(Sine(), 3, progress=False, callback=boom)
    a.fit(Sine(), 3, progress=False)
    b.fit(Sine(), 2, progress=False)
    b.meta_step(Sine().sample(2))
    assert b.iteration == 3


def _fit_in_process(seed, hidden):
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = MLP(hidden_dim=hidden)
    trainer = Reptile(model, inner_steps=3, backend="compiled")
    trainer.fit(Sine(), 20, meta_batch_size=2, generator=torch.Generator().manual_seed(seed), progress=False)
    return _flat(model), trainer.last_fit_stats["mode"]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_processes_fitting_the_compiled_backend_with_an_empty_cache_agree(method, tmp_path, monkeypatch):
    """Two processes start the compiled backend at the same moment with an empty compile cache:
    both compile (or one loads the other's library, written under a temporary name and renamed),
    both run the native program, and both end with the parameters this process computes.  (A shape
    no other test builds: a forked child inherits this process's loaded programs.)"""
    import multiprocessing

    hidden = {"fork": 11, "spawn": 13}[method]
    monkeypatch.setenv("REPTILE_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with multiprocessing.get_context(method).Pool(2) as pool:
        results = pool.starmap_async(_fit_in_process, [(0, hidden), (1, hidden)]).get(timeout=300)
    for seed, (params, mode) in enumerate(results):
        assert mode == "native"
        assert torch.equal(params, _fit_in_process(seed, hidden)[0])
    assert not [p for p in os.listdir(tmp_path / "cache") if p.endswith(".tmp")]

