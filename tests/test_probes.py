"""The rhyme probe tells a model that follows line 2's rhyme from one that ignores it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from poemdpo.data import prosody
from poemdpo.data.prompts import build_prompt
from poemdpo.evaluation.probes import embedding_neighbours_in_group, probe_cases, rhyme_probe
from poemdpo.models.tokenizer import train_char_tokenizer

POEMS = {  # rhyming 五绝: line 2 and line 4 end in one 平 group
    "靜夜思": "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。",
    "登鸛雀樓": "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。",
    "相思": "紅豆生南國，春來發幾枝。\n願君多採擷，此物最相思。",
}
NOT_PROBED = {"春曉": "春眠不覺曉，處處聞啼鳥。\n夜來風雨聲，花落知多少。"}  # rhymes on 仄
BACK = len("xxxxx，xxxxx。\n")  # line 2's rhyme character sits this far before line 4's


class CopyingModel(torch.nn.Module):
    """Puts all its mass on the character BACK positions before the slot (line 2's rhyme, whatever it is), or,
    with copy off, is uniform but for a small bias towards `favour`."""

    def __init__(self, vocab_size: int, copy: bool, favour: list[int] = ()):
        super().__init__()
        self.vocab_size, self.copy, self.favour = vocab_size, copy, list(favour)
        self.embed = torch.nn.Embedding(vocab_size, 32)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, **_):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[..., self.favour] = 1.0
        if self.copy:
            source = torch.roll(input_ids, BACK - 1, dims=1)  # position t reads token t - (BACK - 1)
            logits.scatter_(2, source.unsqueeze(-1), 50.0)
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def tokenizer():
    groups = "".join(prosody.group_characters(g) for g in prosody.level_groups_all())
    texts = [build_prompt(t) + p for t, p in {**POEMS, **NOT_PROBED}.items()] + [groups]
    return train_char_tokenizer(texts, min_frequency=1)


def test_cases_swap_line_two_into_another_group_and_skip_poems_that_do_not_rhyme():
    titles, poems = zip(*{**NOT_PROBED, **POEMS}.items(), strict=True)
    cases = probe_cases(titles, poems, n=10)
    assert [c.title for c in cases] == list(POEMS)
    for case, poem in zip(cases, POEMS.values(), strict=True):
        assert poem.startswith(case.intact) and poem[len(case.intact)] == case.true_char
        changed = [i for i, (a, b) in enumerate(zip(case.intact, case.swapped, strict=True)) if a != b]
        assert changed == [len(case.intact) - BACK]
        assert prosody.level_groups(case.swapped[changed[0]]) == {case.new_group} != {case.old_group}


@pytest.mark.parametrize("copy", [True, False])
def test_a_model_that_follows_line_two_shifts_and_a_blind_one_does_not(tokenizer, copy):
    model = CopyingModel(len(tokenizer), copy)
    result = rhyme_probe(model, tokenizer, list(POEMS), list(POEMS.values()), n=10)
    assert result.poems == len(POEMS)
    if copy:
        assert result.old_group_intact > 0.99 and result.new_group_swapped > 0.99 and result.shift > 0.99
    else:  # uniform: every group keeps its share whatever line 2 says, and no character beats another
        assert abs(result.shift) < 1e-6 and result.old_group_intact == pytest.approx(result.old_group_swapped)
        assert result.true_beats_random == 0.0


def test_true_rhyme_beats_random_counts_poems_where_the_model_favours_the_written_character(tokenizer):
    last = [poem[-2] for poem in POEMS.values()]  # 鄉 樓 思, before the final 。
    model = CopyingModel(len(tokenizer), copy=False, favour=tokenizer.convert_tokens_to_ids(last[:2]))
    result = rhyme_probe(model, tokenizer, list(POEMS), list(POEMS.values()), n=10)
    assert result.true_beats_random == pytest.approx(2 / 3)


def test_embedding_neighbours_are_in_group_when_the_embeddings_carry_the_group_and_by_chance_otherwise(tokenizer):
    model = CopyingModel(len(tokenizer), copy=False)
    torch.manual_seed(0)
    in_group, chance = embedding_neighbours_in_group(model, tokenizer)  # nn.Embedding's random init
    assert 0.0 < chance < 0.1 and in_group < chance + 0.05
    groups = prosody.level_groups_all()
    with torch.no_grad():
        for token, row in tokenizer.get_vocab().items():
            level = prosody.level_groups(token) if len(token) == 1 else ()
            if len(level) == 1 and len(prosody.rhyme_groups(token)) == 1:
                model.embed.weight[row] = 0.1 * model.embed.weight[row] + torch.eye(32)[groups.index(next(iter(level)))]
    in_group_after, _ = embedding_neighbours_in_group(model, tokenizer)
    assert len(groups) <= 32 and in_group_after > 0.95  # one direction per group
