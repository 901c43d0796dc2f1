"""nit_model.atomic: a write lands whole or not at all, and leaves nothing behind."""
import os
import stat

import pytest
import torch

from nit_model.atomic import atomic_save, atomic_write_bytes, atomic_write_text, file_mode


def _names(folder):
    return sorted(os.listdir(folder))


def test_text_and_bytes_replace_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "a.json"
    assert atomic_write_text(path, "one\n") == str(path)  # the folder is created
    atomic_write_text(path, "two\nlines\n")
    assert path.read_text() == "two\nlines\n"
    atomic_write_bytes(path, b"\x00\xff")
    assert path.read_bytes() == b"\x00\xff"
    assert _names(path.parent) == ["a.json"]
    assert stat.S_IMODE(os.stat(path).st_mode) == file_mode()


def test_newline_is_passed_to_open(tmp_path):
    path = tmp_path / "t.csv"
    atomic_write_text(path, "a,b\r\n1,2\r\n", newline="")
    assert path.read_bytes() == b"a,b\r\n1,2\r\n"


def test_a_writer_that_raises_midway_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"old content")
    seen = {}

    def half_then_fail(tmp):
        seen["tmp"] = tmp
        with open(tmp, "wb") as f:
            f.write(b"new but only ha")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save(path, half_then_fail)
    assert path.read_bytes() == b"old content"
    # the temporary file sat beside the destination, hidden, with its extension, and is gone
    assert os.path.dirname(seen["tmp"]) == str(tmp_path)
    assert os.path.basename(seen["tmp"]).startswith(".tmp-w-") and seen["tmp"].endswith(".safetensors")
    assert _names(tmp_path) == ["w.safetensors"]


def test_an_interrupt_midway_leaves_no_new_file(tmp_path):
    path = tmp_path / "new.txt"

    def interrupted(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_save(path, interrupted)
    assert _names(tmp_path) == []


def test_a_torch_save_callback_round_trips(tmp_path):
    path = tmp_path / "state.pt"
    obj = {"w": torch.arange(6.0).reshape(2, 3), "step": 7}
    atomic_save(path, lambda p: torch.save(obj, p))
    back = torch.load(path, weights_only=True)
    assert back["step"] == 7 and torch.equal(back["w"], obj["w"])


def test_a_folder_as_destination_is_refused(tmp_path):
    with pytest.raises(ValueError, match="path of a file"):
        atomic_write_text(tmp_path, "x")
