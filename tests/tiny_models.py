# ruff: noqa: E501 (the chat templates and pre-tokenizer patterns are verbatim copies)
"""Tiny random-weight stand-ins for the Hub chat models users swap in, built offline in a second.

Each family copies what a real checkpoint ships besides its weights: the architecture (2 layers, width 32),
a byte-level BPE tokenizer with the family's pre-tokenizer and special tokens (trained here with `tokenizers`
on a slice of the corpus, so Chinese characters merge as they would), the chat template verbatim, and the
generation config's stop tokens and sampling defaults. Saved to a directory, they load through
`AutoTokenizer` / `AutoModelForCausalLM` like the real ones, traps included (transformers 5 swaps in
`Qwen2Tokenizer` for a qwen2 config).

    model_dir = make_tiny_model(tmp_path / "qwen2", "qwen2")
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

# The chat templates, verbatim from each model's tokenizer_config.json (TRL keeps byte-identical copies
# in trl/chat_templates/ for identity comparison; test_architectures checks ours still equal them).
# Qwen/Qwen2.5-0.5B-Instruct
QWEN2_5_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# google/gemma-2-2b-it (Gemma 1 and 2 ship the same template)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# The pre-tokenizer splits of tokenizer.json (Qwen2's is also hard-coded in transformers' Qwen2Tokenizer).
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


@dataclass(frozen=True)
class Family:
    """What a real checkpoint of the family ships besides its weights, shrunk."""

    config: type[PretrainedConfig]
    config_kwargs: dict
    template: str
    special_tokens: tuple[str, ...]  # ids 0.. in this order
    roles: dict[str, str | None]  # bos / eos / pad / unk → a special token or None
    tokenizer_config: dict  # keys of the real tokenizer_config.json that change how it loads
    split: str | None  # the Split regex before ByteLevel; None: ByteLevel's own (GPT-2) regex
    prepend_bos: bool  # the tokenizer's post-processor puts bos before plain text
    generation: dict = field(default_factory=dict)  # generation_config.json, ids as token names
    stop_tokens: tuple[str, ...] = ()  # generation_config.eos_token_id


FAMILIES: dict[str, Family] = {
    # Qwen2.5-Instruct: no bos, eos <|im_end|>, pad <|endoftext|>; sampling defaults in generation_config.json.
    "qwen2": Family(
        config=Qwen2Config,
        config_kwargs={"num_key_value_heads": 2},
        template=QWEN2_5_TEMPLATE,
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        roles={"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "unk": None},
        tokenizer_config={"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "unk_token": None,
                          "errors": "replace", "split_special_tokens": False, "add_prefix_space": False},
        split=QWEN2_SPLIT,
        prepend_bos=False,
        generation={"do_sample": True, "repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.8, "top_k": 20},
        stop_tokens=("<|im_end|>", "<|endoftext|>"),
    ),
    # Llama-3-Instruct: the tokenizer prepends <|begin_of_text|> to plain text and the template writes it too;
    # eos <|eot_id|>, no pad token.
    "llama": Family(
        config=LlamaConfig,
        config_kwargs={"num_key_value_heads": 2},
        template=LLAMA3_TEMPLATE,
        special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"),
        roles={"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": None, "unk": None},
        tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast"},
        split=LLAMA3_SPLIT,
        prepend_bos=True,
        generation={"do_sample": True, "temperature": 0.6, "top_p": 0.9},
        stop_tokens=("<|end_of_text|>", "<|eot_id|>"),
    ),
    # Gemma-2-it: <bos> before plain text and in the template, turns end with <end_of_turn> (a stop token of
    # generation_config, not the tokenizer's eos). The real tokenizer is SentencePiece-style; this one is
    # byte-level, declared as the generic class (see tokenizer_class_loaded in test_architectures).
    "gemma2": Family(
        config=Gemma2Config,
        config_kwargs={"num_key_value_heads": 2, "head_dim": 8, "sliding_window": 64,
                       "query_pre_attn_scalar": 8, "hidden_activation": "gelu_pytorch_tanh"},
        template=GEMMA_TEMPLATE,
        special_tokens=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        roles={"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"},
        tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast"},
        split=None,
        prepend_bos=True,
        generation={},
        stop_tokens=("<eos>", "<end_of_turn>"),
    ),
}


def corpus_texts(n_poems: int = 600) -> list[str]:
    """A slice of the shipped corpus plus the test fixture's poems: the text a tokenizer here is trained on."""
    from conftest import make_corpus_poems
    from poemdpo.data.corpus import DEFAULT_CORPUS, read_corpus
    from poemdpo.data.prompts import INSTRUCTION

    poems, _ = read_corpus(DEFAULT_CORPUS / "poet.tang.0.json")
    texts = [f"{p.title}\n{p.text}" for p in poems[:n_poems]]
    texts += [f"{p['title']}\n" + "\n".join(p["paragraphs"]) for p in make_corpus_poems(200)]
    return texts + [INSTRUCTION + "：春日"] * 10


def train_tokenizer(family: Family, texts: list[str], vocab_size: int = 1200) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the family's pre-tokenizer, special tokens and bos handling."""
    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=family.split is None)
    if family.split is None:
        tokenizer.pre_tokenizer = byte_level
    else:
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(family.split), behavior="isolated"), byte_level]
        )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(family.special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    post = [processors.ByteLevel(trim_offsets=False)]
    if family.prepend_bos:
        bos = family.roles["bos"]
        post.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                  special_tokens=[(bos, tokenizer.token_to_id(bos))]))
    tokenizer.post_processor = processors.Sequence(post)
    roles = {f"{role}_token": token for role, token in family.roles.items() if token}
    extra = [t for t in family.special_tokens if t not in family.roles.values()]
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=family.template,
                                   extra_special_tokens=extra, **roles)


def make_tiny_model(path: str | Path, family_name: str, texts: list[str] | None = None, seed: int = 0) -> str:
    """Save a tiny random model of `family_name` with its tokenizer, chat template and generation config."""
    family = FAMILIES[family_name]
    tokenizer = train_tokenizer(family, texts if texts is not None else corpus_texts())
    ids = {role: tokenizer.convert_tokens_to_ids(token) if token else None for role, token in family.roles.items()}
    config = family.config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        pad_token_id=ids["pad"], **family.config_kwargs,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], pad_token_id=ids["pad"],
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in family.stop_tokens], **family.generation,
    )
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # As the real tokenizer_config.json says it (save_pretrained writes its own class and drops null tokens).
    config_path = path / "tokenizer_config.json"
    written = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**written, **family.tokenizer_config}, ensure_ascii=False, indent=2),
                           encoding="utf-8")
    return str(path)


def make_pairs_dir(root: str | Path, n_poems: int = 200) -> Path:
    """The preference pairs build_dataset.py makes from the fixture corpus, in `root/pairs`."""
    import build_dataset
    from conftest import make_corpus_poems

    root = Path(root)
    (root / "corpus").mkdir(parents=True, exist_ok=True)
    (root / "corpus" / "poet.tang.0.json").write_text(json.dumps(make_corpus_poems(n_poems), ensure_ascii=False),
                                                      encoding="utf-8")
    build_dataset.main(["--corpus", str(root / "corpus"), "--output_dir", str(root / "pairs"), "--test_size", "0.2"])
    return root / "pairs"


REPO = Path(__file__).resolve().parents[1]


def dpo_argv(model_dir: str | Path, pairs_dir: str | Path, output_dir: str | Path, *extra: str,
             config: str | Path = REPO / "configs" / "dpo_tiny_cpu.yaml") -> list[str]:
    """train_dpo.py's arguments for a run of seconds on a tiny model: the default recipe, shrunk (`extra` wins)."""
    return ["--config", str(config), "--model_name_or_path", str(model_dir),
            "--dataset_name", str(pairs_dir), "--output_dir", str(output_dir), "--max_train_pairs", "16",
            "--per_device_train_batch_size", "4", "--max_eval_pairs", "8", "--eval_steps", "2",
            "--save_strategy", "no", "--logging_steps", "1", "--sample_titles", "3", "--sample_max_new_tokens", "16",
            "--learning_rate", "3e-3", "--warmup_steps", "0", "--use_cpu", "true", "--bf16", "false",
            "--report_to", "none", *extra]
