"""Attachment file names: one per file, safe, distinct within a message."""

from channels.files import file_names


def test_names_that_repeat_are_all_kept():
    assert file_names(["image.png", "image.png", "IMAGE.png", "notes"]) == [
        "image.png", "image (2).png", "IMAGE (3).png", "notes"]


def test_a_name_is_never_a_path_and_never_empty():
    assert file_names(["../../etc/passwd", "a\\b\\c.txt", "..", "", None, " . "], fallback="file") == [
        "passwd", "c.txt", "file", "file (2)", "file (3)", "file (4)"]


def test_a_name_that_only_has_a_dot_in_front_keeps_it():
    assert file_names([".env", ".env"]) == [".env", ".env (2)"]


def test_the_sweep_deletes_what_is_older_than_the_cutoff_and_the_folders_left_empty(tmp_path):
    import os
    import time

    from channels.files import sweep

    root = tmp_path / "attachments"
    old, new, mixed = root / "feishu" / "om_1", root / "slack" / "C1-2", root / "webchat" / "c1"
    for folder in (old, new, mixed / "a"):
        folder.mkdir(parents=True, exist_ok=True)
    (old / "report.pdf").write_bytes(b"old")
    (new / "image.png").write_bytes(b"new")
    (mixed / "a" / "kept.txt").write_bytes(b"new")
    (mixed / "gone.txt").write_bytes(b"old")
    month_ago = time.time() - 31 * 86400
    for path in (old / "report.pdf", mixed / "gone.txt"):
        os.utime(path, (month_ago, month_ago))
    assert sweep(root, time.time() - 30 * 86400) == 2
    assert not (root / "feishu").exists()  # emptied folders go, up to the root
    assert (new / "image.png").read_bytes() == b"new" and (mixed / "a" / "kept.txt").exists()
    assert not (mixed / "gone.txt").exists() and root.is_dir()
    assert sweep(tmp_path / "none", time.time()) == 0


def test_a_long_name_is_cut_to_what_a_file_system_takes_and_control_characters_go():
    from channels.files import NAME_BYTES

    names = file_names(["é" * 300 + ".tar.gz", "a" * 300, "x\x00y\x1fz.txt", "n" * 190 + "." + "s" * 40])
    assert names[0].endswith(".gz") and len(names[0].encode()) <= NAME_BYTES
    assert names[1] == "a" * NAME_BYTES
    assert names[2] == "xyz.txt"
    assert len(names[3].encode()) == NAME_BYTES and names[3].startswith("n" * 190)
