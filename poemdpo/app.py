"""The side-by-side page: type a title, read the aligned and the reference model's poems next to each other.

    python app.py                                                   # data/dpo_grpo_five_char vs data/base_model
    python app.py --model data/dpo_seven_char --rule seven_char --port 7861
    python app.py --model you/aligned-qwen --reference Qwen/Qwen2.5-0.5B-Instruct   # Hub ids, when online

Three tabs: one title (both models sample with the same seed; each poem shows its form, the rule's verdict,
平/仄 over every character, its rhyme characters and the 格律 checks' verdict), N random held-out titles (each
model's rule rate with its 95% Wilson interval, and the poems), and the report `evaluate.py` wrote in
`<model>/eval`. The page loads nothing from the internet:
the theme uses system fonts (Gradio's stock themes link web fonts), and it serves on 127.0.0.1 unless told.
"""

from __future__ import annotations

import html
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch

from poemdpo.data import prosody
from poemdpo.data.corpus import DEFAULT_CORPUS
from poemdpo.data.forms import classify
from poemdpo.data.rules import RULES, preferred
from poemdpo.errors import PoemDPOError
from poemdpo.evaluation.metrics import wilson_interval
from poemdpo.models.generation import generate_poems
from poemdpo.models.loading import load_for_inference, looks_local
from poemdpo.pipeline import DEFAULT_METHOD, METHODS

DEFAULT_MODEL = "data/dpo_grpo_five_char"  # what `python -m poemdpo.pipeline` writes
DEFAULT_REFERENCE = "data/base_model"
DEFAULT_RULE = "five_char"
# The chapter's title: Du Fu's 春夜喜雨 (a training title; the examples after it are held out).
FIRST_TITLE = "春夜喜雨"
# Held-out (test split) titles of the shipped corpus, used when neither a preference dataset nor the corpus
# is at hand. tests/test_app.py checks that each is a test title.
BUILTIN_TEST_TITLES = ("寄遠", "夜到潤州", "北亭獨宿", "曉登迎春閣", "暮春早起", "嘉陵驛", "流水", "苦熱行",
                       "送喬琳", "三贈劉員外", "仲秋夜郡內西亭對月", "霽後登唐興寺水閣")
NUM_EXAMPLES = 5
# Theme fonts: names the browser resolves from the system, so nothing is fetched. CJK families first, so
# a title and a poem never fall back to boxes where a CJK font is installed (Debian: fonts-noto-cjk).
SANS = ["Noto Sans CJK SC", "Noto Sans CJK TC", "Source Han Sans SC", "PingFang SC", "Microsoft YaHei",
        "system-ui", "sans-serif"]
SERIF = ["Noto Serif CJK TC", "Noto Serif CJK SC", "Source Han Serif TC", "Songti TC", "SimSun", "serif"]
MONO = ["Noto Sans Mono CJK SC", "DejaVu Sans Mono", "monospace"]

CSS = """
.poems { display: flex; flex-direction: column; gap: 0.8rem; }
.poem { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 0.7rem 1rem; }
.poem .meta { font-size: 0.9rem; margin-bottom: 0.4rem; display: flex; gap: 0.6rem; flex-wrap: wrap; }
.poem .form { font-weight: 600; }
.poem .yes { color: #15803d; }
.poem .no { color: #b91c1c; }
.poem .text { font-family: SERIF_FONTS; font-size: 1.35rem; line-height: 2.1; letter-spacing: 0.08em; }
.poem .text ruby rt { font-size: 0.5em; color: #4b5563; letter-spacing: 0; }
.poem .text .rhyme { color: #b45309; font-weight: 700; }
.poem .empty { color: #6b7280; font-style: italic; }
.model-name { font-weight: 600; margin-bottom: 0.5rem; }
""".replace("SERIF_FONTS", ", ".join(f"'{f}'" if " " in f else f for f in SERIF))


@dataclass
class AppArguments:
    model: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "The aligned model: a saved model directory (model + tokenizer), or a Hub id when online. "
                          "The default is what `python -m poemdpo.pipeline` writes."},
    )
    reference: str = field(
        default=DEFAULT_REFERENCE,
        metadata={"help": "The reference model it is compared with (usually the model DPO started from): a "
                          "directory or a Hub id. The default is the pipeline's base model."},
    )
    rule: str = field(
        default=DEFAULT_RULE,
        metadata={"help": "The preference rule whose verdict each poem gets at first; the page can switch it.",
                  "choices": sorted(RULES)},
    )
    pairs: str | None = field(
        default=None,
        metadata={"help": "Preference dataset whose test split gives the held-out titles (default "
                          "data/pairs_<rule>); when it is missing, the corpus's test-split titles are used."},
    )
    corpus: str = field(
        default=str(DEFAULT_CORPUS),
        metadata={"help": "Corpus read for held-out titles when --pairs does not exist (chinese-poetry JSON)."},
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Longest poem in tokens (default: each model's generation config, else 128)."},
    )
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:1, ...; auto takes cuda when present."})
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "Address to serve on; 127.0.0.1 keeps the page on this machine (0.0.0.0 opens it to "
                          "the network)."},
    )
    port: int = field(default=7860, metadata={"help": "Port to serve on."})
    share: bool = field(
        default=False,
        metadata={"help": "Also publish the page through a public gradio.live link (needs the internet); off "
                          "unless you ask."},
    )


# --- models -------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    name: str  # the directory or Hub id it was loaded from
    model: torch.nn.Module
    tokenizer: object


def make_command(path: str, role: str) -> str:
    """The command that makes a missing model directory."""
    if role == "reference" and Path(path) == Path(DEFAULT_REFERENCE):
        return "python -m poemdpo.pipeline (it trains data/base_model first)"
    if role == "reference":
        return f"python train_base.py --output_dir {path}"
    for method in sorted(METHODS, key=len, reverse=True):  # dpo_grpo before dpo
        rule = Path(path).as_posix().removeprefix(f"data/{method}_")
        if rule in RULES and rule != Path(path).as_posix():  # the directory the pipeline writes for this method
            return ("python -m poemdpo.pipeline" + ("" if method == DEFAULT_METHOD else f" --method {method}")
                    + ("" if rule == DEFAULT_RULE else f" --rule {rule}"))
    return f"python train_dpo.py --config configs/dpo_tiny_cpu.yaml --output_dir {path}"


def check_model_path(path: str, role: str) -> None:
    """Stop with one sentence naming a missing model directory and the command that makes it."""
    if not looks_local(path):
        return  # a Hub id: from_pretrained says whether it can be had
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise PoemDPOError(f"the {role} model directory {path!r} does not exist; make it with: "
                           f"{make_command(path, role)}")
    if not any((directory / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise PoemDPOError(f"the {role} model directory {path!r} holds no config.json or adapter_config.json; "
                           f"make it with: {make_command(path, role)}")


def load_model(path: str, role: str = "aligned", device: str = "auto") -> LoadedModel:
    """A causal LM and its tokenizer from a directory or a Hub id, through the project's one loader (eval mode,
    fp32 on a CPU, bf16 on a GPU; a PEFT adapter loads onto its base)."""
    check_model_path(path, role)
    model, tokenizer = load_for_inference(path, device=None if device == "auto" else device,
                                          what=f"the {role} model")
    return LoadedModel(path, model, tokenizer)


# --- titles -------------------------------------------------------------------------------------


def pairs_test_titles(pairs_dir: str | Path) -> list[str]:
    """The test split's titles of a preference dataset directory, in code-point order: every held-out poem's
    title where the directory has the `poems` config, else the pairs' titles (as evaluate.py reads them)."""
    from datasets import load_dataset, load_from_disk

    path = Path(pairs_dir)
    if (path / "dataset_dict.json").is_file():  # a DatasetDict.save_to_disk directory
        return sorted(set(load_from_disk(str(path))["test"]["title"]))
    config = "poems" if (path / "poems").is_dir() else None
    return sorted(set(load_dataset(str(path), config, split="test")["title"]))


def corpus_test_titles(corpus: str | Path) -> list[str]:
    """Titles of the corpus whose split is `test` (the default SplitSpec), in code-point order."""
    from poemdpo.data.corpus import read_corpus
    from poemdpo.data.splits import SplitSpec, split_of

    poems, _ = read_corpus(corpus)
    spec = SplitSpec()
    return sorted({p.title for p in poems if split_of(p.title, spec) == "test"})


def held_out_titles(pairs_dir: str | Path | None, corpus: str | Path | None) -> tuple[list[str], str]:
    """(titles, where they came from): the dataset's test split, else the corpus's, else the built-in list."""
    if pairs_dir and Path(pairs_dir).is_dir():
        try:
            titles = pairs_test_titles(pairs_dir)
        except Exception:  # no dataset there after all (datasets raises many classes): go on
            titles = []
        if titles:
            return titles, f"the test split of {pairs_dir}"
    if corpus and Path(corpus).exists():
        try:
            titles = corpus_test_titles(corpus)
        except ValueError:  # an unreadable corpus: the page still works with the built-in titles
            titles = []
        if titles:
            return titles, f"the test split of the corpus {corpus}"
    return list(BUILTIN_TEST_TITLES), "a built-in list of held-out titles"


def example_titles(test_titles: Sequence[str], k: int = NUM_EXAMPLES) -> list[str]:
    """春夜喜雨, then `k - 1` held-out titles: the built-in ones that are among them, else short plain titles
    (no series number after a space) drawn with a fixed seed."""
    held_out = set(test_titles)
    picked = [t for t in BUILTIN_TEST_TITLES if t in held_out][: k - 1]
    plain = sorted(t for t in held_out if 3 <= len(t) <= 6 and " " not in t and t not in picked)
    picked += random.Random(0).sample(plain, min(k - 1 - len(picked), len(plain)))
    return [FIRST_TITLE, *[t for t in picked if t != FIRST_TITLE]]


def sample_titles(titles: Sequence[str], n: int, seed: int) -> list[str]:
    """`n` distinct titles drawn with `seed` (all of them, shuffled, when there are fewer)."""
    return random.Random(seed).sample(list(titles), min(int(n), len(titles)))


# --- poems and their annotations ----------------------------------------------------------------


def form_label(text: str) -> str:
    """五言/七言/杂言 with 绝句/律诗/排律, or the number of lines when the poem has none of those shapes."""
    form = classify(text)
    if form.n_lines == 0:
        return "empty"
    return form.label if form.shape != "其他" else f"{form.meter} · {form.n_lines} line{'s' * (form.n_lines != 1)}"


def prosody_marks(text: str) -> tuple[list[list[tuple[str, str | None, bool]]], str | None]:
    """Per line of the text, (character, its 平水韵 tone or None for punctuation, rhyme character?), and the
    verdict of the regulated-verse checks (None for a poem that is not 五言/七言 of 4 or 8 lines)."""
    report = prosody.check(text)
    verse = prosody.verse_lines(text)
    flat, tones = "".join(verse), "".join(report.tones)
    rhymes, end = set(), -1
    for i, line in enumerate(verse):
        end += len(line)
        if report.rhyme_group and (i % 2 == 1 or (i == 0 and report.rhyme_group in prosody.level_groups(line[-1]))):
            rhymes.add(end)
    marks, k = [], 0
    for line in text.splitlines():
        row = []
        for char in line:
            if k < len(flat) and char == flat[k]:
                row.append((char, tones[k], k in rhymes))
                k += 1
            else:
                row.append((char, None, False))
        marks.append(row)
    if not report.applicable:
        verdict = None
    elif report.helv:
        verdict = f"合律 · {report.pattern}"
    else:
        verdict = "不合律: " + "、".join(prosody.CHECKS[name] for name in report.failed())
    return marks, verdict


def annotate(text: str, rule: str) -> dict:
    """A poem with its form, the rule's verdict, and its tones, rhyme characters and 格律 verdict."""
    marks, verdict = prosody_marks(text)
    return {"poem": text, "form": form_label(text), "preferred": preferred(text, rule), "rule": rule,
            "tones": marks, "prosody": verdict}


def sample(model: LoadedModel, titles: Sequence[str], *, seed: int, temperature: float,
           max_new_tokens: int | None) -> list[str]:
    """One poem per title; temperature 0 means greedy decoding."""
    temperature = float(temperature)
    if temperature < 0:
        raise PoemDPOError(f"temperature must be 0 (greedy) or more, got {temperature}")
    try:
        return generate_poems(model.model, model.tokenizer, list(titles), seed=int(seed),
                              temperature=temperature or 1.0, do_sample=temperature > 0,
                              max_new_tokens=max_new_tokens, batch_size=16)
    except ValueError as e:  # e.g. a title that fills the model's context
        raise PoemDPOError(str(e)) from None


def write_poems(aligned: LoadedModel, reference: LoadedModel, title: str, *, seed: int = 0,
                temperature: float = 1.0, num_poems: int = 1, rule: str = DEFAULT_RULE,
                max_new_tokens: int | None = None) -> dict[str, list[dict]]:
    """`num_poems` poems for `title` from each model, both sampled with the same seed, annotated."""
    title = (title or "").strip()
    if not title:
        raise PoemDPOError("type a title first, for example 春夜喜雨")
    if int(num_poems) < 1:
        raise PoemDPOError(f"the number of poems must be at least 1, got {num_poems}")
    titles = [title] * int(num_poems)
    return {
        name: [annotate(p, rule) for p in sample(m, titles, seed=seed, temperature=temperature,
                                                 max_new_tokens=max_new_tokens)]
        for name, m in (("aligned", aligned), ("reference", reference))
    }


def compare_on_titles(aligned: LoadedModel, reference: LoadedModel, titles: Sequence[str], *, seed: int = 0,
                      temperature: float = 1.0, rule: str = DEFAULT_RULE,
                      max_new_tokens: int | None = None) -> dict:
    """One poem per title from each model: each model's rule rate with its 95% Wilson interval, and the rows."""
    if not titles:
        raise PoemDPOError("no titles to sample poems for")
    poems = {name: sample(m, titles, seed=seed, temperature=temperature, max_new_tokens=max_new_tokens)
             for name, m in (("aligned", aligned), ("reference", reference))}
    rates = {}
    for name, texts in poems.items():
        hits = sum(preferred(t, rule) for t in texts)
        low, high = wilson_interval(hits, len(texts))
        rates[name] = {"preferred": hits, "n": len(texts), "rate": hits / len(texts), "ci95": (low, high)}
    rows = [[title, a, form_label(a), "✓" if preferred(a, rule) else "✗",
             r, form_label(r), "✓" if preferred(r, rule) else "✗"]
            for title, a, r in zip(titles, poems["aligned"], poems["reference"], strict=True)]
    return {"rule": rule, "rates": rates, "rows": rows}


# --- rendering ----------------------------------------------------------------------------------


def _poem_text_html(item: dict) -> str:
    """The poem line by line; with tone marks, each character carries its 平/仄 above it (ruby) and the
    rhyme characters stand out."""
    if not item.get("tones"):
        return "<br>".join(html.escape(line) for line in item["poem"].splitlines())
    lines = []
    for line in item["tones"]:
        cells = []
        for char, tone, rhyme in line:
            glyph = f'<span class="rhyme">{html.escape(char)}</span>' if rhyme else html.escape(char)
            cells.append(glyph if tone is None else f"<ruby>{glyph}<rt>{html.escape(tone)}</rt></ruby>")
        lines.append("".join(cells))
    return "<br>".join(lines)


def poems_html(name: str, items: Sequence[dict]) -> str:
    """One model's column: its name, then each poem with its form, the rule's verdict and its 格律 verdict."""
    cards = []
    for item in items:
        verdict = (f'<span class="yes">✓ {html.escape(item["rule"])}</span>' if item["preferred"]
                   else f'<span class="no">✗ {html.escape(item["rule"])}</span>')
        if item.get("prosody"):
            css = "yes" if item["prosody"].startswith("合律") else "no"
            verdict += f'<span class="{css}">{html.escape(item["prosody"])}</span>'
        text = _poem_text_html(item) if item["poem"].strip() else '<span class="empty">(an empty poem)</span>'
        cards.append(f'<div class="poem"><div class="meta"><span class="form">{html.escape(item["form"])}</span>'
                     f'{verdict}</div><div class="text">{text}</div></div>')
    return f'<div class="model-name">{html.escape(name)}</div><div class="poems">{"".join(cards)}</div>'


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def rates_markdown(result: dict, names: dict[str, str]) -> str:
    lines = [f"Rule **{result['rule']}**, one poem per title, 95% Wilson intervals:", "",
             "| model | preferred | rate | 95% interval |", "|---|---|---|---|"]
    for key, r in result["rates"].items():
        low, high = r["ci95"]
        lines.append(f"| {key} (`{names[key]}`) | {r['preferred']} / {r['n']} | {_pct(r['rate'])} | "
                     f"[{_pct(low)}, {_pct(high)}] |")
    return "\n".join(lines)


_IMAGE_LINE = re.compile(r"^\s*!\[[^\]]*\]\([^)]*\)\s*$")


def read_report(model_path: str) -> tuple[str, list[str], str]:
    """(Markdown before the plots, PNG paths, Markdown after) of `<model>/eval/report.md`. The plots are shown
    as images where the report puts them, so their Markdown image lines are dropped."""
    report_dir = Path(model_path) / "eval"
    report = report_dir / "report.md"
    if not report.is_file():
        return (f"No evaluation report in `{report_dir}` yet. `python evaluate.py --model {model_path}` writes "
                "one (the pipeline runs it after DPO).", [], "")
    lines = report.read_text(encoding="utf-8").splitlines()
    image_lines = [i for i, line in enumerate(lines) if _IMAGE_LINE.match(line)]
    cut = image_lines[0] if image_lines else len(lines)
    after = [line for i, line in enumerate(lines) if i > cut and i not in image_lines]
    return "\n".join(lines[:cut]), [str(p) for p in sorted(report_dir.glob("*.png"))], "\n".join(after)


# --- the page -----------------------------------------------------------------------------------


def theme() -> gr.themes.Base:
    """Gradio's default look with system fonts, so the page makes no request to a font CDN."""
    return gr.themes.Default(font=SANS, font_mono=MONO)


def build_app(aligned: LoadedModel, reference: LoadedModel, *, test_titles: Sequence[str],
              titles_source: str = "", rule: str = DEFAULT_RULE, max_new_tokens: int | None = None,
              report_model: str | None = None) -> gr.Blocks:
    """The page for two loaded models. Its events are also the API that gradio_client calls:
    `/write` (title, seed, temperature, poems, rule) and `/compare` (titles, seed, temperature, rule)."""
    names = {"aligned": aligned.name, "reference": reference.name}
    rules = sorted(RULES)

    def on_write(title, seed, temperature, num_poems, rule_name):
        try:
            result = write_poems(aligned, reference, title, seed=int(seed), temperature=temperature,
                                 num_poems=int(num_poems), rule=rule_name, max_new_tokens=max_new_tokens)
        except PoemDPOError as e:
            raise gr.Error(str(e)) from None
        return (poems_html(f"aligned · {aligned.name}", result["aligned"]),
                poems_html(f"reference · {reference.name}", result["reference"]))

    def on_compare(n, seed, temperature, rule_name):
        titles = sample_titles(test_titles, int(n), int(seed))
        try:
            result = compare_on_titles(aligned, reference, titles, seed=int(seed), temperature=temperature,
                                       rule=rule_name, max_new_tokens=max_new_tokens)
        except PoemDPOError as e:
            raise gr.Error(str(e)) from None
        return rates_markdown(result, names), result["rows"]

    with gr.Blocks(title="poem-dpo: aligned vs reference", analytics_enabled=False) as demo:
        gr.Markdown(f"# poem-dpo: aligned vs reference\n`{aligned.name}` (aligned) and `{reference.name}` "
                    "(reference) write a poem for the same title with the same seed.")
        with gr.Tab("One title"):
            with gr.Row():
                title = gr.Textbox(label="Title", value=FIRST_TITLE, placeholder="春夜喜雨", scale=3,
                                   elem_id="title")
                rule_box = gr.Dropdown(rules, value=rule, label="Rule", scale=1,
                                       info="Whose verdict each poem gets (✓ preferred, ✗ rejected).")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="Seed", info="Both models sample with it.")
                temperature = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Temperature",
                                        info="0 writes greedily (every poem the same).")
                num_poems = gr.Slider(1, 8, value=1, step=1, label="Poems per model")
            write = gr.Button("Write", variant="primary", elem_id="write")
            gr.Examples([[t] for t in example_titles(test_titles)], inputs=[title], label="Titles")
            gr.Markdown("Over each character, its tone in the 平水韵: 平 level, 仄 oblique, ○ either (two "
                        "readings), ？ not in the table; rhyme characters in amber. A 五言 or 七言 绝句/律诗 is "
                        "合律 when it passes every check of `poemdpo.data.prosody`, else the failed checks are named.",
                        elem_classes="legend")
            with gr.Row(equal_height=False):
                aligned_out = gr.HTML(elem_id="aligned-poems")
                reference_out = gr.HTML(elem_id="reference-poems")
            inputs = [title, seed, temperature, num_poems, rule_box]
            # One generation at a time across all events: generate_poems flips the shared models' and
            # tokenizers' state (eval mode, padding side) while it runs.
            one_at_a_time = {"concurrency_limit": 1, "concurrency_id": "models"}
            write.click(on_write, inputs, [aligned_out, reference_out], api_name="write", **one_at_a_time)
            title.submit(on_write, inputs, [aligned_out, reference_out], api_name=False, **one_at_a_time)

        with gr.Tab("Held-out titles"):
            gr.Markdown(f"{len(test_titles)} held-out titles, from {titles_source or 'the caller'}: N of them "
                        "drawn with the seed, one poem per title from each model.")
            with gr.Row():
                n_titles = gr.Slider(1, min(200, max(1, len(test_titles))), value=min(20, len(test_titles)),
                                     step=1, label="Titles (N)")
                seed2 = gr.Number(value=0, precision=0, label="Seed")
                temperature2 = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Temperature")
                rule2 = gr.Dropdown(rules, value=rule, label="Rule")
            compare = gr.Button("Sample", variant="primary")
            rates = gr.Markdown()
            table = gr.Dataframe(headers=["title", "aligned", "form", "✓", "reference", "form", "✓"],
                                 datatype="str", wrap=True, interactive=False,
                                 column_widths=["14%", "30%", "8%", "4%", "30%", "10%", "4%"])
            compare.click(on_compare, [n_titles, seed2, temperature2, rule2], [rates, table], api_name="compare",
                          **one_at_a_time)

        with gr.Tab("Report"):
            before, images, after = read_report(report_model or aligned.name)
            gr.Markdown(before)
            if images:
                gr.Gallery(images, label="plots", columns=2, height=420, object_fit="contain")
            if after:
                gr.Markdown(after)
    return demo


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           prevent_thread_lock: bool = False, quiet: bool = False):
    """Serve the page with the offline theme (Gradio 6 takes theme and css at launch)."""
    return demo.launch(server_name=host, server_port=port, share=share, theme=theme(), css=CSS,
                       prevent_thread_lock=prevent_thread_lock, quiet=quiet, ssr_mode=False,
                       footer_links=["api", "settings"], show_error=True)


def main(args: AppArguments) -> None:
    """Load both models (checking both paths first), find held-out titles, serve the page."""
    for path, role in ((args.model, "aligned"), (args.reference, "reference")):
        check_model_path(path, role)
    aligned = load_model(args.model, "aligned", args.device)
    reference = load_model(args.reference, "reference", args.device)
    titles, source = held_out_titles(args.pairs or f"data/pairs_{args.rule}", args.corpus)
    print(f"{len(titles)} held-out titles from {source}")
    demo = build_app(aligned, reference, test_titles=titles, titles_source=source, rule=args.rule,
                     max_new_tokens=args.max_new_tokens)
    launch(demo, host=args.host, port=args.port, share=args.share)
