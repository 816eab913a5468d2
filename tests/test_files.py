"""prefix_core.files: atomic writes leave the old content or the new one, never a part; the lock excludes other
processes; the module imports without torch."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from prefix_core.files import atomic_write, atomic_write_dir, file_lock, replacing


def test_atomic_write_replaces_whole_files_with_the_asked_mode(tmp_path):
    path = tmp_path / "a" / "keys.yaml"
    atomic_write(path, "old")
    atomic_write(path, b"new", mode=0o600)
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(path.parent) == ["keys.yaml"]  # no temporary file left


def test_a_failed_write_leaves_the_old_content_and_no_temporary_file(tmp_path):
    path = tmp_path / "job.json"
    atomic_write(path, "old")
    with pytest.raises(RuntimeError), replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer died")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["job.json"]

    def half(folder):
        (folder / "a").write_text("half")
        raise RuntimeError("the writer died")

    atomic_write_dir(tmp_path / "prefix", lambda folder: (folder / "a").write_text("old"))
    with pytest.raises(RuntimeError):
        atomic_write_dir(tmp_path / "prefix", half)
    assert (tmp_path / "prefix" / "a").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["job.json", "prefix"]
    atomic_write_dir(tmp_path / "prefix", lambda folder: (folder / "b").write_text("new"))
    assert os.listdir(tmp_path / "prefix") == ["b"]


def test_the_lock_excludes_another_process(tmp_path):
    lock = tmp_path / "locks" / "x.lock"
    probe = ("import sys; from prefix_core.files import file_lock\n"
             "try:\n    with file_lock(sys.argv[1], blocking=False): print('took')\n"
             "except BlockingIOError: print('busy')")
    with file_lock(lock):
        held = subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True, text=True, timeout=60)
    free = subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True, text=True, timeout=60)
    assert (held.stdout.strip(), free.stdout.strip()) == ("busy", "took"), held.stderr + free.stderr


def test_it_imports_without_torch():
    code = "import sys, prefix_core.files; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
