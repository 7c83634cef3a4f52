"""`tinkerd runs ...` and `tinkerd checkpoints ...` on a data directory, as a user runs them (no server)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from tests.engine.test_export import hf_logits, write_checkpoint, write_tiny_model_dir
from tinkerd.cli import app
from tinkerd.domain.ids import DEFAULT_OWNER
from tinkerd.domain.ops import LoraConfig
from tinkerd.domain.paths import TinkerPath
from tinkerd.domain.records import Checkpoint, Session, TrainingRun
from tinkerd.engine.checkpoint import checkpoint_size_bytes
from tinkerd.store import Store, default_url
from tinkerd.store.files import CheckpointFiles

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

runner = CliRunner()
RUN = "sess-1:train:0"
OTHER_RUN = "sess-1:train:1"
BOB_RUN = "sess-bob:train:0"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class DataDir:
    path: Path
    base_model: Path
    # the logits the served adapter gives SEQ, per checkpoint path
    logits: dict[str, torch.Tensor]


def _add_run(store: Store, run_id: str, owner: str, base: Path, at: datetime, metadata: dict[str, str]) -> None:
    session_id = run_id.split(":")[0]
    if not store.sessions.list_for_owner(owner).items:
        store.sessions.create(Session(id=session_id, owner=owner, created_at=at, last_heartbeat_at=at))
    lora = LoraConfig(rank=4, alpha=8.0, seed=1)
    store.runs.create(TrainingRun(run_id, session_id, owner, str(base), at, at, lora, user_metadata=metadata))


def _save(store: Store, files: CheckpointFiles, base: Path, path: TinkerPath, owner: str, at: datetime) -> torch.Tensor:
    """Checkpoint files where the server keeps them, and their row; the served logits of its adapter."""
    directory = files.dir_of(path)
    lora = LoraConfig(rank=4, alpha=8.0, seed=1)
    logits = write_checkpoint(directory, base, lora, with_optimizer=path.kind == "weights", seed=len(path.name))
    size = checkpoint_size_bytes(directory)
    expires_at = at + timedelta(days=1) if path.name == "tmp" else None
    store.checkpoints.add(Checkpoint(path.run_id, path.kind, path.name, owner, at, size, expires_at))
    return logits


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DataDir:
    """A data directory as a server leaves it: three runs (one of another owner), four checkpoints."""
    root = tmp_path_factory.mktemp("cli")
    base = write_tiny_model_dir(root / "tiny-llama")
    store = Store.open(default_url(root / "data"))
    files = CheckpointFiles(root / "data")
    saves = [
        (TinkerPath(RUN, "weights", "step-10"), DEFAULT_OWNER),
        (TinkerPath(RUN, "sampler_weights", "step-10"), DEFAULT_OWNER),
        (TinkerPath(OTHER_RUN, "weights", "tmp"), DEFAULT_OWNER),  # expires in a day
        (TinkerPath(BOB_RUN, "weights", "bobs"), "bob"),
    ]
    try:
        _add_run(store, RUN, DEFAULT_OWNER, base, T0, {"purpose": "cli test"})
        _add_run(store, OTHER_RUN, DEFAULT_OWNER, base, T0 + timedelta(hours=1), {})
        _add_run(store, BOB_RUN, "bob", base, T0, {})
        logits = {
            str(path): _save(store, files, base, path, owner, T0 + timedelta(minutes=i))
            for i, (path, owner) in enumerate(saves)
        }
    finally:
        store.close()
    return DataDir(root / "data", base, logits)


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "160"} | (env or {}))
    # a failure is a message and an exit code, never a traceback
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def export(data: DataDir, path: str, out: Path, *options: str) -> tuple[int, str, str]:
    return invoke("checkpoints", "export", path, "--out", str(out), "--data-dir", str(data.path), *options)


def test_runs_list_shows_the_owners_runs_newest_first(data: DataDir) -> None:
    code, out, _ = invoke("runs", "list", "--data-dir", str(data.path))
    assert code == 0, out
    assert out.index(OTHER_RUN) < out.index(RUN)
    assert BOB_RUN not in out
    assert "ckpts" in out and "rank" in out
    assert data.base_model.name in out and str(data.base_model) not in out  # a local model by its folder name

    code, out, _ = invoke("runs", "list", "--owner", "bob", env={"TINKERD_DATA_DIR": str(data.path)})
    assert code == 0 and BOB_RUN in out and RUN not in out


def test_runs_list_as_json(data: DataDir) -> None:
    code, out, _ = invoke("runs", "list", "--data-dir", str(data.path), "--json")
    assert code == 0
    listing = json.loads(out)
    assert listing["total_count"] == 2
    assert [r["id"] for r in listing["runs"]] == [OTHER_RUN, RUN]
    first = listing["runs"][1]
    assert first["user_metadata"] == {"purpose": "cli test"} and first["checkpoint_count"] == 2
    assert first["lora"]["rank"] == 4 and datetime.fromisoformat(first["created_at"]) == T0

    code, out, _ = invoke("runs", "list", "--data-dir", str(data.path), "--json", "--limit", "1")
    assert [r["id"] for r in json.loads(out)["runs"]] == [OTHER_RUN] and json.loads(out)["total_count"] == 2
    code, out, _ = invoke("runs", "list", "--data-dir", str(data.path), "--limit", "1")
    assert "showing the newest 1 of 2" in " ".join(out.split())


def test_runs_show(data: DataDir) -> None:
    code, out, _ = invoke("runs", "show", RUN, "--data-dir", str(data.path))
    assert code == 0, out
    assert "cli test" in out and "rank 4, alpha 8" in out and "attention, MLP, unembedding" in out
    assert "weights/step-10" in out and "sampler_weights/step-10" in out

    code, out, _ = invoke("runs", "show", RUN, "--data-dir", str(data.path), "--json")
    shown = json.loads(out)
    assert shown["run"]["id"] == RUN and shown["checkpoint_count"] == 2
    assert {c["tinker_path"] for c in shown["checkpoints"]} == {
        f"tinker://{RUN}/weights/step-10",
        f"tinker://{RUN}/sampler_weights/step-10",
    }


def test_runs_show_of_an_unknown_or_foreign_run_fails_cleanly(data: DataDir) -> None:
    for run_id in ("nobody:train:0", BOB_RUN):
        code, _, err = invoke("runs", "show", run_id, "--data-dir", str(data.path))
        assert code == 1 and "unknown training run" in err and run_id in err


def test_checkpoints_list_all_and_per_run(data: DataDir) -> None:
    code, out, _ = invoke("checkpoints", "list", "--data-dir", str(data.path), "--json")
    assert code == 0
    listing = json.loads(out)
    assert listing["total_count"] == 3
    assert [c["tinker_path"] for c in listing["checkpoints"]] == [
        f"tinker://{OTHER_RUN}/weights/tmp",
        f"tinker://{RUN}/sampler_weights/step-10",
        f"tinker://{RUN}/weights/step-10",
    ]
    assert listing["checkpoints"][0]["expires_at"] is not None and listing["checkpoints"][2]["size_bytes"] > 0

    code, out, _ = invoke("checkpoints", "list", "--run", OTHER_RUN, "--data-dir", str(data.path))
    assert code == 0 and "weights/tmp" in out and "step-10" not in out
    code, out, _ = invoke("checkpoints", "list", "--data-dir", str(data.path))
    assert code == 0 and "sampler_weights/step-10" in out and "bobs" not in out


def test_listing_an_empty_data_dir_creates_nothing(tmp_path: Path) -> None:
    code, out, _ = invoke("runs", "list", "--data-dir", str(tmp_path / "none"))
    assert code == 0 and "No training runs" in out
    code, out, _ = invoke("checkpoints", "list", "--data-dir", str(tmp_path / "none"), "--json")
    assert code == 0 and json.loads(out) == {"checkpoints": [], "total_count": 0}
    assert not (tmp_path / "none").exists()
    code, _, err = invoke("runs", "show", RUN, "--data-dir", str(tmp_path / "none"))
    assert code == 1 and "no tinkerd data" in err


@pytest.mark.parametrize("kind", ["weights", "sampler_weights"])
def test_export_peft_loads_in_peft_with_the_served_logits(data: DataDir, tmp_path: Path, kind: str) -> None:
    path = f"tinker://{RUN}/{kind}/step-10"
    code, out, err = invoke(
        "checkpoints", "export", path, "--format", "peft", "--out", str(tmp_path / "a"), "--data-dir", str(data.path)
    )
    assert code == 0, err
    assert f"Exported {path}" in out
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(data.base_model), tmp_path / "a")
    torch.testing.assert_close(hf_logits(peft_model), data.logits[path], atol=2e-5, rtol=1e-4)


def test_export_merged_loads_with_from_pretrained(data: DataDir, tmp_path: Path) -> None:
    path = f"tinker://{RUN}/weights/step-10"
    out_dir = tmp_path / "merged"
    code, out, err = export(data, path, out_dir, "--format", "merged", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["format"] == "merged" and {"model.safetensors", "tokenizer.json"} <= set(report["files"])
    merged = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True)
    torch.testing.assert_close(hf_logits(merged), data.logits[path], atol=2e-5, rtol=1e-4)

    # a second export into the same directory needs --force, and then replaces it
    code, _, err = export(data, path, out_dir)
    assert code == 1 and "not empty" in err and "--force" in err
    code, _, err = export(data, path, out_dir, "--force")
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (f"tinker://{RUN}/weights/no-such", "unknown checkpoint"),
        (f"tinker://{BOB_RUN}/weights/bobs", "unknown checkpoint"),  # another owner's, unpublished
        ("tinker://a/b", "not a checkpoint path"),
        ("/tmp/somewhere", "tinker://"),
    ],
)
def test_export_of_a_bad_path_fails_cleanly(data: DataDir, tmp_path: Path, path: str, message: str) -> None:
    code, out, err = export(data, path, tmp_path / "x", "--format", "merged")
    assert code == 1 and message in err and out == ""
    assert "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_export_merged_with_a_missing_base_model_says_what_to_do(data: DataDir, tmp_path: Path) -> None:
    path = f"tinker://{RUN}/weights/step-10"
    code, _, err = export(data, path, tmp_path / "x", "--format", "merged", "--base-model", str(tmp_path / "gone"))
    assert code == 1 and "unknown model" in err


def test_a_database_of_another_schema_version_is_refused_with_a_message(tmp_path: Path) -> None:
    Store.open(default_url(tmp_path)).close()
    with sqlite3.connect(tmp_path / "tinkerd.db") as conn:
        conn.execute("UPDATE schema_version SET version = version + 100")
    for command in (["runs", "list"], ["checkpoints", "list"], ["runs", "show", RUN]):
        code, _, err = invoke(*command, "--data-dir", str(tmp_path))
        assert code == 1 and "schema version" in err, (command, err)
