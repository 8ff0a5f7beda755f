import pytest

from poemdpo.data.forms import classify, is_degenerate, is_strict_five, is_well_formed, split_lines

JING_YE_SI = "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"
HUANG_HE_LOU = (
    "昔人已乘黃鶴去，此地空餘黃鶴樓。\n黃鶴一去不復返，白雲千載空悠悠。\n"
    "晴川歷歷漢陽樹，芳草萋萋鸚鵡洲。\n日暮鄉關何處是？煙波江上使人愁。"
)
CHUN_WANG = "國破山河在，城春草木深。\n感時花濺淚，恨別鳥驚心。\n烽火連三月，家書抵萬金。\n白頭搔更短，渾欲不勝簪。"
ZA_YAN = "蜀道之難，難於上青天！\n蠶叢及魚鳧，開國何茫然。"


def test_split_lines_on_fullwidth_punctuation_and_newlines():
    assert split_lines(JING_YE_SI) == ["床前明月光", "疑是地上霜", "舉頭望明月", "低頭思故鄉"]
    assert split_lines("一二三四五\n六七八九十") == ["一二三四五", "六七八九十"]
    assert split_lines("") == []


@pytest.mark.parametrize(
    "text, meter, shape",
    [
        (JING_YE_SI, "五言", "绝句"),
        (CHUN_WANG, "五言", "律诗"),
        (HUANG_HE_LOU, "七言", "律诗"),
        (ZA_YAN, "杂言", "绝句"),
        ("\n".join([JING_YE_SI] * 3), "五言", "排律"),
        ("一二三四五，六七八九十。\n一二三四五。", "五言", "其他"),
    ],
)
def test_classify(text, meter, shape):
    form = classify(text)
    assert (form.meter, form.shape) == (meter, shape)


def test_line_lengths_and_label():
    form = classify(HUANG_HE_LOU)
    assert form.line_lengths == (7,) * 8
    assert form.label == "七言律诗"


def test_strict_five_needs_every_line():
    assert is_strict_five(JING_YE_SI)
    assert not is_strict_five(JING_YE_SI + "\n一二三四五六，七八九十。")
    assert not is_strict_five("")
    assert not is_strict_five("，。")


def test_well_formed_and_degenerate():
    assert is_well_formed(JING_YE_SI) and not is_degenerate(JING_YE_SI)
    assert not is_well_formed(JING_YE_SI.rstrip("。"))  # no closing punctuation
    assert not is_well_formed("床前明月光，疑是地上霜。\n舉頭望明月。")  # odd line count
    assert not is_well_formed(ZA_YAN)  # unequal lines
    assert is_degenerate("")
    assert is_degenerate("，。，。")  # punctuation only
    assert is_degenerate("床前明月光疑是地上霜")  # no line break
    assert is_degenerate("床前明月光，床前明月光。\n舉頭望明月，低頭思故鄉。")  # a line repeated
