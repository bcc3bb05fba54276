import os

import pytest

from bdm_cli.io import atomic_write


def test_atomic_write_keeps_the_old_file_on_failure_and_follows_the_umask(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]
    old = os.umask(0o027)
    try:
        with atomic_write(tmp_path / "new.txt", "w") as f:
            f.write("new")
        target.chmod(0o604)
        with atomic_write(target, "w") as f:
            f.write("new")
    finally:
        os.umask(old)
    assert target.read_text() == "new"
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o640  # a new file: the umask's, not mkstemp's 0600
    assert target.stat().st_mode & 0o777 == 0o604  # a replaced file keeps its own
