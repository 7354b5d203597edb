"""The fault hooks of the tests (``raysens.testing.faults``): the actor's settings carry the unit delay
and the kill."""

from __future__ import annotations


def test_actor_fault_settings_carry_the_unit_delay_and_the_kill(monkeypatch, tmp_path):
    """The actor hooks are off unless armed; a delay alone sleeps before each unit and never kills."""
    import time

    from raysens.testing import faults

    for k in (faults.ACTOR_KILL, faults.ACTOR_MARKER, faults.ACTOR_DELAY):
        monkeypatch.delenv(k, raising=False)
    assert faults.actor_settings() == {}
    faults.actor_unit_start(10**6, {})  # unarmed: returns
    monkeypatch.setenv(faults.ACTOR_DELAY, "0.2")
    settings = faults.actor_settings()
    assert settings == {"delay_s": 0.2}
    t0 = time.perf_counter()
    faults.actor_unit_start(10**6, settings)  # sleeps, does not exit
    assert time.perf_counter() - t0 >= 0.2
    monkeypatch.setenv(faults.ACTOR_KILL, "3")
    monkeypatch.setenv(faults.ACTOR_MARKER, str(tmp_path / "m"))
    assert faults.actor_settings() == {"kill_after": 3, "kill_marker": str(tmp_path / "m"), "delay_s": 0.2}
