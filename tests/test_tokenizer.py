from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from poemdpo.data.corpus import DEFAULT_CORPUS, read_corpus
from poemdpo.data.prompts import SPECIAL_TOKENS, build_prompt
from poemdpo.models.tokenizer import train_char_tokenizer

POEMS = [
    ("帝京篇十首 一", "秦川雄帝宅，函谷壯皇居。\n綺殿千尋起，離宮百雉餘。"),
    ("遣懷", "落魄江湖載酒行，楚腰纖細掌中輕。\n十年一覺揚州夢，贏得青樓薄倖名。"),
    ("春曉", "春眠不覺曉，處處聞啼鳥。\n夜來風雨聲，花落知多少。"),
]


def texts() -> list[str]:
    return [build_prompt(title) + poem for title, poem in POEMS]


@pytest.fixture
def tok() -> PreTrainedTokenizerFast:
    return train_char_tokenizer(texts(), min_frequency=1)


def test_one_token_per_character_and_round_trip(tok):
    for text in texts():
        x = text + tok.eos_token
        ids = tok(x)["input_ids"]
        # 3 prompt markers and eos are one token each; everything else is a character.
        assert len(ids) == len(text) - sum(len(m) - 1 for m in SPECIAL_TOKENS) + 1
        assert tok.decode(ids, skip_special_tokens=False) == x
        assert tok.unk_token_id not in ids


def test_special_tokens_whole_and_nothing_added(tok):
    ids = tok(build_prompt("遣懷"))["input_ids"]
    assert tok.convert_ids_to_tokens(ids[:1]) == ["<INS>"]
    assert tok.convert_ids_to_tokens(ids[-1:]) == ["<RES>"]
    assert tok.convert_tokens_to_ids("<INP>") in ids
    # No automatic bos or eos, with or without add_special_tokens.
    assert ids == tok(build_prompt("遣懷"), add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in ids and tok.bos_token_id not in ids
    assert {tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token} == {"<pad>", "<s>", "</s>", "<unk>"}


def test_prompt_ids_are_prefix_of_prompt_plus_poem(tok):
    for title, poem in POEMS:
        prompt_ids = tok(build_prompt(title))["input_ids"]
        full_ids = tok(build_prompt(title) + poem + tok.eos_token)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids
        assert full_ids[-1] == tok.eos_token_id


def test_newline_in_vocab_and_rare_chars_are_unknown():
    tok = train_char_tokenizer(texts(), min_frequency=2)
    assert "\n" in tok.get_vocab()
    ids = tok("春眠\n鷄")["input_ids"]
    # 春 (in two poems) is kept, 眠 (in one) and 鷄 (never seen) are not.
    spring, newline = tok.convert_tokens_to_ids(["春", "\n"])
    assert ids == [spring, tok.unk_token_id, newline, tok.unk_token_id]


def test_same_texts_same_ids():
    assert train_char_tokenizer(texts()).get_vocab() == train_char_tokenizer(texts()).get_vocab()


@pytest.mark.parametrize("auto", [True, False])
def test_saved_next_to_llama_config_loads_the_same(tok, tmp_path, auto):
    tok.save_pretrained(tmp_path)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=8, num_hidden_layers=1, num_attention_heads=1)
    config.save_pretrained(tmp_path)
    cls = AutoTokenizer if auto else PreTrainedTokenizerFast
    loaded = cls.from_pretrained(tmp_path)
    for text in texts():
        x = text + tok.eos_token
        assert loaded(x)["input_ids"] == tok(x)["input_ids"]
        assert loaded.decode(loaded(x)["input_ids"], skip_special_tokens=False) == x
    assert loaded.padding_side == "right" and loaded.model_max_length == tok.model_max_length
    assert loaded.chat_template is None
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)


def test_qwen2_config_breaks_auto_tokenizer(tok, tmp_path):
    """The trap that rules out a qwen2 architecture; if this starts failing, qwen2 became safe too."""
    tok.save_pretrained(tmp_path)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=8, num_hidden_layers=1, num_attention_heads=1)
    config.save_pretrained(tmp_path)
    x = build_prompt("遣懷")
    assert AutoTokenizer.from_pretrained(tmp_path)(x)["input_ids"] != tok(x)["input_ids"]


@pytest.mark.skipif(not Path(DEFAULT_CORPUS, "poet.tang.0.json").is_file(), reason="corpus not present")
def test_real_poems_round_trip():
    poems, _ = read_corpus(Path(DEFAULT_CORPUS, "poet.tang.0.json"), progress=False)
    all_texts = [build_prompt(p.title) + p.text for p in poems]
    tok = train_char_tokenizer(all_texts, min_frequency=1)
    for x in all_texts:
        assert tok.decode(tok(x)["input_ids"], skip_special_tokens=False) == x
