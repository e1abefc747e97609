"""``logging.profile``: the window start .. end - 1 is profiled on the listed ranks and written as a
Chrome trace with a named range per iteration and phase; a window the run does not finish is
written at its end; profiling changes nothing the run computes; bad windows are one-line errors
before anything is built."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch

from adm_megatron.config import ConfigError, ProfileConfig, load_config
from tiny_runs import without_timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["data.source=synthetic", "data.num_prompts=4", "data.batch_size=1", "train.num_samples=0",
         "train.export=false", "logging.progress=false", "logging.wandb_mode=disabled"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from adm_megatron.data.tiny_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(str(tmp_path_factory.mktemp("profile") / "pipe"), seed=0)


def _fit(pipeline: str, out, *overrides: str) -> list[dict]:
    from adm_megatron.parallel import destroy_parallel
    from adm_megatron.train.trainer import Trainer

    config = load_config(os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"),
                         [f"model.teacher={pipeline}", f"output_dir={out}", *QUIET, *overrides])
    Trainer(config).fit()
    destroy_parallel()
    return [without_timing(json.loads(line)) for line in open(os.path.join(out, "metrics.jsonl"))]


def _ranges(trace: str) -> Counter:
    events = json.load(open(trace))["traceEvents"]
    return Counter(e["name"] for e in events if e.get("name", "").startswith(("iteration ", "phase/")))


def test_the_window_is_traced_with_its_iterations_and_phases_and_changes_nothing(pipeline, tmp_path, world_of_one):
    plain = _fit(pipeline, tmp_path / "plain", "train.max_iterations=4")
    profiled = _fit(pipeline, tmp_path / "profiled", "train.max_iterations=4", "logging.profile.start=1",
                    "logging.profile.end=3")
    assert profiled == plain
    assert os.listdir(tmp_path / "profiled" / "profile") == ["rank0-iter0000001-0000003.json"]
    ranges = _ranges(str(tmp_path / "profiled" / "profile" / "rank0-iter0000001-0000003.json"))
    assert ranges == Counter({"iteration 1": 1, "iteration 2": 1, "phase/fake_score": 2, "phase/generator": 2,
                              "phase/discriminator": 2})

    # a window past the run's end: what it recorded is written when the run ends
    _fit(pipeline, tmp_path / "cut", "train.max_iterations=2", "logging.profile.start=1", "logging.profile.end=5",
         "logging.profile.memory=true")
    trace = tmp_path / "cut" / "profile" / "rank0-iter0000001-0000005.json"
    assert _ranges(str(trace))["iteration 1"] == 1 and not (tmp_path / "cut" / "profile" / f"{trace.name}.partial").exists()
    assert any(e.get("name") == "[memory]" for e in json.load(open(trace))["traceEvents"])  # memory: allocations


def test_a_rank_outside_the_list_does_not_profile():
    from adm_megatron.train.profiling import IterationProfiler

    def run(phase):
        return phase

    profiler = IterationProfiler(ProfileConfig(start=0, end=1, ranks=[1]), 0, torch.device("cpu"), "/nonexistent")
    assert profiler.wrap_phases(run) is run
    with profiler.iteration(0):
        pass
    profiler.close()
    assert not os.path.exists("/nonexistent")


def test_bad_windows_are_one_line_errors_before_anything_is_built(pipeline, tmp_path, world_of_one, monkeypatch):
    from adm_megatron.train.teacher import TeacherSource
    from adm_megatron.train.trainer import Trainer

    for override, message in [
        (["logging.profile.start=3", "logging.profile.end=3"],
         "logging.profile: start=3, end=3: expected 0 <= start < end"),
        (["logging.profile.mode=perf"], "logging.profile.mode='perf': expected one of torch, nsys"),
        (["logging.profile.ranks=[]"], r"logging.profile.ranks=\[\]: expected a non-empty list"),
        (["logging.profile.start=5", "logging.profile.end=8", "train.max_iterations=2"],
         r"^command line: logging.profile.start=5: the run ends before it \(train.max_iterations=2\); nothing would be "
         r"profiled: set logging.profile.start / end below it$"),
        # only the mode given: the start it names is the default the user never set, and says so
        (["logging.profile.mode=torch", "train.max_iterations=1"],
         r"^default: logging.profile.start=10: the run ends before it \(train.max_iterations=1\)"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [f"model.teacher={pipeline}", *override])
    monkeypatch.setattr(TeacherSource, "build_models", lambda *a, **k: pytest.fail("networks were built"))
    for override, message in [
        ("logging.profile.ranks=[0,1]", r"logging.profile.ranks=\[0, 1\]: rank\(s\) \[1\] outside a world of 1"),
        ("logging.profile.mode=nsys", "logging.profile.mode=nsys: needs a GPU"),
    ]:
        config = load_config(os.path.join(ROOT, "examples/cogvideox/tiny_cpu.yaml"),
                             [f"model.teacher={pipeline}", f"output_dir={tmp_path / 'x'}", *QUIET, override])
        with pytest.raises(ConfigError, match=message) as err:
            Trainer(config)
        assert "\n" not in str(err.value)
