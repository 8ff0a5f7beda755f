import random

import pytest

from poemdpo.data import prosody
from poemdpo.data.corpus import Poem
from poemdpo.data.pairs import build_pairs, rhyme_near_miss
from poemdpo.data.prosody import CHECKS, EITHER, PING, UNKNOWN, ZE, check, normalize, rhyme_groups, tone
from poemdpo.data.rules import preferred, rejected

DENG_GUAN_QUE_LOU = "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。"  # 五绝, 仄起首句不入韵
ZAO_FA_BAI_DI = "朝辭白帝彩雲間，千里江陵一日還。\n兩岸猿聲啼不住，輕舟已過萬重山。"  # 七绝, 平起首句入韵
CHUN_WANG = (  # 五律, 仄起首句不入韵
    "國破山河在，城春草木深。\n感時花濺淚，恨別鳥驚心。\n烽火連三月，家書抵萬金。\n白頭搔更短，渾欲不勝簪。"
)
CHUN_XIAO = "春眠不覺曉，處處聞啼鳥。\n夜來風雨聲，花落知多少。"  # rhymes on 仄 (曉 鳥 少), 失粘: a 古绝
JING_YE_SI = "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"  # rhymes in 七陽, tones free: a 古绝
HUANG_HE_LOU = (  # rhymes, but its first lines ignore the tone rules
    "昔人已乘黃鶴去，此地空餘黃鶴樓。\n黃鶴一去不復返，白雲千載空悠悠。\n"
    "晴川歷歷漢陽樹，芳草萋萋鸚鵡洲。\n日暮鄉關何處是，煙波江上使人愁。"
)
MIXED = "君不見黃河之水天上來，奔流到海不復回。\n君不見高堂明鏡悲白髮，朝如青絲暮成雪。"


def swap(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1
    return text.replace(old, new)


def test_entering_tone_characters_are_oblique_whatever_pinyin_says():
    for char in "一十白石國竹":
        assert tone(char) == ZE, char
    assert tone("東") == tone("風") == PING
    assert tone("看") == tone("思") == EITHER  # two readings, by sense
    assert tone("囗") == UNKNOWN


def test_table_and_its_corrections():
    assert len(prosody.groups()) == 106 and len(prosody.level_groups_all()) == 30
    assert rhyme_groups("東") == {"上平聲一東"}
    assert rhyme_groups("先") >= {"下平聲一先"}  # the group's own head is missing from the scraped table
    assert rhyme_groups("龍") == {"上平聲二冬"}  # 龍 for 襲 in 入聲十四緝 is a scraping slip


def test_variants_map_to_the_form_the_table_lists():
    assert normalize("爲") == "為" and tone("爲") == EITHER
    assert normalize("疎") == "疏"
    assert normalize("溪") == "谿" and tone("溪") == PING
    assert normalize("为") == "為"  # simplified, through OpenCC
    assert normalize("東") == "東"  # a listed character is never mapped
    assert prosody.unknown_share(["白日依山盡，黃河入海囗。"]) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "text, pattern, group",
    [
        (DENG_GUAN_QUE_LOU, "仄起首句不入韵", "下平聲十一尤"),
        (ZAO_FA_BAI_DI, "平起首句入韵", "上平聲十五刪"),
        (CHUN_WANG, "仄起首句不入韵", "下平聲十二侵"),
    ],
)
def test_regulated_poems_pass_every_check(text, pattern, group):
    report = check(text)
    assert report.applicable and report.helv and report.score == 1.0 and report.failed() == []
    assert (report.pattern, report.rhyme_group, report.unknown) == (pattern, group, 0)


def test_old_style_poems_fail_what_they_break():
    assert set(check(CHUN_XIAO).failed()) == {"rhyme", "adhesion", "template"}
    assert check(JING_YE_SI).rhyme and not check(JING_YE_SI).helv
    assert set(check(HUANG_HE_LOU).failed()) == {"alternation", "template"}
    mixed = check(MIXED)
    assert not mixed.applicable and mixed.score == 0.0 and mixed.failed() == list(CHECKS)


@pytest.mark.parametrize(
    "old, new, broken",
    [
        ("流", "山", {"rhyme"}),  # 山 is 平 but 十五刪, not 十一尤
        ("流", "樓", {"rhyme"}),  # the same rhyme character twice
        ("依山", "依水", {"alternation", "template"}),  # 仄仄平仄仄: positions 2 and 4 both 仄
        ("白日依山", "白雲依水", {"opposition", "template"}),  # line 1 flipped: its couplet no longer 对
        ("欲窮千里目，更上一層樓", "綠樹含煙遠，青山對客愁", {"adhesion", "template"}),  # couplet 2 = couplet 1: 失粘
        ("黃河", "綠河", {"no_gu_ping"}),  # 仄平仄仄平
        ("一層", "千層", {"no_san_ping_wei"}),  # ○仄平平平
    ],
)
def test_a_breakage_fails_exactly_the_broken_check(old, new, broken):
    report = check(swap(DENG_GUAN_QUE_LOU, old, new))
    assert set(report.failed()) == broken
    assert not report.helv and report.score == pytest.approx(1 - len(broken) / len(CHECKS))


def test_either_never_fails_and_unknown_always_does():
    assert check(swap(DENG_GUAN_QUE_LOU, "依山", "看山")).helv  # 看 (○) where 平 is due
    report = check(swap(DENG_GUAN_QUE_LOU, "日", "囗"))
    assert report.unknown == 1 and set(report.failed()) == {"alternation", "opposition", "template"}
    assert check(swap(DENG_GUAN_QUE_LOU, "白", "囗")).helv  # position 1 is free: no check depends on it


def test_templates():
    assert prosody.template("仄起首句不入韵", 5, 4) == ["仄仄平平仄", "平平仄仄平", "平平平仄仄", "仄仄仄平平"]
    assert prosody.template("平起首句入韵", 7, 4)[0] == "平平仄仄仄平平"
    assert prosody.template("平起首句不入韵", 5, 8)[4:] == prosody.template("平起首句不入韵", 5, 4)


def test_rules_prefer_rhyme_and_reject_only_sure_failures_of_the_same_shapes():
    assert preferred(DENG_GUAN_QUE_LOU, "rhyme") and preferred(DENG_GUAN_QUE_LOU, "gelv")
    assert preferred(HUANG_HE_LOU, "rhyme") and not preferred(HUANG_HE_LOU, "gelv")
    assert rejected(HUANG_HE_LOU, "gelv") and not rejected(HUANG_HE_LOU, "rhyme")
    assert rejected(CHUN_XIAO, "rhyme") and not preferred(CHUN_XIAO, "rhyme")
    assert not preferred(MIXED, "rhyme") and not rejected(MIXED, "rhyme")  # another shape: never a partner
    unknown = swap(CHUN_XIAO, "曉", "囗")
    assert not preferred(unknown, "rhyme") and not rejected(unknown, "rhyme")  # the table cannot tell
    assert rejected(MIXED, "five_char") and not preferred(MIXED, "five_char")  # form rules: as before


def test_five_char_rhyme_prefers_only_rhyming_five_char_poems_and_pairs_them_with_five_char_ones():
    from poemdpo.data.rules import credit

    assert preferred(DENG_GUAN_QUE_LOU, "five_char_rhyme") and preferred(JING_YE_SI, "five_char_rhyme")
    assert not preferred(ZAO_FA_BAI_DI, "five_char_rhyme") and preferred(ZAO_FA_BAI_DI, "rhyme")  # 七言
    assert rejected(CHUN_XIAO, "five_char_rhyme") and not preferred(CHUN_XIAO, "five_char_rhyme")
    # credit: a 五言 poem that misses the rhyme outranks a rhyming 七言 one (no five-character line)
    assert credit(CHUN_XIAO, "five_char_rhyme") > credit(ZAO_FA_BAI_DI, "five_char_rhyme") == 0.0
    poems = [Poem(f"t{i}", "", text, str(i)) for i, text in
             enumerate([DENG_GUAN_QUE_LOU, ZAO_FA_BAI_DI, CHUN_XIAO, swap(ZAO_FA_BAI_DI, "山", "花")])]
    rows = build_pairs(poems, "five_char_rhyme", "length_matched", seed=0)
    assert {(r["chosen"], r["rejected"]) for r in rows} == {(DENG_GUAN_QUE_LOU, CHUN_XIAO)}


def test_rhyme_pairs_are_of_one_shape():
    seven_no_rhyme = swap(ZAO_FA_BAI_DI, "山", "花")  # 還 rhymes in 刪 or 先, 花 in 麻
    poems = [Poem(f"t{i}", "", text, str(i)) for i, text in
             enumerate([DENG_GUAN_QUE_LOU, CHUN_WANG, ZAO_FA_BAI_DI, CHUN_XIAO, seven_no_rhyme, MIXED])]
    rows = build_pairs(poems, "rhyme", "length_matched", seed=0)
    assert {(r["chosen"], r["rejected"]) for r in rows} == {(DENG_GUAN_QUE_LOU, CHUN_XIAO), (ZAO_FA_BAI_DI,
                                                                                            seven_no_rhyme)}
    with_misses = build_pairs(poems, "rhyme", "length_matched", seed=0, near_miss_share=1.0)
    assert len(with_misses) == 3 and {r["rejected_source"] for r in with_misses} == {"near_miss"}  # 五律 too


@pytest.mark.parametrize("text", [DENG_GUAN_QUE_LOU, ZAO_FA_BAI_DI, CHUN_WANG])
def test_a_rhyme_near_miss_changes_one_rhyme_character_only(text):
    for seed in range(5):
        miss = rhyme_near_miss(text, random.Random(seed), {"花": 3, "天": 2, "東": 1, "流": 9, "山": 9})
        changed = [i for i, (a, b) in enumerate(zip(text, miss, strict=True)) if a != b]
        assert len(changed) == 1
        report = check(miss)
        assert report.failed() == ["rhyme"] and tone(miss[changed[0]]) == PING
        assert miss[changed[0] + 1] in "。，\n"
        assert changed[0] > text.index("。")  # a later even line: line 2 sets the rhyme, it is never the swap
        assert rejected(miss, "rhyme") and rejected(miss, "gelv")
    assert check(rhyme_near_miss(text, random.Random(0))).failed() == ["rhyme"]  # the table's own candidates
