"""Issue 28, one error family (``raysens.errors``): every user-facing error class derives from
``RaysensError`` and keeps its builtin base, pickles to the same class, message and attributes (how
it crosses Ray), restates its ``detail`` instead of having prefixes cut from its text, and the
command line prints any of them as one line with exit code 1 (2 for a config error)."""

from __future__ import annotations

import ast
import importlib
import pickle
from pathlib import Path

import pytest

from raysens.errors import ArgumentError, RaysensError, detail_of

PKG = Path(__file__).resolve().parents[2] / "raysens"
# exceptions that never reach the user: control flow inside one module (a lane job skipped, a probe
# stopped, the test-only simulated Ctrl-C, the SIGTERM signal turned into an exception)
INTERNAL = {"raysens.backends.overlap.Skipped", "raysens.core.models.conventions.Stop",
            "raysens.testing.faults.SimulatedInterrupt", "raysens.run.signals.Terminated"}


def _exception_classes() -> dict[str, type]:
    """Every exception class defined in ``raysens`` (found by reading the source: a module with a
    class whose bases name an Error, Exception or Interrupt is imported and its classes checked)."""
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
        if not any(any(w in ast.unparse(b) for w in ("Error", "Exception", "Interrupt")) for c in classes
                   for b in c.bases):
            continue
        mod = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
        module = importlib.import_module(mod)
        for c in classes:
            obj = getattr(module, c.name, None)
            if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == mod:
                found[f"{mod}.{c.name}"] = obj
    return found


CLASSES = _exception_classes()


def test_the_scan_finds_the_errors_and_the_internal_signals():
    names = {n.rsplit(".", 1)[1] for n in CLASSES}
    assert {"ConfigError", "CorpusError", "RunError", "ClusterError", "SweepError", "PartialError",
            "PartialFormatError", "CheckpointError", "WeightsError", "LeaseError", "ModelLoadError",
            "NonFiniteGradientError", "SampleMemoryError", "FoldError", "CommandError", "ArgumentError",
            "RaysensError"} <= names, sorted(names)
    assert INTERNAL <= set(CLASSES), sorted(INTERNAL - set(CLASSES))


def test_every_user_facing_error_is_a_raysens_error():
    outside = sorted(n for n, c in CLASSES.items() if n not in INTERNAL and not issubclass(c, RaysensError))
    assert not outside, f"exception classes outside the family (derive from raysens.errors.RaysensError): {outside}"
    assert not [n for n in INTERNAL if issubclass(CLASSES[n], RaysensError)]


@pytest.mark.parametrize("name, builtin", [
    ("raysens.config.ConfigError", ValueError), ("raysens.corpus.reader.CorpusError", ValueError),
    ("raysens.store.rundir.RunError", RuntimeError), ("raysens.backends.spec.ClusterError", RuntimeError),
    ("raysens.run.sweep.SweepError", RuntimeError), ("raysens.store.partials.PartialError", ValueError),
    ("raysens.store.checkpoint.CheckpointError", ValueError), ("raysens.core.models.loading.WeightsError", ValueError),
    ("raysens.store.lease.LeaseError", RuntimeError), ("raysens.core.models.hub.ModelLoadError", RuntimeError),
    ("raysens.core.engine.NonFiniteGradientError", FloatingPointError),
    ("raysens.core.memory.oom.SampleMemoryError", MemoryError), ("raysens.backends.overlap.FoldError", RuntimeError),
    ("raysens.errors.ArgumentError", ValueError)])
def test_each_error_keeps_its_builtin_base(name, builtin):
    assert issubclass(CLASSES[name], builtin) and issubclass(CLASSES[name], RaysensError)


def test_every_error_pickles_to_the_same_class_message_and_attributes():
    for name, cls in CLASSES.items():
        if not issubclass(cls, RaysensError):
            continue
        if name.endswith("NonFiniteGradientError"):  # (sample_ids, partial), not a message
            err = cls([3, 5], None)
        else:
            err = cls(f"{cls.__name__}: something is wrong; change it")
        err.resume_hint = "rerun to resume"
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is cls and str(back) == str(err) and back.args == err.args, name
        assert back.__dict__ == err.__dict__, name
    nf = pickle.loads(pickle.dumps(CLASSES["raysens.core.engine.NonFiniteGradientError"]([3, 5], None)))
    assert nf.sample_ids == [3, 5] and str(nf) == "SensitivityEngine.compute: NaN/Inf in gradients for sample_ids [3, 5]"


def test_an_error_built_from_parts_keeps_them():
    e = ArgumentError(call="SensitivityConfig", detail="num_probes must be >= 1, got 0")
    assert str(e) == "SensitivityConfig: num_probes must be >= 1, got 0" and isinstance(e, ValueError)
    assert (e.call, e.detail, detail_of(e)) == ("SensitivityConfig", "num_probes must be >= 1, got 0",
                                                 "num_probes must be >= 1, got 0")
    plain = RaysensError("corpus 'x': empty")
    assert (plain.call, plain.detail) == ("", "corpus 'x': empty")
    assert detail_of(ValueError("not ours")) == "not ours"
    assert str(ArgumentError(detail="seed must be an integer")) == "seed must be an integer"


def test_restated_errors_use_the_detail_and_say_the_same():
    """Config keys, the engine's layers and compat's arguments restate a core error under their own
    name: the text is the one the old ``.replace`` of the prefix gave."""
    from raysens.config import ConfigError, load_config
    from raysens.core.models.structure import resolve_layer_indices
    from raysens.core.options import SensitivityConfig

    with pytest.raises(ArgumentError) as ei:
        SensitivityConfig(num_probes=0)
    assert str(ei.value) == "SensitivityConfig: num_probes must be >= 1, got 0"
    with pytest.raises(ConfigError) as ei:
        load_config(str(PKG.parent / "jobs" / "configs" / "quickstart.yaml"), ["--sensitivity.num_probes=0"])
    assert str(ei.value) == "sensitivity: num_probes must be >= 1, got 0"
    with pytest.raises(ConfigError) as ei:
        load_config(str(PKG.parent / "jobs" / "configs" / "quickstart.yaml"), ["--sensitivity.seed=1.5"])
    assert str(ei.value) == "sensitivity: seed must be an integer in [0, 2**64), got 1.5 (float)"
    with pytest.raises(ArgumentError) as ei:
        resolve_layer_indices([7], 2)
    assert ei.value.call == "SensitivityEngine.compute" and str(ei.value).startswith("SensitivityEngine.compute: layer 7")


@pytest.mark.parametrize("make", [
    lambda: __import__("raysens.backends.overlap", fromlist=["x"]).FoldError("the fold of unit 3 failed"),
    lambda: __import__("raysens.core.memory.oom", fromlist=["x"]).SampleMemoryError("sample 4 does not fit"),
    lambda: __import__("raysens.report.commands", fromlist=["x"]).CommandError("no run in /x"),
    lambda: __import__("raysens.store.lease", fromlist=["x"]).LeaseError("another driver holds /x"),
])
def test_the_command_line_prints_any_family_error_as_one_line(make, capsys, monkeypatch):
    """Raised anywhere in a run (here: by the runner), a family error is one line and exit code 1 —
    classes the command line's old hand list did not name included."""
    import raysens.cli as cli
    import raysens.run.runner as runner

    err = make()

    def fail(config):
        raise err

    monkeypatch.setattr(runner, "run", fail)
    assert cli.main_run([str(PKG.parent / "jobs" / "configs" / "quickstart.yaml")]) == 1
    assert capsys.readouterr().err.splitlines() == [f"raysens run: error: {err}"]
