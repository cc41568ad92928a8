"""QA66 (session 25): a newcomer's walk through the README.

* ``CC`` naming no program got "no C compiler found (set CC, …)" although CC was set and cc was
  on PATH; now the message names the value.
* ``reptile-fast omniglot --help`` said ``--checkpoint-every 0`` writes "only at the end"; a
  Ctrl-C/SIGTERM writes one too, as the sine job's help says.
* ``--adam-state carried --backend torch`` printed the flag twice ("--adam-state 'carried'
  (--adam-state carried)").
"""
import pytest

from reptile_fast import native_build
from reptile_fast.cli import build_parser, main


def test_a_cc_that_names_no_program_is_named_in_the_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "/nonexistent/cc-qa66 -m64")
    monkeypatch.setenv("REPTILE_FAST_CACHE_DIR", str(tmp_path))
    with pytest.raises(native_build.NativeCompilerError, match=r"\$CC='/nonexistent/cc-qa66 -m64' names no program"):
        native_build.load_library("int f(void){return 1;}\n", "qa66")


def _help_of(sub, flag):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return next(a for a in subparsers.choices[sub]._actions if flag in a.option_strings).help


def test_omniglot_checkpoint_every_help_mentions_signals_like_sine():
    for job in ("sine", "omniglot"):
        assert "0: only at the end and on Ctrl-C/SIGTERM" in _help_of(job, "--checkpoint-every"), job


def test_carried_adam_on_another_backend_names_each_flag_once(tmp_path, capsys):
    rc = main(["omniglot", "--train", str(tmp_path), "--test", str(tmp_path), "--adam-state", "carried",
               "--backend", "torch", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("--adam-state") == 1 and "--adam-state carried runs the tasks one after another" in err, err
    assert "--backend torch" in err, err
