"""Threat: another local user reads the spool, which holds customers, features and usage."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from commet_middleware import UsageEvent
from commet_middleware._files import prepare_private_file
from commet_middleware._spool import Spool

pytestmark = pytest.mark.usefixtures("usual_umask")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _write_one(spool: Spool) -> None:
    event = UsageEvent.create("cus_1", "api_calls", idempotency_key="k1")
    spool.add(event, "v1", b"{}", claim=False)


def test_new_spool_and_its_wal_and_shm_are_0600(tmp_path: Path) -> None:
    """Under umask 022 the spool file and SQLite's -wal and -shm companions are all 0600."""
    path = tmp_path / "spool.sqlite3"
    spool = Spool(path)
    _write_one(spool)
    try:
        files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
        assert [(f.name, _mode(f)) for f in files] == [(f.name, 0o600) for f in files]
    finally:
        spool.close()


def test_missing_directories_are_created_0700(tmp_path: Path) -> None:
    """A spool path in directories that do not exist yet gets them, each 0700."""
    path = tmp_path / "var" / "commet" / "spool.sqlite3"
    spool = Spool(path)
    _write_one(spool)
    spool.close()
    assert (_mode(tmp_path / "var"), _mode(tmp_path / "var" / "commet")) == (0o700, 0o700)
    assert _mode(path) == 0o600


def test_existing_readable_spool_gets_one_warning_and_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An existing 0644 spool is opened as it is, with one WARNING naming the file and the fix."""
    path = tmp_path / "spool.sqlite3"
    Spool(path).close()
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="commet_middleware"):
        spool = Spool(path)
        _write_one(spool)
        spool.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(path) in warnings[0].getMessage()
    assert "chmod 600" in warnings[0].getMessage()
    assert _mode(path) == 0o644  # the operator's choice, reported, not overridden


def test_private_existing_spool_opens_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Reopening a 0600 spool (as every worker and restart does) logs nothing."""
    path = tmp_path / "spool.sqlite3"
    first = Spool(path)
    _write_one(first)
    with caplog.at_level(logging.DEBUG, logger="commet_middleware"):
        Spool(path).close()
    first.close()
    assert caplog.records == []


def test_symlink_planted_at_the_spool_path_is_reported_not_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A symlink planted at the spool path is not created through, and a WARNING names it."""
    target = tmp_path / "theirs" / "spool.sqlite3"
    path = tmp_path / "spool.sqlite3"
    path.symlink_to(target)
    with caplog.at_level(logging.WARNING, logger="commet_middleware"):
        prepare_private_file(str(path))
    assert not target.exists()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "symbolic link" in caplog.records[0].getMessage()
