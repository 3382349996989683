"""lowbit.tune with workers: the trials run in local processes or as Ray tasks, and the choice is the
serial search's."""

import json

import pytest
import torch

import lowbit
from tests.fixtures_models import sensitive_mlp, tiny_mlp


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(1)
    return torch.randn(256, 16)


def _tune(model, inputs, **options):
    return lowbit.tune(model, inputs, metric="agreement", max_drop=0.05, candidates=["w4-g32", "w8", "fp16"],
                       final_comparison=False, progress=False, **options)


def _choice(result):
    return result.chosen.label, result.chosen.fallback_modules, result.recipe


@pytest.fixture(scope="module")
def serial(inputs):
    return _tune(sensitive_mlp(), inputs)


def test_two_local_processes_choose_what_the_serial_search_chooses(serial, inputs):
    parallel = _tune(sensitive_mlp(), inputs, workers=2)
    assert serial.chosen.fallback_modules == ["2"]  # the layer fallback ran
    assert _choice(parallel) == _choice(serial)
    assert [trial.label for trial in parallel.trials] == [trial.label for trial in serial.trials]
    assert [trial.drop for trial in parallel.trials] == pytest.approx([trial.drop for trial in serial.trials])
    assert parallel.settings["executor"].startswith("processes (2 workers)")
    assert len({trial.node for trial in parallel.trials}) >= 2  # measured in the workers, not here
    specs = [getattr(module, "spec", None) for module in parallel.model]  # rebuilt here from the recipe
    assert specs == [getattr(module, "spec", None) for module in serial.model]
    assert torch.equal(parallel.model(inputs), serial.model(inputs))


def test_ray_tasks_choose_what_the_serial_search_chooses_and_record_their_node(serial, inputs, request):
    ray = pytest.importorskip("ray")
    request.addfinalizer(ray.shutdown)
    parallel = _tune(sensitive_mlp(), inputs, workers=2, ray_address="local")
    assert _choice(parallel) == _choice(serial)
    assert all("ray node" in trial.node for trial in parallel.trials)


def test_latency_is_timed_here_with_the_workers_idle(inputs):
    serial = lowbit.tune(tiny_mlp().eval(), torch.randn(128, 64), metric="agreement", max_drop=0.5,
                         objective="latency", candidates=["w8a8-dynamic", "w8"], final_comparison=False,
                         progress=False, runs=5)
    parallel = lowbit.tune(tiny_mlp().eval(), torch.randn(128, 64), metric="agreement", max_drop=0.5,
                           objective="latency", candidates=["w8a8-dynamic", "w8"], final_comparison=False,
                           progress=False, runs=5, workers=2)
    timed = [trial for trial in parallel.trials if trial.latency_ms is not None]
    assert timed and all(trial.speedup_ci95 for trial in timed)
    assert "timed in this process" in parallel.settings["executor"]
    assert {trial.label for trial in parallel.trials} == {trial.label for trial in serial.trials}


def test_a_worker_that_dies_is_retried_once_then_recorded_and_the_search_goes_on():
    from tests.fixtures_models import dies_in_a_worker

    result = lowbit.tune(dies_in_a_worker(), torch.randn(64, 64), metric="agreement", max_drop=0.5,
                         candidates=["w8", "fp16"], final_comparison=False, progress=False, workers=2)
    assert not result.met_budget and [trial.label for trial in result.trials] == ["w8", "fp16"]
    assert all("died twice" in trial.reason and "(2 attempt(s))" in trial.reason for trial in result.trials)


def test_a_ray_address_that_does_not_answer_is_refused_quickly_and_named():
    import time

    from lowbit.errors import LowbitError

    pytest.importorskip("ray")
    start = time.monotonic()
    with pytest.raises(LowbitError, match=r"no Ray cluster answers at 127\.0\.0\.1:9"):
        _tune(tiny_mlp().eval(), torch.randn(64, 64), workers=2, ray_address="127.0.0.1:9")
    assert time.monotonic() - start < 30


def test_cli_tune_with_two_workers_writes_what_serial_writes(tmp_path, inputs):
    from typer.testing import CliRunner

    from lowbit.cli import app
    from tests.test_tune import _factory_files

    arguments = _factory_files(tmp_path, inputs)
    written = {}
    for extra in ([], ["--workers", "2"]):
        out = tmp_path / f"tuned{len(extra)}"
        result = CliRunner().invoke(app, ["tune", *arguments, "--metric", "agreement", "--max-drop", "0.05",
                                          "--candidates", "w4-g32,w8,fp16", "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        written[len(extra)] = json.loads((out / "lowbit.json").read_text())["recipe"]
    assert written[0] == written[2]
    assert "Trials: processes (2 workers)" in result.output


def test_candidates_the_serial_search_skips_are_not_measured():
    candidates = ["w8", "w8a8-dynamic", "fp16"]  # once w8 passes, neither can be smaller
    data = torch.randn(128, 64, generator=torch.Generator().manual_seed(2))
    serial, parallel = (lowbit.tune(tiny_mlp().eval(), data, metric="agreement", max_drop=0.2,
                                    candidates=candidates, final_comparison=False, progress=False, **options)
                        for options in ({}, {"workers": 2}))
    assert [trial.label for trial in serial.trials] == ["w8"] and serial.met_budget
    assert [trial.label for trial in parallel.trials] == ["w8"] and _choice(parallel) == _choice(serial)
    rounds = parallel.settings["rounds"]  # w8 and w8a8-dynamic at once (w8 not yet known to pass); fp16 never
    assert len(rounds) == 1 and len(rounds[0]) == 2


def test_a_skipped_candidate_does_not_hold_back_the_skip_of_the_next():
    candidates = ["w8", "w8a8-dynamic", "fp16", "bf16"]  # w8 passes: the three others cannot be smaller
    data = torch.randn(128, 64, generator=torch.Generator().manual_seed(2))
    parallel = lowbit.tune(tiny_mlp().eval(), data, metric="agreement", max_drop=0.2, candidates=candidates,
                           final_comparison=False, progress=False, workers=1 + 1)
    assert [len(round_) for round_ in parallel.settings["rounds"]] == [2]  # fp16 and bf16 never measured


def test_the_executor_is_named_or_follows_from_the_options():
    from lowbit.errors import LowbitError
    from lowbit.tune.executors import executor_spec

    assert executor_spec().name == "serial" and executor_spec(2).name == "processes"
    assert executor_spec(2, "10.0.0.5:6379").name == "ray" and executor_spec(executor="ray").address is None
    assert executor_spec(1, executor="processes").workers == 1
    with pytest.raises(LowbitError, match="unknown executor 'dask'"):
        executor_spec(executor="dask")
    with pytest.raises(LowbitError, match="workers must be at least 1"):
        executor_spec(0)
