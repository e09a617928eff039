"""megalong.records: one JSON / JSON-lines reader whose errors name the file and the record."""

import pytest

from megalong.errors import MegalongError
from megalong.records import check_records_head, iter_records, read_json, read_json_object


def test_iter_records_in_every_form(tmp_path):
    forms = {"list.json": '[{"a": 1}, {"a": 2}]', "lines.jsonl": '{"a": 1}\n\n{"a": 2}\n',
             "one.json": '{\n  "a": 1\n}\n'}
    for name, text in forms.items():
        (tmp_path / name).write_text(text)
    path = str(tmp_path / "list.json")
    assert list(iter_records(path)) == [(f"{path}[0]", {"a": 1}), (f"{path}[1]", {"a": 2})]
    path = str(tmp_path / "lines.jsonl")
    assert list(iter_records(path)) == [(f"{path}:1", {"a": 1}), (f"{path}:3", {"a": 2})]
    path = str(tmp_path / "one.json")
    assert list(iter_records(path)) == [(path, {"a": 1})]


def test_bad_records_are_named(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(MegalongError, match=r"broken.jsonl:2: invalid JSON"):
        list(iter_records(str(tmp_path / "broken.jsonl")))
    (tmp_path / "broken.json").write_text('[{"a": 1},')
    with pytest.raises(MegalongError, match=r"broken.json: invalid JSON"):
        list(iter_records(str(tmp_path / "broken.json")))
    (tmp_path / "prose.txt").write_text("hello")
    with pytest.raises(MegalongError, match="--sft-data .*prose.txt is not json or jsonl"):
        check_records_head(str(tmp_path / "prose.txt"), "--sft-data")
    (tmp_path / "empty.json").write_text(" [ ] ")
    with pytest.raises(MegalongError, match="holds no records"):
        check_records_head(str(tmp_path / "empty.json"), "--sft-data")


def test_read_json(tmp_path):
    with pytest.raises(MegalongError, match="missing.json does not exist"):
        read_json(str(tmp_path / "missing.json"))
    with pytest.raises(MegalongError, match="not found; needed here"):
        read_json_object(str(tmp_path / "missing.json"), "needed here")
    (tmp_path / "list.json").write_text("[1]")
    assert read_json(str(tmp_path / "list.json")) == [1]
    with pytest.raises(MegalongError, match="does not hold a JSON object"):
        read_json_object(str(tmp_path / "list.json"), "")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MegalongError, match="cannot read .*bad.json"):
        read_json(str(tmp_path / "bad.json"))
