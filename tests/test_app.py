"""app.py: the page's functions on tiny models, and the running page through gradio_client on 127.0.0.1."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client
from test_generation import tiny_lm, tiny_tokenizer

import app as app_script
import build_dataset
from poemdpo import app
from poemdpo.data.rules import preferred
from poemdpo.data.splits import SplitSpec, split_of
from poemdpo.errors import PoemDPOError

# Gradio's queue calls pandas options that pandas 3 deprecates; not this project's to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")

SPRING_RAIN = "好雨知時節，當春乃發生。\n隨風潛入夜，潤物細無聲。\n野徑雲俱黑，江船火獨明。\n曉看紅濕處，花重錦官城。"
TITLES = ["無題1", "秋夜長思故鄉", "月", "送君", "山中", "春夜喜雨"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Two saved tiny char-level Llamas (untied, so they write varied characters), short poems."""
    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer()
    dirs = {}
    for seed, name in ((0, "aligned"), (1, "reference")):
        model = tiny_lm(tok, seed=seed, tie=False)
        model.generation_config.max_new_tokens = 24
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def loaded(model_dirs) -> dict[str, app.LoadedModel]:
    return {name: app.load_model(str(path), name, "cpu") for name, path in model_dirs.items()}


# --- paths, titles, annotations -----------------------------------------------------------------


def test_missing_directories_name_the_command_that_makes_them(tmp_path, capsys):
    assert app.make_command("data/dpo_grpo_five_char", "aligned") == "python -m poemdpo.pipeline"
    assert app.make_command("data/dpo_seven_char", "aligned") == \
        "python -m poemdpo.pipeline --method dpo --rule seven_char"
    assert app.make_command("data/grpo_five_char", "aligned") == "python -m poemdpo.pipeline --method grpo"
    assert app.make_command("data/base_model", "reference").startswith("python -m poemdpo.pipeline")
    missing = tmp_path / "dpo_run"
    with pytest.raises(PoemDPOError, match=r"the aligned model directory .*dpo_run' does not exist; make it with: "
                                           r"python train_dpo.py"):
        app.check_model_path(str(missing), "aligned")
    missing.mkdir()
    with pytest.raises(PoemDPOError, match="holds no config.json"):
        app.check_model_path(str(missing), "aligned")
    # The script turns it into one line on stderr, before loading anything.
    with pytest.raises(SystemExit) as exit_info:
        app_script.run(["--model", str(tmp_path / "nowhere"), "--reference", str(tmp_path / "base")])
    assert str(exit_info.value).startswith("app.py: the aligned model directory")
    assert "make it with:" in str(exit_info.value)


def test_hub_ids_are_left_to_the_loader():
    app.check_model_path("Qwen/Qwen2.5-0.5B-Instruct", "reference")  # from_pretrained says if it can be had


def test_defaults_are_the_pipelines_outputs_and_localhost():
    args = app.AppArguments()
    assert (args.model, args.reference, args.rule) == ("data/dpo_grpo_five_char", "data/base_model", "five_char")
    assert (args.host, args.share) == ("127.0.0.1", False)


def test_builtin_titles_are_held_out_and_examples_start_with_spring_rain():
    assert all(split_of(t) == "test" for t in app.BUILTIN_TEST_TITLES)
    examples = app.example_titles(app.BUILTIN_TEST_TITLES)
    assert examples[0] == "春夜喜雨" and len(examples) == app.NUM_EXAMPLES
    assert set(examples[1:]) <= set(app.BUILTIN_TEST_TITLES)
    assert app.sample_titles(TITLES, 3, seed=1) == app.sample_titles(TITLES, 3, seed=1)
    assert len(set(app.sample_titles(TITLES, 3, seed=1))) == 3 and len(app.sample_titles(TITLES, 99, 0)) == 6


def test_held_out_titles_from_pairs_then_corpus_then_builtin(tmp_path, corpus_dir):
    pairs = tmp_path / "pairs"
    build_dataset.main(["--corpus", str(corpus_dir), "--output_dir", str(pairs), "--test_size", "0.2"])
    titles, source = app.held_out_titles(pairs, corpus_dir)
    assert titles and str(pairs) in source and titles == sorted(set(titles))
    assert all(split_of(t, SplitSpec(test_size=0.2)) == "test" for t in titles)
    titles, source = app.held_out_titles(tmp_path / "no_pairs", corpus_dir)
    assert titles and "corpus" in source and all(split_of(t) == "test" for t in titles)
    assert app.held_out_titles(tmp_path / "no_pairs", tmp_path / "no_corpus") == (
        list(app.BUILTIN_TEST_TITLES), "a built-in list of held-out titles")


def test_annotation_form_verdict_and_html():
    item = app.annotate(SPRING_RAIN, "five_char")
    assert item["form"] == "五言律诗" and item["preferred"] is True
    assert app.annotate(SPRING_RAIN, "seven_char")["preferred"] is False
    assert app.form_label("白日依山盡，黃河入海流。") == "五言 · 2 lines"
    assert app.form_label("") == "empty"
    page = app.poems_html("aligned · <m>", [item, app.annotate("", "five_char")])
    assert "&lt;m&gt;" in page and "✓ five_char" in page and "✗ five_char" in page
    assert page.count('class="poem"') == 2 and "(an empty poem)" in page


def test_tones_over_every_character_and_rhymes_marked():
    item = app.annotate(SPRING_RAIN, "five_char")
    assert item["prosody"] == "合律 · 仄起首句不入韵"
    chars = "".join(c for row in item["tones"] for c, _, _ in row)
    assert len(item["tones"]) == 4 and chars == SPRING_RAIN.replace("\n", "")
    assert [c for row in item["tones"] for c, _, rhyme in row if rhyme] == list("生聲明城")
    first = item["tones"][0]
    assert [t for _, t, _ in first] == ["仄", "仄", "平", "平", "仄", None, "○", "平", "仄", "仄", "平", None]
    page = app.poems_html("m", [item])
    assert "<ruby>好<rt>仄</rt></ruby>" in page and '<ruby><span class="rhyme">生</span><rt>平</rt></ruby>' in page
    assert "，" in page and "合律 · 仄起首句不入韵" in page
    # A 七言 couplet is not a shape the checks are written for: tones, but no 格律 verdict and no rhymes.
    loose = app.annotate("君不見黃河之水天上來，奔流到海不復回。", "five_char")
    assert loose["prosody"] is None and not any(r for row in loose["tones"] for _, _, r in row)
    repeated = "好雨知時節，當春乃發生。\n隨風潛入夜，潤物細無聲。\n" * 2
    assert app.annotate(repeated, "five_char")["prosody"].startswith("不合律: ")


def test_report_tab_reads_markdown_and_plots(tmp_path):
    before, images, after = app.read_report(str(tmp_path))
    assert "No evaluation report" in before and images == [] and after == ""
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.md").write_text(
        "# Evaluation report\n\n## Plots\n\n![form](form_distribution.png)\n![r](training_rewards.png)\n\n"
        "## Sample poems\n| a |\n", encoding="utf-8")
    for name in ("training_rewards.png", "form_distribution.png"):
        (tmp_path / "eval" / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    before, images, after = app.read_report(str(tmp_path))
    assert before.startswith("# Evaluation report") and before.rstrip().endswith("## Plots")
    assert images == [str(tmp_path / "eval" / n) for n in ("form_distribution.png", "training_rewards.png")]
    assert "![" not in before + after and after.strip() == "## Sample poems\n| a |"


# --- sampling ------------------------------------------------------------------------------------


def test_write_poems_same_seed_for_both_models(loaded, model_dirs):
    result = app.write_poems(loaded["aligned"], loaded["reference"], " 春夜喜雨 ", seed=3, num_poems=3)
    assert set(result) == {"aligned", "reference"}
    for items in result.values():
        assert len(items) == 3
        for item in items:
            assert item["form"] == app.form_label(item["poem"])
            assert item["preferred"] == preferred(item["poem"], "five_char")
            assert len(item["tones"]) == len(item["poem"].splitlines())
    again = app.write_poems(loaded["aligned"], loaded["reference"], "春夜喜雨", seed=3, num_poems=3)
    assert again == result
    # The same model as both sides: the same seed gives the same poems on both sides.
    twin = app.load_model(str(model_dirs["aligned"]), "reference", "cpu")
    same = app.write_poems(loaded["aligned"], twin, "春夜喜雨", seed=5, num_poems=2)
    assert [i["poem"] for i in same["aligned"]] == [i["poem"] for i in same["reference"]]
    greedy = app.write_poems(loaded["aligned"], twin, "春夜喜雨", temperature=0, num_poems=2)
    assert greedy["aligned"][0]["poem"] == greedy["aligned"][1]["poem"]


def test_write_poems_refuses_bad_input(loaded):
    with pytest.raises(PoemDPOError, match="type a title"):
        app.write_poems(loaded["aligned"], loaded["reference"], "  ")
    with pytest.raises(PoemDPOError, match="temperature"):
        app.write_poems(loaded["aligned"], loaded["reference"], "月", temperature=-1)
    with pytest.raises(PoemDPOError, match="leaving no room"):
        app.write_poems(loaded["aligned"], loaded["reference"], "月" * 300)


def test_compare_on_titles_rates_with_intervals(loaded):
    result = app.compare_on_titles(loaded["aligned"], loaded["reference"], TITLES, seed=1, rule="five_char")
    assert len(result["rows"]) == len(TITLES)
    for name, column in (("aligned", 1), ("reference", 4)):
        r = result["rates"][name]
        poems = [row[column] for row in result["rows"]]
        assert r["n"] == len(TITLES) and r["preferred"] == sum(preferred(p, "five_char") for p in poems)
        assert 0 <= r["ci95"][0] <= r["rate"] <= r["ci95"][1] <= 1
        assert [row[column + 1] for row in result["rows"]] == [app.form_label(p) for p in poems]
    table = app.rates_markdown(result, {"aligned": "a", "reference": "r"})
    assert "| aligned (`a`) |" in table and "95% interval" in table


# --- the running page ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(loaded):
    demo = app.build_app(loaded["aligned"], loaded["reference"], test_titles=TITLES, titles_source="a test list")
    _, url, _ = app.launch(demo, port=None, prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()


def test_served_on_localhost_through_gradio_client(served, loaded):
    assert served.startswith("http://127.0.0.1:")
    client = Client(served, verbose=False)
    aligned_html, reference_html = client.predict("春夜喜雨", 7, 1.0, 2, "five_char", api_name="/write")
    direct = app.write_poems(loaded["aligned"], loaded["reference"], "春夜喜雨", seed=7, num_poems=2)
    assert aligned_html == app.poems_html(f"aligned · {loaded['aligned'].name}", direct["aligned"])
    assert reference_html == app.poems_html(f"reference · {loaded['reference'].name}", direct["reference"])
    assert aligned_html.count('class="poem"') == 2 and "five_char" in aligned_html

    rates, table = client.predict(4, 0, 1.0, "seven_char", api_name="/compare")
    assert "Rule **seven_char**" in rates and rates.count(" / 4 |") == 2
    assert table["headers"][:2] == ["title", "aligned"] and len(table["data"]) == 4
    assert {row[0] for row in table["data"]} <= set(TITLES)

    with pytest.raises(Exception, match="type a title"):
        client.predict("", 0, 1.0, 1, "five_char", api_name="/write")


def test_served_page_loads_nothing_from_the_internet(served):
    def get(path: str) -> str:
        with urllib.request.urlopen(served.rstrip("/") + path, timeout=10) as response:
            return response.read().decode("utf-8")

    page, theme_css, config = get("/"), get("/theme.css"), json.loads(get("/config"))
    assert config["stylesheets"] == [] and "googleapis" not in page + theme_css
    assert "@import" not in theme_css and "Noto Sans CJK SC" in theme_css
    # Every script and stylesheet the page links is served by the app itself.
    linked = re.findall(r'<(?:script|link)[^>]*(?:src|href)="([^"]+)"', page)
    assert linked and all(not re.match(r"https?://", u) or u.startswith(served.rstrip("/")) for u in linked)


def test_a_chat_model_writes_through_its_chat_template(tmp_path, monkeypatch):
    tiny_models = pytest.importorskip("tiny_models")  # the Hub-family stand-ins (tests/tiny_models.py)
    chat = app.load_model(tiny_models.make_tiny_model(tmp_path / "qwen2", "qwen2"), "aligned", "cpu")
    assert chat.tokenizer.chat_template
    seen = []
    real = chat.tokenizer.apply_chat_template
    monkeypatch.setattr(chat.tokenizer, "apply_chat_template", lambda *a, **k: seen.append(a) or real(*a, **k))
    result = app.write_poems(chat, chat, "春夜喜雨", num_poems=2, max_new_tokens=12)
    assert seen and "春夜喜雨" in seen[0][0][-1]["content"]
    assert len(result["aligned"]) == 2 and result["aligned"] == result["reference"]
