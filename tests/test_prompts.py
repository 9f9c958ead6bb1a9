"""The one prompt-file reader (``diffalign.data.prompts``): every format, and bad files."""

from __future__ import annotations

import json

import pytest

from diffalign.data.prompts import read_prompt_file, read_prompts
from diffalign.errors import UserError


def test_txt_skips_blank_lines_and_comments(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("# training prompts\na cat\n\n  a dog  \n   # indented comment\na #hashtag inside\n")
    assert read_prompts(p) == ["a cat", "a dog", "a #hashtag inside"]
    assert read_prompt_file(p).rows is None


def test_json_list_and_prompts_object(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["a cat", {"prompt": "a dog", "count": 1}]))
    f = read_prompt_file(tmp_path / "a.json")
    assert f.prompts == ["a cat", "a dog"] and f.rows[1]["count"] == 1 and f.rows[0] == {"prompt": "a cat"}
    (tmp_path / "b.json").write_text(json.dumps({"prompts": ["x", "y"]}))
    assert read_prompts(tmp_path / "b.json") == ["x", "y"]
    (tmp_path / "c.json").write_text('{"prompt": "one"}\n{"prompt": "two"}\n')  # JSON lines in a .json
    assert read_prompts(tmp_path / "c.json") == ["one", "two"]


def test_jsonl_prompt_or_caption_key_keeps_metadata(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "two apples", "count": 2}\n\n{"caption": "a tree"}\n"a plain string"\n')
    f = read_prompt_file(p)
    assert f.prompts == ["two apples", "a tree", "a plain string"]
    assert f.rows[0] == {"prompt": "two apples", "count": 2} and f.rows[1] == {"caption": "a tree"}


def test_csv_prompt_or_caption_column(tmp_path):
    (tmp_path / "a.csv").write_text('caption,seed\n"a cat, sitting",1\na dog,2\n')
    f = read_prompt_file(tmp_path / "a.csv")
    assert f.prompts == ["a cat, sitting", "a dog"] and f.rows[1]["seed"] == "2"
    (tmp_path / "b.csv").write_text("image,prompt\nx.png,a cat\n")
    assert read_prompt_file(tmp_path / "b.csv", required=("image", "prompt")).rows[0]["image"] == "x.png"


@pytest.mark.parametrize("name,text,match", [
    ("bad.jsonl", '{"prompt": "ok"}\n{not json\n', r"bad\.jsonl' line 2 is not valid JSON"),
    ("nokey.jsonl", '{"prompt": "ok"}\n{"title": "x"}\n', r"nokey\.jsonl' line 2 has no prompt key"),
    ("num.jsonl", '{"prompt": ["a"]}\n', r"num\.jsonl' line 1: 'prompt' is a list"),
    ("obj.json", '{"items": []}', r"obj\.json': a JSON object needs a 'prompts' key"),
    ("bad.json", '[1, 2', r"bad\.json' line 1 is not valid JSON"),
    ("elem.json", '["a", 3]', r"elem\.json' \[1\]: expected a string or an object"),
    ("cols.csv", "file,title\na,b\n", r"cols\.csv' lacks column\(s\) a prompt column"),
    ("empty.txt", "# only a comment\n\n", r"empty\.txt' has no prompts"),
])
def test_bad_files_name_the_file_and_line(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=match):
        read_prompts(tmp_path / name)


def test_missing_file_and_required_columns(tmp_path):
    with pytest.raises(UserError, match=r"missing\.txt' does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "p.csv").write_text("file,text\na,b\n")
    with pytest.raises(UserError, match=r"lacks column\(s\) image, prompt"):
        read_prompt_file(tmp_path / "p.csv", required=("image", "prompt"))
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(UserError, match=r"p\.jsonl' line 1 needs key\(s\) image"):
        read_prompt_file(tmp_path / "p.jsonl", required=("image", "prompt"))
