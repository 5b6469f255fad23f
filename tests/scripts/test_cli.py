"""The `nemo-curator-image` command line: every subcommand on real shards, a real LocalCluster (the
session one, through --scheduler-address), real DALI and a tiny timm model; help, exit codes,
one-line errors; and the filter expressions it evaluates."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from nemo_curator.datasets import ImageTextPairDataset
from nemo_curator.filtering import FilterExpressionError, add_filter_column
from nemo_curator.image.classifiers import AestheticMLP, write_random_heads
from nemo_curator.report import _throughput
from nemo_curator.scripts.cli import build_parser, main
from nemo_curator.utils.webdataset import read_dali_index

CLI = str(Path(sys.executable).with_name("nemo-curator-image"))
SUBCOMMANDS = ("sample", "embed", "score", "filter", "index", "index-metadata", "report", "dedup", "demo")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The installed console script, in a fresh process."""
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def address(client) -> str:
    return client.scheduler.address


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> dict:
    return write_random_heads(tmp_path_factory.mktemp("heads"), seed=1)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, address, heads, tiny_model_kwargs, tiny_checkpoint) -> Path:
    """A 2-shard sample dataset (with DALI index files), embedded and scored by the CLI."""
    data = tmp_path_factory.mktemp("cli") / "data"
    assert main(["sample", str(data), "--shards", "2", "--samples-per-shard", "5", "--index"]) == 0
    code = main(["embed", str(data), "--scheduler-address", address, "--checkpoint", tiny_checkpoint,
                 "--model-kwargs", json.dumps(tiny_model_kwargs), "--batch-size", "4", "--threads", "1",
                 "--use-index-files", "--aesthetic-weights", heads["aesthetic"], "--nsfw-weights", heads["nsfw"]])
    assert code == 0
    return data


# ----------------------------------------------------------------------------------------------
# Help, usage and errors
def test_help_lists_every_subcommand_and_each_explains_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in SUBCOMMANDS)
    parser = build_parser()
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        help_text = capsys.readouterr().out
        sub = parser._subparsers._group_actions[0].choices[name]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
                assert action.option_strings[-1] in help_text


def test_cluster_and_model_options_are_offered():
    text = build_parser()._subparsers._group_actions[0].choices["embed"].format_help()
    for option in ("--cluster", "--scheduler-file", "--scheduler-address", "--n-workers", "--model", "--batch-size",
                   "--threads", "--heads", "--aesthetic-weights", "--nsfw-weights"):
        assert option in text


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["embed"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", "x", "--heads", "aesthetic,beauty"])
    assert exit_info.value.code == 2
    assert "unknown head" in capsys.readouterr().err


def test_console_script_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "nowhere")
    result = run_cli("embed", missing)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nemo-curator-image embed: error: dataset folder") and missing in lines[0]
    assert not [line for line in result.stderr.splitlines() if line.startswith("INFO ")]  # logging kept quiet
    result = run_cli("embed", missing, "--debug")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "FileNotFoundError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("nemo-curator-image embed: error:")


def test_console_script_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("nemo-curator-image ")


@pytest.mark.parametrize("expr, message", [
    ("aesthetic_score >", "invalid filter expression"),
    ("__import__('os').system('true')", "Call syntax, which is not allowed"),
    ("aesthetic_score.mean() > 1", "not allowed"),
    ("beauty > 6", "'beauty' is not defined"),
    ("aesthetic_score * 2", "not True/False"),
])
def test_filter_rejects_bad_expressions_before_any_work(embedded, tmp_path, capsys, expr, message):
    code = main(["filter", str(embedded), str(tmp_path / "out"), "--expr", expr,
                 "--scheduler-address", "tcp://127.0.0.1:9"])  # never reached: the check comes first
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_score_without_embedding_column_fails_clearly(tmp_path, capsys):
    data = tmp_path / "plain"
    assert main(["sample", str(data), "--shards", "1", "--samples-per-shard", "2"]) == 0
    assert main(["score", str(data), "--offline"]) == 1
    err = capsys.readouterr().err
    assert "'image_embedding' is not in the parquets" in err and "embed" in err


def test_sample_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    assert main(["sample", str(tmp_path)]) == 1
    assert "is not empty" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The job, subcommand by subcommand
def test_embed_writes_embeddings_status_and_both_scores(embedded, capsys):
    frame = pd.concat(pq.read_table(p).to_pandas() for p in sorted(embedded.glob("*.parquet")))
    assert len(frame) == 10
    assert set(frame.image_status) == {"ok"}
    assert all(len(e) == 768 for e in frame.image_embedding)
    norms = np.linalg.norm(np.stack(frame.image_embedding.to_numpy()), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-4)
    assert frame.aesthetic_score.notna().all() and frame.nsfw_score.between(0, 1).all()
    assert sorted(p.name for p in embedded.glob("*.idx")) == ["00000.idx", "00001.idx"]


def test_embed_rerun_resumes(embedded, address, heads, tiny_model_kwargs, tiny_checkpoint, capsys):
    code = main(["embed", str(embedded), "--scheduler-address", address, "--checkpoint", tiny_checkpoint,
                 "--model-kwargs", json.dumps(tiny_model_kwargs), "--batch-size", "4", "--threads", "1",
                 "--use-index-files", "--aesthetic-weights", heads["aesthetic"], "--nsfw-weights", heads["nsfw"]])
    assert code == 0
    assert "(2 already done)" in capsys.readouterr().out


def test_embed_rerun_with_random_weights_or_replaced_checkpoint_redoes_every_shard(
        tmp_path, address, heads, tiny_model_kwargs, tiny_checkpoint, capsys):
    """Weights without an identity (random) never resume; a checkpoint replaced at the same path is noticed."""
    data = tmp_path / "data"
    assert main(["sample", str(data), "--shards", "2", "--samples-per-shard", "3"]) == 0
    checkpoint = str(shutil.copy(tiny_checkpoint, tmp_path / "model.safetensors"))
    common = ["--scheduler-address", address, "--model-kwargs", json.dumps(tiny_model_kwargs), "--batch-size", "4",
              "--threads", "1", "--aesthetic-weights", heads["aesthetic"], "--nsfw-weights", heads["nsfw"]]
    for _ in range(2):
        assert main(["embed", str(data), "--no-pretrained", *common]) == 0
        assert "(0 already done)" in capsys.readouterr().out
    assert main(["embed", str(data), "--checkpoint", checkpoint, *common]) == 0
    assert "(0 already done)" in capsys.readouterr().out
    assert main(["embed", str(data), "--checkpoint", checkpoint, *common]) == 0
    assert "(2 already done)" in capsys.readouterr().out
    before = np.stack(pd.read_parquet(data / "00000.parquet")["image_embedding"].to_list())
    from safetensors.torch import load_file, save_file

    weights = load_file(checkpoint)
    weights = {k: v * 1.5 if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, checkpoint)  # other weights at the same path
    assert main(["embed", str(data), "--checkpoint", checkpoint, *common]) == 0
    assert "(0 already done)" in capsys.readouterr().out
    after = np.stack(pd.read_parquet(data / "00000.parquet")["image_embedding"].to_list())
    assert np.abs(after - before).max() > 1e-3  # the workers loaded the new weights, not their cached model


def test_score_rescores_the_embedding_column_with_other_weights(embedded, address, tmp_path):
    data = shutil.copytree(embedded, tmp_path / "data")
    other = write_random_heads(tmp_path, seed=7)["aesthetic"]
    before = ImageTextPairDataset.from_webdataset(str(data), id_col="key").metadata.compute()
    assert main(["score", str(data), "--heads", "aesthetic", "--aesthetic-weights", other,
                 "--scheduler-address", address]) == 0
    after = ImageTextPairDataset.from_webdataset(str(data), id_col="key").metadata.compute()
    head = AestheticMLP()
    head.load_state_dict(torch.load(other, weights_only=True))
    with torch.no_grad():
        expected = head.eval()(torch.from_numpy(np.stack(after.image_embedding.to_numpy()))).numpy().ravel()
    np.testing.assert_allclose(after.aesthetic_score.to_numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(after.nsfw_score.to_numpy(), before.nsfw_score.to_numpy())
    # the embedding's stats survive the rescoring; the score run's wall time is not an embedding rate
    embed_stats = json.loads((embedded / "00000.stats.json").read_text())
    stats = json.loads((data / "00000.stats.json").read_text())
    assert stats["embedded"] == embed_stats["embedded"] > 0 and stats["embed_seconds"] == embed_stats["embed_seconds"]
    run = json.loads((data / "_run_summary.json").read_text())
    assert run["carried_stats"] == 2 and run["totals"]["embedded"] == len(after)
    throughput = _throughput(run)
    assert throughput["embedded"] == len(after) and "images_per_second" not in throughput


def test_filter_reshards_the_rows_the_expression_keeps(embedded, address, tmp_path, capsys):
    scores = ImageTextPairDataset.from_webdataset(str(embedded), id_col="key").metadata.compute()
    cut = float(np.median(scores.aesthetic_score))
    expr = f"aesthetic_score > {cut!r} and nsfw_score < 0.99"
    expected = scores[(scores.aesthetic_score > cut) & (scores.nsfw_score < 0.99)]
    out = tmp_path / "curated"
    assert main(["filter", str(embedded), str(out), "--expr", expr, "--samples-per-shard", "3", "--max-shards", "2",
                 "--old-id-col", "old_key", "--scheduler-address", address]) == 0
    assert f"kept {len(expected)} of 10 rows" in capsys.readouterr().out
    curated = ImageTextPairDataset.from_webdataset(str(out), id_col="key").metadata.compute()
    assert sorted(curated.old_key) == sorted(expected.key)
    assert curated.keep.all()
    assert len(list(out.glob("*.tar"))) == -(-len(expected) // 3)

    # the report of that run: its numbers agree with the filter
    report_dir = tmp_path / "report"
    assert main(["report", str(embedded), "--curated", str(out), "--expr", expr, "--output", str(report_dir)]) == 0
    text = capsys.readouterr().out
    summary = json.loads((report_dir / "report.json").read_text())["summary"]
    assert summary["kept"] == summary["curated_samples"] == len(expected)
    assert summary["rows"] == 10 and "images/s per worker" in text
    assert {p.name for p in report_dir.iterdir()} == {"report.md", "report.json", "report.png", "examples.png"}


def test_filter_that_keeps_nothing_says_so(embedded, address, tmp_path, capsys):
    assert main(["filter", str(embedded), str(tmp_path / "none"), "--expr", "aesthetic_score > 1e9",
                 "--scheduler-address", address]) == 0
    assert "kept 0 of 10 rows" in capsys.readouterr().out


def test_index_and_index_metadata_open_a_foreign_shard(shared_dir, tmp_path, capsys):
    """The original NeMo Curator test shard: a tar without parquet and with unpadded ids."""
    fixture = shared_dir / "sample_images" / "nemo_fixture"
    shutil.copy(fixture / "00000.tar", tmp_path)
    assert main(["index-metadata", str(tmp_path)]) == 0
    assert main(["index", str(tmp_path)]) == 0
    assert read_dali_index(tmp_path / "00000.idx") == read_dali_index(fixture / "00000.idx")
    frame = ImageTextPairDataset.from_webdataset(str(tmp_path), id_col="key").metadata.compute()
    assert frame.key.tolist() == ["0"] and frame.caption.iloc[0]
    assert main(["index-metadata", str(tmp_path)]) == 0
    assert "every tar already has its parquet" in capsys.readouterr().out


def test_scheduler_file_option_connects_to_a_running_cluster(client, tmp_path, capsys):
    """--scheduler-file reads the scheduler's identity file (what `dask scheduler --scheduler-file` writes)."""
    scheduler_file = tmp_path / "scheduler.json"
    scheduler_file.write_text(json.dumps({**client.scheduler_info(), "workers": {}}))  # as `dask scheduler` writes it
    data = tmp_path / "data"
    assert main(["sample", str(data), "--shards", "1", "--samples-per-shard", "2"]) == 0
    assert main(["filter", str(data), str(tmp_path / "all"), "--expr", "caption == caption",
                 "--scheduler-file", str(scheduler_file)]) == 0
    assert "kept 2 of 2 rows" in capsys.readouterr().out
    assert main(["filter", str(data), str(tmp_path / "x"), "--expr", "caption == caption",
                 "--scheduler-file", str(tmp_path / "absent.json")]) == 1
    assert "dask scheduler --scheduler-file" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Filter expressions
def test_add_filter_column_is_lazy_and_checked_up_front(embedded):
    dataset = ImageTextPairDataset.from_webdataset(str(embedded), id_col="key")
    with pytest.raises(FilterExpressionError, match="'score' is not defined"):
        add_filter_column(dataset, "score > 1")
    kept = add_filter_column(dataset, "nsfw_score < 2", "ok_rows")
    assert kept.metadata.npartitions == 2 and kept.lineage[-1] == "filter:ok_rows=nsfw_score < 2"
    assert kept.metadata.ok_rows.compute().all()


# ----------------------------------------------------------------------------------------------
# The demo
def test_demo_smoke_runs_the_whole_job_and_reruns_into_the_same_folder(address, tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--output", str(out), "--smoke", "--scheduler-address", address, "--shards", "2",
            "--samples-per-shard", "6", "--batch-size", "8"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.count("SMOKE MODE") >= 3  # start, report title, end
    summary = json.loads((out / "report" / "report.json").read_text())["summary"]
    assert summary["rows"] == 2 * 6 + 2  # + one undecodable image and one row without an image
    assert summary["images_decode_failed"] == 1 and summary["images_missing_image"] == 1
    assert 0 < summary["kept"] < summary["rows"] and summary["dropped_failed_image"] == 2
    assert summary["curated_samples"] == summary["kept"]
    assert {p.name for p in (out / "report").iterdir()} == {"report.md", "report.json", "report.png", "examples.png"}
    curated = ImageTextPairDataset.from_webdataset(str(out / "curated"), id_col="key").metadata.compute()
    assert len(curated) == summary["kept"] and (curated.image_status == "ok").all()

    written = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert written == {"dataset", "curated", "report", "smoke_heads"}
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert all(f"`{name}/`" in readme for name in written)  # every folder the demo writes is documented
    (out / "dataset" / "stale.txt").write_text("from the first run")
    assert main(args) == 0
    assert not (out / "dataset" / "stale.txt").exists()
    assert json.loads((out / "report" / "report.json").read_text())["summary"]["rows"] == 14


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--output", str(tmp_path), "--smoke", "--scheduler-address", "tcp://127.0.0.1:9"]) == 1
    assert "holds files the demo did not write" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_demo_without_weights_names_each_missing_file_and_the_remedies(tmp_path, monkeypatch, capsys, shared_dir):
    import huggingface_hub.constants

    monkeypatch.setenv("NEMO_CURATOR_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    out = tmp_path / "out"
    assert main(["demo", "--output", str(out), "--offline"]) == 1
    first, *hint = capsys.readouterr().err.strip().splitlines()
    assert first.startswith("nemo-curator-image demo: error: weights missing:")
    for name in ("vit_large_patch14_clip_quickgelu_224.openai", "aesthetic head", "nsfw head"):
        assert name in first
    hint = "\n".join(hint)
    for remedy in ("--checkpoint", "HF_HUB_OFFLINE=1", "--aesthetic-weights", "--nsfw-weights",
                   "NEMO_CURATOR_WEIGHTS_URL_AESTHETIC", "--smoke"):
        assert remedy in hint
    assert not out.exists()  # checked before anything is written or started

    weights = shared_dir / "weights"
    assert main(["demo", "--output", str(out), "--offline", "--aesthetic-weights",
                 str(weights / "sac+logos+ava1-l14-linearMSE.pth"), "--nsfw-weights",
                 str(weights / "clip_autokeras_binary_nsfw.pth")]) == 1
    first = capsys.readouterr().err.splitlines()[0]
    assert "vit_large" in first and "head" not in first


@pytest.mark.slow
def test_console_script_demo_smoke_starts_and_stops_its_own_cluster(tmp_path):
    """What `make demo-smoke` runs, smaller: the console script with its own LocalCluster."""
    out = tmp_path / "demo_output"
    result = subprocess.run([CLI, "demo", "--output", str(out), "--smoke", "--shards", "1", "--samples-per-shard", "4",
                             "--n-workers", "1", "--cluster", "auto"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "SMOKE MODE" in lines[0] and "SMOKE MODE" in lines[-1]
    assert "dask: 1 workers" in result.stdout
    assert (out / "report" / "report.png").is_file() and list((out / "curated").glob("*.tar"))
    assert not [line for line in result.stderr.splitlines() if line.startswith("INFO ")]  # logging kept quiet


def test_precision_auto_avoids_emulated_bf16_on_cpus():
    """--precision goes to the embedder as it is and is decided on each worker, by its hardware."""
    from nemo_curator.scripts.demo import build_embedder
    from nemo_curator.utils.device import cpu_has_fast_bf16

    def embedder(argv):
        args = build_parser().parse_args(argv)
        return build_embedder(args.model, pretrained=False, model_kwargs={"embed_dim": 64, "depth": 2, "num_heads": 2},
                              precision=args.precision)

    assert embedder(["embed", "d"]).uses_bf16("cuda") is True
    assert embedder(["embed", "d"]).uses_bf16("cpu") is cpu_has_fast_bf16()
    assert embedder(["embed", "d", "--precision", "bf16"]).uses_bf16("cpu") is True
    assert embedder(["embed", "d", "--precision", "fp32"]).uses_bf16("cuda") is False

def test_index_of_a_folder_without_tars_says_what_it_expects(tmp_path, capsys):
    assert main(["index", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no shards in" in err and "NNNNN.tar" in err and "parquet" not in err
    assert main(["sample", str(tmp_path / "d"), "--shards", "1", "--samples-per-shard", "2"]) == 0
    (tmp_path / "d" / "00000.parquet").unlink()  # index needs no parquet
    assert main(["index", str(tmp_path / "d")]) == 0 and (tmp_path / "d" / "00000.idx").is_file()
