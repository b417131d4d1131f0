"""Secure by default: no open endpoint beyond loopback unless asked for, and no key in the run folder."""
import pytest
import yaml

from orchestration import cli
from orchestration.rundir import write_run_config
from orchestration.serve.auth import API_KEY_ENV, check_servable, is_loopback
from rlhf.config import load_config


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.1.2.3", False), ("node-7.cluster", False)])
def test_which_hosts_count_as_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_an_open_endpoint_beyond_loopback_is_refused_unless_a_key_or_the_flag(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert check_servable(load_config("tiny", [])) == []  # the default binds 127.0.0.1
    [(field, msg)] = check_servable(load_config("tiny", ["serve.host=0.0.0.0"]))
    assert field == "serve.host" and "serve.api_key" in msg and "allow_unauthenticated" in msg
    assert check_servable(load_config("tiny", ["serve.host=0.0.0.0", "serve.api_key=sk-1"])) == []
    assert check_servable(load_config("tiny", ["serve.host=0.0.0.0", "serve.allow_unauthenticated=true"])) == []
    monkeypatch.setenv(API_KEY_ENV, "sk-from-env")
    assert check_servable(load_config("tiny", ["serve.host=0.0.0.0"])) == []


def test_serve_stops_before_starting_anything_when_refused(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert cli.main(["serve", str(tmp_path / "no-run-needed"), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "serve.host = '0.0.0.0'" in err and "no API key" in err


def test_the_run_folder_and_trackers_never_hold_the_key(tmp_path):
    cfg = load_config("tiny", [f"run.output_dir={tmp_path}", "serve.api_key=sk-secret-123"])
    written = write_run_config(cfg)
    assert "sk-secret-123" not in written.read_text()
    assert yaml.safe_load(written.read_text().split("\n", 1)[1])["serve"]["api_key"] is None
    assert "sk-secret-123" not in str(cfg.dump_without_secrets())
    assert cfg.serve.api_key == "sk-secret-123"  # the running process keeps it
