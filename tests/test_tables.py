"""Ratings tables: parsing, hostile content, and the analyzer's on-disk store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sensorium.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from sensorium.tables import TableStore, parse_table, read_table


def test_parse_sniffs_delimiters_and_matches_columns_case_insensitively() -> None:
    for sep in (",", "\t", ";"):
        t = parse_table(f"Word{sep}Visual_en_ft{sep}hand_en_ft\nApple{sep}4{sep}NA\npear{sep}{sep}2.5\n".encode(), "x")
        assert t.words == ("Apple", "pear")
        assert t.resolve("visual_EN_FT") == "Visual_en_ft"
        np.testing.assert_array_equal(t.matrix(["VISUAL_en_ft", "Hand_En_Ft"]), [[4, np.nan], [np.nan, 2.5]])


@pytest.mark.parametrize("text, message", [
    (b"", "empty table"),
    (b"Word,x\n", "no rows"),
    (b"Word,x\na,1\nA ,2\n", "duplicate word 'A' in rows 2 and 3"),
    (b"Word,x\na,1,3\n", "row 2 has 3 fields"),
    (b"Word,x,x\na,1,2\n", "duplicate column"),
    (b"Word,x\n,1\n", "row 2, column 'Word': empty word"),
    (b"\xff\xfeW", "not UTF-8"),
    (b"Word,x\na\x00,1\n", "NUL"),
])
def test_malformed_tables_are_refused_with_their_place(text: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_table(text, "t.csv")


def test_non_numeric_and_infinite_cells_name_row_and_column() -> None:
    t = parse_table(b"Word,x,y\na,1,inf\nb,two,3\n", "t.csv")
    with pytest.raises(InvalidArgument, match=r"t.csv: row 3, column 'x': 'two' is not a number"):
        t.numeric("x")
    with pytest.raises(InvalidArgument, match="row 2, column 'y': infinite"):
        t.numeric("y")
    with pytest.raises(InvalidArgument, match="no column 'z'"):
        t.numeric("z")


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        read_table(tmp_path / "absent.csv")


def test_store_is_atomic_verified_and_refuses_bad_names(tmp_path: Path) -> None:
    store = TableStore(tmp_path, max_bytes=200)
    info = store.register("t1", b"Word,x\na,1\nb,2\nc,3\n")
    assert info["n_rows"] == 3 and store.get("t1").words == ("a", "b", "c")
    with pytest.raises(AlreadyExists):
        store.register("t1", b"Word,x\na,1\n")
    with pytest.raises(ResourceExhausted, match="max_table_bytes"):
        store.register("big", b"Word,x\n" + b"a,1\n" * 100)
    for bad in ("../x", "", "a/b", ".hidden", "x" * 65):
        with pytest.raises(InvalidArgument, match="invalid table name"):
            store.register(bad, b"Word,x\na,1\n")
    # a refused registration leaves the stored table as it was
    with pytest.raises(InvalidArgument):
        store.register("t1", b"Word,x\na,1\na,2\n", replace=True)
    assert store.get("t1").words == ("a", "b", "c")
    assert not list(tmp_path.glob(".*tmp"))
    (data_file,) = tmp_path.glob("t1.*.csv")  # named by its content
    data_file.write_bytes(b"Word,x\na,9\nb,2\nc,3\n")
    fresh = TableStore(tmp_path)
    with pytest.raises(FailedPrecondition, match="damaged"):
        fresh.get("t1")
    assert [t["name"] for t in fresh.list()] == ["t1"]
    fresh.delete("t1")
    with pytest.raises(NotFound):
        fresh.get("t1")


def test_a_replace_that_fails_half_way_keeps_the_old_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """New data is written beside the old and the manifest last: when the manifest cannot be written
    (a full disk), the old table is still registered, intact and served, and no new file is left."""
    import sensorium.tables as tables
    from sensorium.errors import StorageFull

    store = TableStore(tmp_path)
    store.register("t", b"word,visual\napple,1\nmusic,2\nkick,3\n")
    before = sorted(p.name for p in tmp_path.iterdir())

    def full(*args: object, **kwargs: object) -> None:
        raise StorageFull("no space left on the analyzer tables store")

    monkeypatch.setattr(tables, "atomic_write_json", full)
    with pytest.raises(StorageFull):
        store.register("t", b"word,visual\napple,5\nmusic,5\nkick,5\n", replace=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert list(TableStore(tmp_path).get("t").numeric("visual")) == [1, 2, 3]
    store.register("t", b"word,visual\napple,5\nmusic,5\nkick,5\n", replace=True)  # then the replace goes through
    assert list(TableStore(tmp_path).get("t").numeric("visual")) == [5, 5, 5]
    assert len(list(tmp_path.glob("t.*.csv"))) == 1  # the old data file is gone


def test_tables_registered_before_content_names_still_load(tmp_path: Path) -> None:
    import hashlib
    import json

    data = b"word,visual\napple,1\nmusic,2\nkick,3\n"
    (tmp_path / "old.csv").write_bytes(data)
    (tmp_path / "old.json").write_text(json.dumps({"name": "old", "n_rows": 3, "columns": ["word", "visual"],
                                                   "sha256": hashlib.sha256(data).hexdigest(), "word_column": "word"}))
    store = TableStore(tmp_path)
    assert [t["name"] for t in store.list()] == ["old"] and len(store.get("old")) == 3
    store.register("old", data + b"salt,4\n", replace=True)
    assert not (tmp_path / "old.csv").exists() and len(store.get("old")) == 4
