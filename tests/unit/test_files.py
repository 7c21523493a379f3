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
