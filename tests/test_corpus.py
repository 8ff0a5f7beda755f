import json

import pytest

from poemdpo.data.corpus import clean_line, read_corpus
from poemdpo.errors import PoemDPOError


def write(path, content):
    path.write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return path


def test_clean_line_strips_notes_and_brackets():
    assert clean_line("老夫不出長蓬蒿，穉子無憂走（一作「奏」）風雨。") == "老夫不出長蓬蒿，穉子無憂走風雨。"
    assert clean_line("獼猴垂弱蔓，鸛鶴[睡]橫槎。") == "獼猴垂弱蔓，鸛鶴睡橫槎。"
    assert clean_line("更尋[一○]掊井處，時見白龍行。") == "更尋掊井處，時見白龍行。"
    assert clean_line(" 秦川雄帝宅， 函谷壯皇居。〖1〗") == "秦川雄帝宅，函谷壯皇居。"


def test_reads_directory_and_counts(corpus_dir):
    poems, stats = read_corpus(corpus_dir, progress=False)
    assert stats.files == 2  # README.md is not a corpus file
    assert stats.poems_read == 120 and stats.kept == len(poems) == 120
    assert poems[0].text.count("\n") == 1 and poems[0].title == "無題0"


def test_single_file(corpus_dir):
    poems, stats = read_corpus(corpus_dir / "poet.tang.1000.json", progress=False)
    assert stats.files == 1 and len(poems) == 60


def test_drops_empty_duplicate_and_note_only_lines(tmp_path):
    poems = [
        {"title": "甲", "paragraphs": ["床前明月光，疑是地上霜。"]},
        {"title": "乙", "paragraphs": ["床前明月光，疑是地上霜。"]},  # same body, other title
        {"title": "丙", "paragraphs": []},
        {"title": "丁", "paragraphs": ["（見《全唐詩》卷一。）"]},  # a note and nothing else
        {"title": "戊（一作己）", "paragraphs": ["舉頭望明月，低頭思故鄉。", "（以下從京本補。）"]},
    ]
    kept, stats = read_corpus(write(tmp_path / "poet.tang.0.json", poems), progress=False)
    assert [p.title for p in kept] == ["甲", "戊"]
    assert kept[1].text == "舉頭望明月，低頭思故鄉。"
    assert stats.dropped == {"duplicate": 1, "empty": 2}


def test_drops_note_paragraphs_keeps_verse_with_book_titles(tmp_path):
    # Real paragraphs from the Tang corpus: commentary after a 五言 poem, and a verse couplet with 《》.
    poems = [
        {
            "title": "甲",
            "paragraphs": [
                "晴景應重陽，高臺愴遠鄉。",
                "見《吟窗雜錄》卷二五《歷代吟譜》。",
                "按：此詩末八句與軒轅集《還丹口訣》中八句相近，見本書卷三十。",
                "「產巢」，一作「有窠」。",
                "《祖堂集》卷十七、《景德傳燈錄》卷十。",
            ],
        },
        {"title": "乙", "paragraphs": ["童子解吟《長恨曲》，胡兒能唱《琵琶篇》。", "雲卷四山雪，風凝千樹霜。"]},
    ]
    kept, stats = read_corpus(write(tmp_path / "poet.tang.0.json", poems), progress=False)
    assert [p.text for p in kept] == [
        "晴景應重陽，高臺愴遠鄉。",
        "童子解吟長恨曲，胡兒能唱琵琶篇。\n雲卷四山雪，風凝千樹霜。",
    ]
    assert stats.note_paragraphs_dropped == 4


def test_to_simplified(tmp_path):
    file = write(tmp_path / "poet.tang.0.json", [{"title": "靜夜思", "paragraphs": ["舉頭望明月，低頭思故鄉。"]}])
    (poem,), _ = read_corpus(file, to_simplified=True, progress=False)
    assert (poem.title, poem.text) == ("静夜思", "举头望明月，低头思故乡。")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not a valid JSON file"),
        ({"title": "x"}, "expected a JSON array"),
        ([{"title": "甲", "paragraphs": ["一二三四五。"]}, {"title": "乙"}], "poem #1: poem has no 'paragraphs'"),
        ([{"paragraphs": ["一二三四五。"]}], "poem #0: poem has no 'title'"),
        ([{"title": "甲", "paragraphs": ["一二三四五。", 7]}], "poem #0: paragraphs[1] must be a string"),
        ([{"title": "甲", "paragraphs": "一二三四五。"}], "poem #0: 'paragraphs' must be a list"),
        ([{"title": None, "paragraphs": []}], "poem #0: 'title' must be a string"),
        (["a poem"], "poem #0: a poem must be a JSON object"),
    ],
)
def test_bad_input_names_file_and_poem(tmp_path, content, message):
    write(tmp_path / "poet.tang.5.json", content)
    with pytest.raises(PoemDPOError) as error:
        read_corpus(tmp_path, progress=False)
    assert message in str(error.value)
    assert "poet.tang.5.json" in str(error.value)


def test_skip_bad_counts_and_keeps_the_rest(corpus_dir):
    write(corpus_dir / "poet.tang.2000.json", "{broken")
    write(corpus_dir / "poet.tang.3000.json", [{"title": "甲"}, {"title": "乙", "paragraphs": ["一二三四五。"]}])
    poems, stats = read_corpus(corpus_dir, skip_bad=True, progress=False)
    assert stats.dropped == {"bad_file": 1, "bad_poem": 1}
    assert len(poems) == 121


def test_empty_or_missing_directory(tmp_path):
    with pytest.raises(PoemDPOError, match="no corpus files"):
        read_corpus(tmp_path, progress=False)
    with pytest.raises(PoemDPOError, match="does not exist"):
        read_corpus(tmp_path / "nowhere", progress=False)
