"""generate_poems: batched sampling with left padding, seeded, completion only, state restored.

Also home of the tiny tokenizer/model helpers the other evaluation tests import.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import make_corpus_poems
from poemdpo.data.forms import classify, is_well_formed
from poemdpo.data.prompts import build_prompt
from poemdpo.evaluation.metrics import counts_for_rule
from poemdpo.models import generation
from poemdpo.models.generation import (
    PLAIN_SAMPLING,
    decode_poem,
    generate_dropping_finished,
    generate_poems,
    generate_samples,
    inverse_cdf_sample,
    plain_sampling,
    prompt_texts,
    sample_dropping_finished,
    token_sampler,
)
from poemdpo.models.tokenizer import train_char_tokenizer

TITLES = ["無題1", "秋夜長思故鄉", "月", "送君", "山中"]


def tiny_tokenizer():
    texts = ["\n".join(p["paragraphs"]) + p["title"] for p in make_corpus_poems()]
    return train_char_tokenizer(texts, min_frequency=1)


def tiny_lm(tokenizer, seed: int = 0, tie: bool = True) -> LlamaForCausalLM:
    """A random tiny Llama. Tied, its greedy choice just repeats the last token (the residual stream
    still holds that token's embedding); untied (`tie=False`) it writes varied characters."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_lm(tok)


def test_one_completion_per_title_without_prompt_or_eos(tok, model):
    poems = generate_poems(model, tok, TITLES, max_new_tokens=20, batch_size=2)
    assert len(poems) == len(TITLES)
    for title, poem in zip(TITLES, poems, strict=True):
        assert isinstance(poem, str) and poem
        assert build_prompt(title) not in poem and tok.eos_token not in poem
        assert len(tok(poem, add_special_tokens=False)["input_ids"]) <= 20  # at most the tokens it was given
    assert generate_poems(model, tok, []) == []


def test_deterministic_for_a_seed_and_leaves_global_rng_alone(tok, model):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = generate_poems(model, tok, TITLES, max_new_tokens=16, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    assert generate_poems(model, tok, TITLES, max_new_tokens=16, seed=7) == first
    assert generate_poems(model, tok, TITLES, max_new_tokens=16, seed=8) != first


def test_left_padding_gives_the_same_greedy_text_as_one_by_one(tok):
    model = tiny_lm(tok, tie=False)
    # Titles of different lengths, so the batched prompts really are padded.
    batched = generate_poems(model, tok, TITLES, max_new_tokens=15, batch_size=len(TITLES), do_sample=False)
    single = generate_poems(model, tok, TITLES, max_new_tokens=15, batch_size=1, do_sample=False)
    assert all(len(poem) >= 10 for poem in single)  # real text, not specials stripped to nothing
    assert batched == single


def test_the_static_cache_samples_the_same_poems_as_the_dynamic_one(tok):
    """The static KV cache is a speed setting: greedy text and seeded samples match transformers' default cache."""
    model = tiny_lm(tok, tie=False)
    for do_sample in (False, True):
        static, dynamic = (generate_poems(model, tok, TITLES * 3, max_new_tokens=24, batch_size=len(TITLES) * 3,
                                          do_sample=do_sample, seed=3, cache_implementation=cache,
                                          drop_finished=False)
                           for cache in ("static", None))
        assert all(len(poem) >= 5 for poem in static)  # real text, not an early eos
        assert static == dynamic


def early_ending_lm(tok) -> LlamaForCausalLM:
    """An untied tiny Llama that also ends a poem at a common character, so poems of one batch end at different
    steps (a random model seldom writes eos itself)."""
    model = tiny_lm(tok, tie=False)
    markers = set(tok.all_special_ids) - {tok.unk_token_id}  # written into a poem, they stay: not a character
    probe = [set(tok(s.text, add_special_tokens=False)["input_ids"]) - markers
             for s in generate_samples(model, tok, TITLES, max_new_tokens=24, do_sample=False)]
    # A character some poems write and others do not: they end at it, the others run to the length limit.
    some = min(set().union(*probe), key=lambda t: (abs(sum(t in p for p in probe) - len(probe) / 2), t))
    model.generation_config.eos_token_id = [tok.eos_token_id, some]
    return model


def test_dropping_finished_poems_from_the_batch_writes_what_generate_writes(tok, monkeypatch):
    """sample_dropping_finished cuts finished poems out of the batch and its KV cache: greedy, the poems and their
    finished flags are generate's, for a batch of distinct titles whose poems end at different steps, with the
    batch cut while poems are still being written; sampled with top_k=1 too (the warpers are applied)."""
    model = early_ending_lm(tok)
    titles = [a + b for a in TITLES for b in TITLES]  # 25 distinct prompts: a row kept by mistake would show
    cuts = []
    keep_rows = generation._keep_rows
    monkeypatch.setattr(generation, "_keep_rows", lambda cache, keep: cuts.append(len(keep)) or keep_rows(cache, keep))
    kept = generate_samples(model, tok, titles, max_new_tokens=24, batch_size=len(titles), do_sample=False,
                            drop_finished=False)
    dropped = generate_samples(model, tok, titles, max_new_tokens=24, batch_size=len(titles), do_sample=False,
                               drop_finished=True)
    assert len({len(s.text) for s in kept if s.finished}) >= 2 and not all(s.finished for s in kept)
    assert cuts and min(cuts) < len(titles)  # the batch was cut, and decoding went on after it
    assert dropped == kept
    top1 = generate_samples(model, tok, titles, max_new_tokens=24, batch_size=len(titles), top_k=1, seed=5,
                            drop_finished=True)
    assert top1 == kept
    # A cache that starts 3 positions past the prompts and grows 3 at a time (cut in between) writes the same.
    grown = generate_samples(model, tok, titles, max_new_tokens=24, batch_size=len(titles), do_sample=False,
                             drop_finished=True, cache_chunk=3)
    assert grown == kept


def test_generate_dropping_finished_returns_what_generate_returns_and_falls_back_otherwise(tok, monkeypatch):
    """The call TRL's RL trainers make, model.generate(input_ids, attention_mask, generation_config): greedy, the
    same tensor (prompts, new tokens, pad after eos) through sample_dropping_finished; with a setting it does not
    reproduce (a repetition penalty), generate itself; and the model's own generate afterwards."""
    from transformers import GenerationConfig

    model = early_ending_lm(tok)
    titles = [a + b for a in TITLES for b in TITLES]
    batch = tok([build_prompt(t) for t in titles], return_tensors="pt", padding=True, padding_side="left")
    config = GenerationConfig(max_new_tokens=24, do_sample=False, eos_token_id=model.generation_config.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    expected = model.generate(**batch, generation_config=config)
    calls = []
    dropping = generation.sample_dropping_finished
    monkeypatch.setattr(generation, "sample_dropping_finished", lambda *a, **k: calls.append(1) or dropping(*a, **k))
    with generate_dropping_finished(model):
        assert torch.equal(model.generate(**batch, generation_config=config), expected) and calls == [1]
        penalised = GenerationConfig(**config.to_dict() | {"repetition_penalty": 1.3})
        assert generation.samples_like_generate(model, config)
        assert not generation.samples_like_generate(model, penalised)
        model.generate(**batch, generation_config=penalised)
    assert calls == [1] and "generate" not in vars(model)
    assert torch.equal(model.generate(**batch, generation_config=config), expected)


def test_dropping_finished_gives_each_poem_the_room_its_own_prompt_leaves(tok):
    """Batched with a long title, a short title's poem still runs to the context: positions are per row."""
    model = tiny_lm(tok, tie=False)
    titles = ["月", "長" * 8]
    batch = tok([build_prompt(t) for t in titles], return_tensors="pt", padding=True, padding_side="left")
    widths = batch["attention_mask"].sum(-1).tolist()
    context = max(widths) + 6
    poems = sample_dropping_finished(model, batch["input_ids"], batch["attention_mask"], 200, {tok.eos_token_id},
                                     context=context, do_sample=False, cache_chunk=4)
    assert not any(tok.eos_token_id in p for p in poems)  # both run on: each stops at its own limit
    assert [len(p) for p in poems] == [context - w for w in widths]
    assert len(poems[0]) > len(poems[1]) == 6


def test_dropping_finished_poems_samples_the_models_probabilities(tok):
    """The first token of 3,000 copies of one prompt at temperature 0.5, drawn by sample_dropping_finished: each
    token's share is softmax(logits / 0.5), within 5 standard errors."""
    model = tiny_lm(tok, tie=False)
    ids = tok(build_prompt(TITLES[1]), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        p = torch.softmax(model(ids).logits[0, -1].double() / 0.5, dim=-1)
    n = 3000
    torch.manual_seed(0)
    with token_sampler("inverse_cdf"):
        drawn = sample_dropping_finished(model, ids.expand(n, -1), torch.ones(n, ids.shape[1], dtype=torch.long), 1,
                                         {tok.eos_token_id}, temperature=0.5)
    share = torch.bincount(torch.tensor([row[0] for row in drawn]), minlength=len(p)).double() / n
    assert torch.all((share - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-9)


def test_inverse_cdf_draws_each_token_with_its_probability_and_never_a_zero_one():
    """Unnormalised weights with zeros, across block edges and in the short last block (vocabulary 13, blocks of
    4): every token's share of 200,000 draws is its probability, within 5 standard errors."""
    weights = torch.tensor([0.0, 2.0, 0.0, 0.0, 1.0, 3.0, 0.5, 0.0, 0.0, 0.0, 1.5, 2.0, 0.0])
    n = 200_000
    torch.manual_seed(0)
    drawn = inverse_cdf_sample(weights.expand(n, -1), block=4)
    assert drawn.shape == (n, 1) and drawn.dtype == torch.long
    share = torch.bincount(drawn.squeeze(1), minlength=len(weights)).double() / n
    p = weights.double() / weights.sum()
    assert torch.all(share[p == 0] == 0)
    assert torch.all((share - p).abs() <= 5 * (p * (1 - p) / n).sqrt())
    # One certain token, at the very end of the row, and a row of zeros is an error (as torch.multinomial's).
    last = torch.zeros(3, 13)
    last[:, -1] = 1.0
    assert inverse_cdf_sample(last, block=4).squeeze(1).tolist() == [12, 12, 12]
    with pytest.raises(RuntimeError, match="sums to 0"):
        inverse_cdf_sample(torch.zeros(2, 13))


def test_token_sampler_takes_only_the_one_draw_per_row_calls_and_always_restores_torch():
    probs = torch.softmax(torch.randn(6, 50), dim=-1)
    original = torch.multinomial
    with token_sampler("inverse_cdf"):
        assert torch.multinomial is not original
        torch.manual_seed(1)
        patched = torch.multinomial(probs, num_samples=1)
        torch.manual_seed(1)
        assert torch.equal(patched, inverse_cdf_sample(probs))
        assert torch.multinomial(probs, num_samples=3).shape == (6, 3)  # several draws: torch's own
    assert torch.multinomial is original
    with pytest.raises(KeyError), token_sampler("inverse_cdf"):
        raise KeyError("an error inside generate")
    assert torch.multinomial is original
    with token_sampler("multinomial"):
        assert torch.multinomial is original
    with pytest.raises(ValueError, match="sampler must be one of"), token_sampler("gumbel"):
        pass


def test_generate_draws_from_the_models_probabilities_with_either_sampler(tok):
    """The sampler changes how `generate` draws, not from what: over 3,000 draws of one prompt's first token, each
    token's share is the model's probability for it, within 5 standard errors, for either sampler."""
    model = tiny_lm(tok, tie=False)
    ids = tok(build_prompt(TITLES[1]), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        p = torch.softmax(model(ids).logits[0, -1].double(), dim=-1)
    n = 3000
    for sampler in ("inverse_cdf", "multinomial"):
        torch.manual_seed(0)
        with token_sampler(sampler):
            drawn = model.generate(ids.expand(n, -1), do_sample=True, max_new_tokens=1, top_k=0, top_p=1.0,
                                   pad_token_id=tok.pad_token_id)[:, -1]
        share = torch.bincount(drawn, minlength=len(p)).double() / n
        assert torch.all((share - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-9), sampler


def test_generate_poems_draws_with_the_sampler_it_is_given(tok, model, monkeypatch):
    calls = []
    spy = generation.inverse_cdf_sample
    monkeypatch.setattr(generation, "inverse_cdf_sample", lambda probs: calls.append(len(probs)) or spy(probs))
    generate_poems(model, tok, TITLES, max_new_tokens=4, batch_size=5, sampler="multinomial")
    assert calls == []
    generate_poems(model, tok, TITLES, max_new_tokens=4, batch_size=5)  # the default
    assert calls and set(calls) == {5}


def test_plain_sampling_pins_only_what_the_model_sets_otherwise_and_the_poems_stay_the_same(tok, monkeypatch):
    model = tiny_lm(tok, tie=False)
    assert plain_sampling(model, 0.7) == {"temperature": 0.7, "top_k": 0, "top_p": 1.0}
    # (generate's path; the default, sample_dropping_finished, applies only temperature, top_k and top_p)
    leaner = generate_poems(model, tok, TITLES * 2, max_new_tokens=24, seed=5, drop_finished=False)
    # Every setting passed at its neutral value, as before: the same poems, only slower.
    monkeypatch.setattr(generation, "plain_sampling", lambda m, t, k, p: {**PLAIN_SAMPLING, "temperature": t,
                                                                         "top_k": k, "top_p": p})
    assert generate_poems(model, tok, TITLES * 2, max_new_tokens=24, seed=5, drop_finished=False) == leaner
    # A Hub chat model's own settings are still overridden.
    model.generation_config.update(repetition_penalty=1.1, min_p=0.05, top_k=20)
    assert plain_sampling(model) == {"repetition_penalty": 1.0, "min_p": 0.0, "temperature": 1.0, "top_k": 0,
                                     "top_p": 1.0}


def test_restores_train_mode_and_padding_side(tok, model):
    model.train()
    tok.padding_side = "right"
    generate_poems(model, tok, TITLES[:2], max_new_tokens=5)
    assert model.training and tok.padding_side == "right"
    model.eval()
    generate_poems(model, tok, TITLES[:2], max_new_tokens=5)
    assert not model.training


class ScriptedLM(torch.nn.Module):
    """Stands in for a model: `generate` appends a fixed continuation, so the cut at eos can be checked (on
    generate's path: `drop_finished=False`)."""

    def __init__(self, continuation: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuation = continuation
        self.seen_kwargs: dict = {}

    def generate(self, input_ids, attention_mask, **kwargs):
        self.seen_kwargs = kwargs
        tail = torch.tensor(self.continuation).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


def test_cuts_at_the_first_eos_and_keeps_what_the_model_wrote(tok):
    """A prompt marker the model wrote stays in the poem, so its text re-encodes to the ids sampled (what the KL
    estimate scores); what follows the eos (another poem, padding) does not."""
    ids = tok.convert_tokens_to_ids
    written = [ids("山"), ids("<RES>"), ids("水")]
    fake = ScriptedLM([*written, tok.eos_token_id, ids("月"), tok.pad_token_id])
    assert generate_poems(fake, tok, ["月", "送君"], drop_finished=False) == ["山<RES>水", "山<RES>水"]
    assert tok("山<RES>水", add_special_tokens=False)["input_ids"] == written
    assert fake.seen_kwargs["top_k"] == 0 and fake.seen_kwargs["temperature"] == 1.0
    generate_poems(fake, tok, ["月"], do_sample=False, drop_finished=False)
    assert "temperature" not in fake.seen_kwargs and fake.seen_kwargs["do_sample"] is False


class ContextLM(ScriptedLM):
    """A scripted model with a context length; records each batch's width and length limit."""

    def __init__(self, continuation: list[int], context: int, max_new_tokens: int = 200):
        super().__init__(continuation)
        self.config = SimpleNamespace(max_position_embeddings=context)
        self.generation_config = SimpleNamespace(max_new_tokens=max_new_tokens)
        self.calls: list[tuple[int, int]] = []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append((input_ids.shape[1], kwargs["max_new_tokens"]))
        return super().generate(input_ids, attention_mask, **kwargs)


def test_poems_fit_the_context_and_a_long_title_shortens_only_its_own_batch(tok):
    titles = ["月", "長" * 40, "送君", "山中"]
    width = {t: len(tok(build_prompt(t))["input_ids"]) for t in titles}
    fake = ContextLM([tok.eos_token_id], context=width["長" * 40] + 10)
    assert generate_poems(fake, tok, titles, batch_size=2, drop_finished=False) == [""] * 4
    # Batched by prompt length: 月 with 送君, 山中 with the long title, which alone gets the short limit.
    assert sorted(fake.calls) == sorted(
        [(width["送君"], min(200, fake.config.max_position_embeddings - width["送君"])), (width["長" * 40], 10)]
    )
    # Without a context, the generation config's limit; an explicit limit wins.
    fake = ContextLM([tok.eos_token_id], context=10_000, max_new_tokens=77)
    generate_poems(fake, tok, ["月"], drop_finished=False)
    generate_poems(fake, tok, ["月"], max_new_tokens=5, drop_finished=False)
    assert [limit for _, limit in fake.calls] == [77, 5]


def test_a_prompt_that_fills_the_context_is_a_clear_error(tok):
    long_title = "長" * 40
    fake = ContextLM([tok.eos_token_id], context=len(tok(build_prompt(long_title))["input_ids"]))
    with pytest.raises(ValueError, match=f"{long_title}.*no room.*max_position_embeddings="):
        generate_poems(fake, tok, ["月", long_title], batch_size=1, drop_finished=False)
    assert fake.calls == []  # refused before sampling any batch


def test_an_unknown_token_keeps_its_place_in_the_line(tok):
    """A rare character the vocabulary lacks is still a character of the line: 5 tokens, 5 characters."""
    ids = tok.convert_tokens_to_ids
    line = [ids("山"), tok.unk_token_id, ids("水"), ids("風"), ids("月"), ids("。")]
    assert generate_poems(ScriptedLM([*line, tok.eos_token_id]), tok, ["月"], drop_finished=False) == ["山□水風月。"]
    assert decode_poem(tok, [tok.unk_token_id, ids("<RES>"), tok.unk_token_id]) == "□<RES>□"


def test_a_line_with_a_prompt_marker_in_it_is_no_verse_line(tok):
    """<RES> is five characters long: written on a line of its own, the old decoding dropped it, and counted as
    text it would make a 五言 line. Neither: the poem has no meter and no rule counts it."""
    ids = tok.convert_tokens_to_ids
    line = [ids(c) for c in "山水風月光"]
    poem = [*line, ids("，"), ids("<RES>"), ids("。"), tok.eos_token_id]
    (sample,) = generate_samples(ScriptedLM(poem), tok, ["月"], drop_finished=False)
    assert sample.text == "山水風月光，<RES>。" and sample.finished
    assert classify(sample.text).line_lengths == (5, 0)
    assert not counts_for_rule(sample.text, True, "five_char")
    assert not is_well_formed("<RES>山水，<INP>。")  # two lines of length 0 are not two lines of one length
    assert counts_for_rule("山水風月光，山水風月光。", True, "five_char")


def test_chat_template_is_used_when_the_tokenizer_has_one(tok, model):
    assert prompt_texts(tok, ["月"]) == [build_prompt("月")]
    chat_tok = tiny_tokenizer()
    chat_tok.chat_template = "{% for m in messages %}<INS>{{ m['content'] }}{% endfor %}<RES>"
    (prompt,) = prompt_texts(chat_tok, ["月"])
    assert prompt.startswith("<INS>") and prompt.endswith("月<RES>")
    assert len(generate_poems(model, chat_tok, ["月", "送君"], max_new_tokens=5)) == 2


def test_works_on_a_peft_model(tok):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_lm(tok), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    poems = generate_poems(peft_model, tok, TITLES[:3], max_new_tokens=8)
    assert len(poems) == 3 and all(isinstance(p, str) for p in poems)
