from pathlib import Path

import pytest

from infmoe.data.text import EOT, one_line, read_text, split_documents, split_tail
from infmoe.errors import DataError


def test_blank_lines_separate_documents_and_inner_line_breaks_stay():
    text = "first line\nsecond line\n\n \t\nthird para\r\n\r\n\n  fourth  \n"
    assert split_documents(text) == ["first line\nsecond line", "third para", "fourth"]


def test_without_blank_lines_each_line_is_a_document():
    assert split_documents("one story.\ntwo story.\r\nthree.\n") == ["one story.", "two story.", "three."]


def test_the_endoftext_marker_wins_over_blank_lines():
    text = f"story one\n\nstill one{EOT}\nstory two\n{EOT}\n{EOT}  \n"
    assert split_documents(text) == ["story one\n\nstill one", "story two"]


def test_whitespace_only_text_has_no_documents():
    assert split_documents(" \n\t\n\n  ") == []


@pytest.mark.parametrize(
    ("n", "fraction", "n_tail"), [(2, 0.05, 1), (10, 0.05, 1), (100, 0.05, 5), (10, 0.99, 9), (41, 0.1, 4)]
)
def test_split_tail_takes_the_rounded_last_fraction_and_keeps_one_on_each_side(n, fraction, n_tail):
    head, tail = split_tail(list(range(n)), fraction, "documents", "x")
    assert tail == list(range(n - n_tail, n)) and head == list(range(n - n_tail))


def test_split_tail_refuses_a_single_item(one_line_error):
    one_line_error(
        DataError,
        split_tail,
        ["only"],
        0.05,
        "documents",
        "tiny.txt",
        match=r"tiny\.txt has 1 documents, too few",
    )


def test_read_text_decodes_utf8_and_drops_a_byte_order_mark(tmp_path: Path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffnaïve café — 東京\n".encode())
    assert read_text(path) == "naïve café — 東京\n"


def test_non_utf8_strict_names_the_file_and_byte_offset(tmp_path: Path, one_line_error):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"ok text, then caf" + "é".encode("latin-1") + b" more")
    message = one_line_error(DataError, read_text, path, match=r"byte offset 17")
    assert (
        str(path) in message
        and "0xe9" in message
        and "iconv" in message
        and "--encoding-errors replace" in message
    )


def test_non_utf8_replace_gives_the_replacement_character(tmp_path: Path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9 ok")
    assert read_text(path, "replace") == "caf\ufffd ok"


@pytest.mark.parametrize("data", [b"text\x00with a NUL", bytes(range(1, 32)) * 4 + b"a few letters"])
def test_binary_files_are_refused_by_name(tmp_path: Path, one_line_error, data: bytes):
    path = tmp_path / "blob.txt"
    path.write_bytes(data)
    one_line_error(DataError, read_text, path, match=rf"{path} looks binary")


def test_text_with_tabs_and_form_feeds_is_not_binary(tmp_path: Path):
    path = tmp_path / "code.txt"
    path.write_bytes(b"\tindented\x0c\r\n" * 50)
    assert read_text(path).startswith("\tindented")


def test_an_unreadable_file_gives_one_line(tmp_path: Path, one_line_error, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("hidden")

    def denied(self):  # chmod does not stop root, so fail the read itself
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    one_line_error(DataError, read_text, path, match=rf"cannot read {path}: Permission denied; check")


def test_one_line_collapses_whitespace_and_cuts():
    assert one_line("a\n  b\tc\n") == "a b c"
    assert one_line("x" * 50, limit=10) == "x" * 9 + "…"
