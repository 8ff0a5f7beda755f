"""The seed's instruction format: `<INS>請用以下題目寫一首詩<INP>{title}<RES>` followed by the poem."""

from __future__ import annotations

import re

INSTRUCTION = "請用以下題目寫一首詩"
RESPONSE_MARKER = "<RES>"  # the prompt's last token: the poem follows
SPECIAL_TOKENS = ("<INS>", "<INP>", RESPONSE_MARKER)
PROMPT_TEMPLATE = "<INS>" + INSTRUCTION + "<INP>{title}<RES>"


def build_prompt(title: str) -> str:
    return PROMPT_TEMPLATE.format(title=title)


_PROMPT = re.compile(re.escape("<INS>" + INSTRUCTION + "<INP>") + "(.*)" + re.escape("<RES>"), re.S)


def title_of(prompt: str) -> str | None:
    """The title inside a prompt of this format, or None for any other prompt."""
    match = _PROMPT.fullmatch(prompt) if isinstance(prompt, str) else None
    return match.group(1) if match else None


def conversational(title: str) -> list[dict[str, str]]:
    """The same request as a chat turn, for base models that have a chat template."""
    return [{"role": "user", "content": f"{INSTRUCTION}：{title}"}]


# The chapter's example title: the first row of every side-by-side table (training samples, evaluation report),
# shown beside the held-out titles and never counted in a rate (it may be a training title).
CHAPTER_TITLES = ("春夜喜雨",)
