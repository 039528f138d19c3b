"""Deadline assignment and admission decisions (no Ray)."""

from __future__ import annotations

import pytest

from dilaserve.serving.admission import (
    Deadline, Prediction, SLODefaults, SLOTargets, assign_deadline, decide, is_slo_met,
)


def test_deadline_from_slo_scale_when_nothing_is_given():
    d = assign_deadline(SLOTargets(), SLODefaults(slo_scale=4.0), solo_s=0.5, num_output_tokens=64)
    assert d.budget_s == pytest.approx(2.0) and d.source == "slo_scale"


def test_request_deadline_wins():
    d = assign_deadline(SLOTargets(deadline_s=3.0, ttft_s=0.1, tpot_s=0.01), SLODefaults(), 0.5, 64)
    assert d.budget_s == 3.0 and d.source == "request" and d.ttft_s == 0.1


def test_deadline_from_ttft_and_tpot_mixing_request_and_defaults():
    d = assign_deadline(SLOTargets(tpot_s=0.02), SLODefaults(slo_scale=10, ttft_s=0.5), 9.0, 51)
    assert d.budget_s == pytest.approx(0.5 + 0.02 * 50) and d.source == "ttft_tpot"


def test_one_of_ttft_tpot_alone_falls_back_to_slo_scale_but_stays_a_target():
    d = assign_deadline(SLOTargets(ttft_s=0.2), SLODefaults(slo_scale=2.0), 1.0, 10)
    assert d.budget_s == 2.0 and d.ttft_s == 0.2 and d.tpot_s is None


def test_admits_when_some_replica_finishes_in_time():
    assert decide(1.0, [Prediction(3.0, 0.2), Prediction(0.9, 0.2)]).is_admitted


def test_refuses_with_retry_after_when_none_can():
    decision = decide(1.0, [Prediction(3.4, 0.2), Prediction(2.2, 0.2)])
    assert not decision.is_admitted
    assert decision.retry_after_s == 2  # ceil(2.2 - 1.0)
    assert "earliest predicted finish" in decision.reason


def test_refusal_says_when_even_an_idle_replica_is_too_slow():
    decision = decide(0.001, [Prediction(0.5, 0.4)])
    assert not decision.is_admitted and decision.retry_after_s >= 1 and "idle replica" in decision.reason


def test_best_effort_and_disabled_admission_always_admit():
    assert decide(0.001, [Prediction(9.0, 9.0)], is_best_effort=True).is_admitted
    assert decide(0.001, [Prediction(9.0, 9.0)], is_enabled=False).is_admitted


def test_no_replica_is_a_refusal():
    assert not decide(1.0, []).is_admitted


def test_slo_met_checks_budget_and_targets():
    d = Deadline(1.0, ttft_s=0.2, tpot_s=0.01, source="request")
    assert is_slo_met(d, 0.9, 0.1, 0.005)
    assert not is_slo_met(d, 1.1, 0.1, 0.005)
    assert not is_slo_met(d, 0.9, 0.3, 0.005)
    assert not is_slo_met(d, 0.9, 0.1, 0.02)
    assert is_slo_met(Deadline(1.0, None, None, "slo_scale"), 0.99, 0.9, 0.5)
