"""The command line answers each user error with one line and a non-zero exit status."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest

from commet_middleware import _cli, _demo
from commet_middleware._cli import main
from commet_middleware._spool import Spool


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_missing_catalogue_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """emulator --config nope.toml: one line naming the file, exit 2."""
    assert main(["emulator", "--config", str(tmp_path / "nope.toml"), "--port", "0"]) == 2
    assert "nope.toml" in _one_line_error(capsys)


def test_bad_catalogue(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A catalogue that is not valid TOML or not a catalogue: one line, exit 2."""
    broken = tmp_path / "broken.toml"
    broken.write_text("[features.api_calls]\ntype = 'both'\n")
    assert main(["emulator", "--config", str(broken), "--port", "0"]) == 2
    assert "bad catalogue" in _one_line_error(capsys)
    broken.write_text("this is = = not toml")
    assert main(["emulator", "--config", str(broken), "--port", "0"]) == 2
    assert "bad catalogue" in _one_line_error(capsys)


def test_busy_port(capsys: pytest.CaptureFixture[str]) -> None:
    """A port another process listens on: one line suggesting --port, exit 2."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["emulator", "--port", str(port)]) == 2
    assert "--port" in _one_line_error(capsys)


def test_missing_uvicorn(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without uvicorn, emulator and demo say which extra to install, exit 2."""
    real = importlib.util.find_spec

    def without_uvicorn(name: str, *args: object) -> object:
        return None if name == "uvicorn" else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(_cli.importlib.util, "find_spec", without_uvicorn)
    monkeypatch.setattr(_demo.importlib.util, "find_spec", without_uvicorn)
    assert main(["emulator", "--port", "0"]) == 2
    assert "commet-middleware[server]" in _one_line_error(capsys)
    assert main(["demo", "--duration", "1", "--no-progress"]) == 2
    assert "commet-middleware[server]" in _one_line_error(capsys)


def test_spool_retry_of_an_unknown_row(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """spool retry 12345 with no such dead row: one line, exit 1, nothing moved."""
    path = tmp_path / "spool.sqlite3"
    Spool(str(path)).close()
    assert main(["spool", "retry", "--path", str(path), "12345"]) == 1
    assert "12345" in _one_line_error(capsys)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the installed version and exits 0."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("commet-middleware 0.")
