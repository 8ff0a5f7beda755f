"""The seed's instruction format: `<INS>請用以下題目寫一首詩<INP>{title}<RES>` followed by the poem."""

from __future__ import annotations

INSTRUCTION = "請用以下題目寫一首詩"
SPECIAL_TOKENS = ("<INS>", "<INP>", "<RES>")
PROMPT_TEMPLATE = "<INS>" + INSTRUCTION + "<INP>{title}<RES>"


def build_prompt(title: str) -> str:
    return PROMPT_TEMPLATE.format(title=title)


def conversational(title: str) -> list[dict[str, str]]:
    """The same request as a chat turn, for base models that have a chat template."""
    return [{"role": "user", "content": f"{INSTRUCTION}：{title}"}]
