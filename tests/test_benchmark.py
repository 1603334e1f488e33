"""`vqldm benchmark` (issue 7): the side-by-side rows, the engine-overhead and data-pipeline rows."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli


def _lines(text: str) -> list[dict]:
    return [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]


def test_smoke_benchmark_prints_the_rows_and_the_cpu_checks(capsys):
    from vqldm.commands.benchmark import SPECS

    assert run_cli("benchmark", "--smoke", "--device", "cpu") == 0
    rows = _lines(capsys.readouterr().out)
    by_metric = {r["metric"]: r for r in rows if "metric" in r}
    assert set(by_metric) == {"stage1_train_volumes_per_s", "stage2_train_latents_per_s",
                              "stage2_best_batch_latents_per_s", "sample_volumes_per_s",
                              "few_step_sample_volumes_per_s", "token_sampling_tokens_per_s"}
    few, ddim = by_metric["few_step_sample_volumes_per_s"], by_metric["sample_volumes_per_s"]
    assert (few["scheduler"], few["steps"]) == ("dpmpp_2m", SPECS["smoke"]["few_step"]["steps"])
    assert few["reference"] == ddim["reference"]  # one reference DDIM measurement for both rows
    best, stage2 = by_metric["stage2_best_batch_latents_per_s"], by_metric["stage2_train_latents_per_s"]
    by_batch = {int(b): v for b, v in best["latents_per_s_by_batch"].items()}
    assert sorted(by_batch) == SPECS["smoke"]["stage2_batches"]
    assert best["vqldm"] == max(by_batch.values()) == by_batch[best["batch"]]
    assert best["reference"] == stage2["reference"]
    assert by_metric["token_sampling_tokens_per_s"]["same_tokens"] is True
    for r in by_metric.values():
        assert r["device"] == "cpu"
        assert r["reference"] > 0 and r["vqldm"] > 0
        assert r["ratio"] == pytest.approx(r["vqldm"] / r["reference"])
    overhead = {r["stage"]: r for r in rows if r.get("what") == "engine_overhead"}
    assert set(overhead) == {"stage1", "stage2"}
    for r in overhead.values():
        assert r["overhead"] == pytest.approx(r["bare_steps_per_s"] / r["engine_steps_per_s"] - 1)
    data = next(r for r in rows if r.get("what") == "data_pipeline")
    assert data["loader_patches_per_s"] > 0 and data["headroom"] == pytest.approx(
        data["loader_patches_per_s"] / data["step_volumes_per_s"])
    assert not [r for r in rows if "error" in r]


def test_benchmark_only_runs_the_named_metric(capsys):
    assert run_cli("benchmark", "--smoke", "--device", "cpu", "--only", "sample_volumes_per_s") == 0
    rows = _lines(capsys.readouterr().out)
    assert [r["metric"] for r in rows if "metric" in r] == ["sample_volumes_per_s"]


def test_benchmark_help_names_every_part(capsys):
    from vqldm.commands.benchmark import PARTS

    assert run_cli("benchmark", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(part in text for part in PARTS)


def test_benchmark_refuses_an_unknown_part(capsys):
    assert run_cli("benchmark", "--smoke", "--device", "cpu", "--only", "stage1,data_pipeline") == 2
    err = capsys.readouterr().err
    assert "--only: unknown part(s) stage1; choose from stage1_train_volumes_per_s" in err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_benchmark_on_cuda_without_a_gpu_is_one_clear_error(capsys):
    assert run_cli("benchmark", "--smoke", "--device", "cuda") != 0
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA GPU is visible" in err and "Traceback" not in err
