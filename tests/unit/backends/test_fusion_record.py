"""The run manifest's record of ``SensitivityConfig.fusion`` (issue 30): a worker's model record (the
manifest's ``model``, from the first shipment) carries the engine's ``fusion_info`` — asked, used,
why, compile seconds."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("sens, used, why", [({}, "eager", "fusion 'eager'"),
                                              ({"mode": "forward", "fusion": "auto"}, "eager", "on a llama stack")])
def test_the_worker_records_the_fusion_choice_and_why(sens, used, why):
    from raysens.backends import units

    spec = units.WorkerSpec(model_name="random:tiny-llama", trust_remote_code=False, device="cpu",
                            sensitivity=sens, layers=[1], max_seq_len=8, fingerprint="f")
    w = units.UnitWorker(spec, shared={})
    rec = w.model_identity["fusion"]
    assert rec["asked"] == sens.get("fusion", "eager") and rec["used"] == used and why in rec["why"]
    assert rec["compile_s"] == 0.0  # nothing compiled for an eager choice
    assert rec == w.engine.fusion_info
