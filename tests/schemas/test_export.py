"""Generated files stay in step with the code: JSON Schema and the README settings table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from schemas import export
from worker.core.settings import Settings
from worker.devtools import settingsdoc

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {
    "admission",
    "job",
    "params",
    "result_body",
    "error_event",
    "lifecycle_event",
    "heartbeat",
    "node_status",
    "status_reply",
    "snapshot",
    "model_spec",
    "runtime_spec",
    "validation_vector",
    "envelope",
    "stream_body",
    "cancel_request",
}


def test_every_payload_has_a_schema() -> None:
    assert set(export.schemas()) == EXPECTED


def test_committed_json_schema_is_up_to_date() -> None:
    assert export.stale() == [], "JSON Schema is stale: run 'python -m schemas.export'"


def test_export_check_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "schemas.export", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_check_fails_on_stale_missing_or_extra_files(tmp_path: Path) -> None:
    written = export.write(tmp_path)
    assert {p.stem for p in written} == EXPECTED
    assert export.stale(tmp_path) == []
    assert export.write(tmp_path) == []
    (tmp_path / "job.json").write_text("{}\n")
    (tmp_path / "snapshot.json").unlink()
    (tmp_path / "old.json").write_text("{}\n")
    assert export.stale(tmp_path) == ["job.json", "old.json", "snapshot.json"]
    export.write(tmp_path)
    assert export.stale(tmp_path) == []


def test_main_check_exit_code(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(export, "JSON_DIR", tmp_path)
    assert export.main(["--check"]) == 1
    assert export.main([]) == 0
    assert export.main(["--check"]) == 0


def test_schemas_state_the_protocol_rules() -> None:
    job = export.schemas()["job"]
    assert job["additionalProperties"] is False
    assert job["properties"]["job_id"]["pattern"] == "^[A-Za-z0-9_-]{1,128}$"
    envelope = export.schemas()["envelope"]
    assert envelope["required"] == ["v", "typ", "body", "key", "sig"]
    assert envelope["properties"]["key"]["x-msgpack-size"] == 32
    assert envelope["properties"]["sig"]["x-msgpack-size"] == 64
    heartbeat = export.schemas()["heartbeat"]
    assert heartbeat["properties"]["kind"]["const"] == "heartbeat"
    for name in ("result_body", "error_event", "lifecycle_event", "heartbeat", "snapshot"):
        assert "network" in export.schemas()[name]["required"], name
    for name in EXPECTED:
        text = (ROOT / "schemas" / "json" / f"{name}.json").read_text()
        assert json.loads(text)["$id"].endswith(f"/{name}.json")


def test_every_setting_has_a_description() -> None:
    missing = [n for n, f in Settings.model_fields.items() if not f.description]
    assert not missing, f"add description=... to Settings fields {missing} (README table)"


def test_readme_settings_table_is_up_to_date() -> None:
    readme = (ROOT / "README.md").read_text()
    assert settingsdoc.render(readme) == readme, (
        "README settings table is stale: run 'python -m worker.devtools.settingsdoc'"
    )
    for name in Settings.model_fields:
        assert f"`{settingsdoc.env_name(name)}`" in readme


def test_settings_table_rows() -> None:
    table = settingsdoc.table()
    assert "| `RESULTITY_NATS_URL` | `nats://127.0.0.1:4222` |" in table
    assert "| `RESULTITY_KEY_FILE` | `~/.resultity/node.key` |" in table
    assert "| `RESULTITY_MODEL` | unset |" in table
    assert "| `RESULTITY_AUTHORITY_KEYS` | empty |" in table


def test_readme_names_the_test_command_that_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "```\nscripts/test\n```" in readme
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()
    assert "scripts/check" in (ROOT / "scripts" / "test").read_text()


def test_asyncapi_document_names_every_subject_and_is_fresh() -> None:
    from schemas import asyncapi

    doc = asyncapi.document()
    channels = set(doc["channels"])
    for subject in (
        "rst.jobs.{model_id}",
        "rst.results.{job_id}",
        "rst.events.error.{node_id}",
        "rst.events.node.{node_id}",
        "rst.nodes.{node_id}.heartbeat",
        "rst.stream.{job_id}",
        "rst.cancel.{job_id}",
        "$KV.rst_config.snapshot",
    ):
        assert subject in channels
    refs = json.dumps(doc)
    for name in (
        "job",
        "result_body",
        "error_event",
        "lifecycle_event",
        "snapshot",
        "envelope",
        "stream_body",
        "cancel_request",
    ):
        assert f"json/{name}.json" in refs
    assert export.ASYNCAPI.read_text() == export.render(doc)
