"""Profile files: the shipped defaults, round trips, and errors that name the field."""

from __future__ import annotations

import json

import pytest

from dilaserve.planner.profiles import (
    ProfileError, QualityEntry, QualityProfile, latency_profile_from_dict, load_profile_set, quality_profile_from_dict,
)


def test_defaults_load_and_say_they_are_illustrative():
    profiles = load_profile_set()
    assert profiles.is_illustrative
    assert [d.degree for d in profiles.latency.degrees] == [1, 2, 4, 8]
    settings = profiles.quality.settings()
    assert len([e for e in settings if e.kv_retention is None]) == 8
    assert {e.kv_retention for e in settings} == {None, 0.5} and len(settings) == 16
    assert profiles.quality.block_size == 32


def test_round_trip_through_dicts(tmp_path):
    profiles = load_profile_set()
    (tmp_path / "latency.json").write_text(json.dumps(profiles.latency.to_dict()))
    (tmp_path / "quality.json").write_text(json.dumps(profiles.quality.to_dict()))
    again = load_profile_set(tmp_path)
    assert again.latency == profiles.latency and again.quality == profiles.quality


def test_settings_take_the_whole_block_entry_per_threshold():
    quality = QualityProfile(32, (QualityEntry(0.9, 0.7, 2.0, 8), QualityEntry(0.9, 0.8, 3.0, 32),
                                  QualityEntry(0.9, 0.75, 2.5, 16), QualityEntry(0.5, 0.6, 6.0, None)))
    assert [(e.threshold, e.chunk) for e in quality.settings()] == [(0.9, 32), (0.5, None)]


def _latency(**row):
    base = {"degree": 1, "fixed_s": 0.001, "per_token_s": 1e-5, "per_context_s": 1e-7, "max_running": 8,
            "kv_capacity_tokens": 1000}
    return {"degrees": [{**base, **row}]}


@pytest.mark.parametrize("data,words", [
    ({}, "'degrees' must be a non-empty list"),
    (_latency(degree=0), "'degree' must be >= 1"),
    (_latency(fixed_s=-1), "'fixed_s' must be >= 0"),
    (_latency(fixed_s=0, per_token_s=0, per_context_s=0), "cannot cost nothing"),
    (_latency(max_running="8"), "'max_running' must be a finite number"),
    ({"cache": "paged", **_latency()}, "'cache' must be one of"),
    ({"degrees": [_latency()["degrees"][0]] * 2}, "degree 1 appears twice"),
])
def test_bad_latency_profiles_name_the_field(data, words):
    with pytest.raises(ProfileError) as info:
        latency_profile_from_dict(data)
    assert words in str(info.value)


@pytest.mark.parametrize("entry,words", [
    ({"threshold": 0, "accuracy": 0.5, "tokens_per_step": 2}, "'threshold' must be > 0"),
    ({"threshold": 0.9, "accuracy": 1.5, "tokens_per_step": 2}, "'accuracy' must be <= 1"),
    ({"threshold": 0.9, "accuracy": 0.5, "tokens_per_step": 0.5}, "'tokens_per_step' must be >= 1"),
    ({"threshold": 0.9, "accuracy": 0.5, "tokens_per_step": 64}, "'tokens_per_step' must be <= 32"),
    ({"threshold": 0.9, "accuracy": 0.5}, "missing field 'tokens_per_step'"),
    ({"threshold": 0.9, "accuracy": 0.5, "tokens_per_step": 2, "accuracy_ci": [0.4]}, "'accuracy_ci'"),
])
def test_bad_quality_profiles_name_the_field(entry, words):
    with pytest.raises(ProfileError) as info:
        quality_profile_from_dict({"block_size": 32, "entries": [entry]})
    assert words in str(info.value) and "entries[0]" in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ProfileError, match="not a directory"):
        load_profile_set(tmp_path / "nowhere")
    with pytest.raises(ProfileError, match="no such file"):
        load_profile_set(tmp_path)
    (tmp_path / "latency.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile_set(tmp_path)


def test_reads_what_dilaserve_profile_quality_writes():
    """The profiler's file: extra fields, tuples as lists, fixed-steps baselines (threshold null)."""
    data = {"model": "tiny", "task": "arith", "split": "test", "block_size": 32, "max_tokens": 64, "cache": "dual",
            "entries": [
                {"task": "arith", "split": "test", "threshold": 0.9, "steps": None, "chunk": 32, "block_size": 32,
                 "cache": "dual", "num": 50, "accuracy": 0.9, "accuracy_ci": [0.79, 0.96], "tokens_per_step": 2.5,
                 "mean_steps": 26.0},
                {"task": "arith", "split": "test", "threshold": None, "steps": 64, "chunk": None, "block_size": 32,
                 "cache": "dual", "num": 50, "accuracy": 0.92, "accuracy_ci": [0.81, 0.97], "tokens_per_step": 1.0,
                 "mean_steps": 64.0}]}
    quality = quality_profile_from_dict(data)
    assert [(e.threshold, e.chunk, e.accuracy_ci) for e in quality.entries] == [(0.9, 32, (0.79, 0.96))]
    data["entries"] = data["entries"][1:]
    with pytest.raises(ProfileError, match="no entry with a threshold"):
        quality_profile_from_dict(data)
