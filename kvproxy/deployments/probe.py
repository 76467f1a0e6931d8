"""Load the model once in a child process before serving it: what llama.cpp would abort on dies there.

llama.cpp stops the whole process on a failed ``GGML_ASSERT`` (an unsupported hyper-parameter, a
KV type a layer's head size cannot take, a graph it cannot build) and on a C++ exception that
crosses its C API; neither can be caught in Python. So ``kvproxy serve`` first runs the same code it
will serve with in a child (``python -m kvproxy.deployments.probe``): the embedded backend loads the
model with the configured context and KV types, renders and tokenizes a chat, generates two tokens,
and scores them on the reference's contexts (the shadow scorer's path). If the child fails, start-up
ends with exit 2 and llama.cpp's own reason in one line; the server never starts on a model that
would take it down at the first request. The weights are memory-mapped, so the second load reads
them from the page cache (``--no-probe`` skips it).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from typing import Any

from kvproxy.config import Settings

# the settings the child needs (no secrets, no network ones)
_FIELDS = {
    "model", "cache_type_k", "cache_type_v", "flash_attn", "ctx_size", "batch_size", "threads",
    "n_gpu_layers", "score_path", "reference_cache_type", "shadow_chunk", "score_sequences",
}  # fmt: skip
# what llama.cpp says when it gives up, most telling first
_REASONS = (
    re.compile(r"GGML_ASSERT\(.*\) failed.*|GGML_ABORT.*|.*: fatal error.*"),
    re.compile(r"what\(\):\s*(.+)"),
    re.compile(r"terminate called .*"),
    re.compile(r"error loading model: (.+)"),
    re.compile(r"(?:llama_\w+): (?:error|failed).*"),
    re.compile(r"^\w*Error: .+"),
)


# What to do about an illegal instruction: the build, not the model, is at fault.
AMX_ADVICE = (
    "which crashes on CPUs with AMX in the pinned llama.cpp. Rebuild llama-cpp-python here with AMX "
    "off: `rm -rf ${KVPROXY_CACHE:-~/.cache/kvproxy}/wheels .venv && "
    "make serve` (the cached build is checked against this CPU), or by hand: "
    "CMAKE_ARGS='-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF' "
    "CFLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
    "CXXFLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
    "pip install --force-reinstall --no-cache-dir --no-binary llama-cpp-python llama-cpp-python"
)
SIGILL_ADVICE = (
    "an instruction this CPU cannot run, so the llama.cpp build is wrong for this machine: built on "
    "another CPU (a copied venv or wheel), or with ggml's AMX matmul, " + AMX_ADVICE
)


def signal_reason(returncode: int, amx_build: bool = False) -> str:
    """'llama.cpp stopped the process with SIGSEGV (signal 11)', and what to do where it is known:
    an illegal instruction always, any signal when the build carries ggml's AMX matmul."""
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = "a signal"
    said = f"llama.cpp stopped the process with {name} (signal {-returncode})"
    if -returncode == signal.SIGILL:
        return f"{said}: {SIGILL_ADVICE}"
    if amx_build:
        return f"{said}; this llama.cpp build has ggml's AMX matmul (AMX_INT8), {AMX_ADVICE}"
    return said


def _reason(stderr: str, returncode: int) -> str:
    if returncode < 0:
        from kvproxy.backends.devices import cpu_build_features

        amx = any(f.startswith("AMX") for f in cpu_build_features())
        if returncode == -signal.SIGILL or amx:  # the build is at fault, whatever llama.cpp printed
            return signal_reason(returncode, amx)
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for pattern in _REASONS:
        for line in reversed(lines):
            m = pattern.search(line)
            if m:
                return (m.group(1) if m.groups() else m.group(0)).strip()
    if returncode < 0:
        return signal_reason(returncode)
    return lines[-1] if lines else f"exit status {returncode}"


def probe(settings: Settings, timeout: float = 900.0) -> str | None:
    """None if the model loads, generates and scores in a child process; else why it did not."""
    args = json.loads(settings.model_dump_json(include=_FIELDS))
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # an abort prints its reason, no debugger run
    try:
        out = subprocess.run(
            [sys.executable, "-m", "kvproxy.deployments.probe"],
            input=json.dumps(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return f"loading the model in a probe took more than {timeout:.0f} s"
    if out.returncode == 0:
        return None
    return _reason(out.stderr, out.returncode)


async def _run(settings: Settings) -> None:
    from kvproxy.backends.base import GenerationRequest, KVConfig, SamplingParams
    from kvproxy.backends.embedded import EmbeddedBackend, resolve_model_path
    from kvproxy.model.gguf_info import read_model_info
    from kvproxy.scoring.embedded import make_scorer

    path = resolve_model_path(settings.model)
    backend = EmbeddedBackend(settings, read_model_info(path), verbose=True)  # llama.cpp's reasons
    await backend.load()
    text = backend.chat_template.render([{"role": "user", "content": "Hello"}])
    prompt = backend.tokenize(text, add_bos=True)
    request = GenerationRequest(
        prompt, max_tokens=2, sampling=SamplingParams(temperature=0.0), top_logprobs=1
    )
    tokens: tuple[int, ...] = ()
    async for event in backend.generate(request):
        tokens = getattr(event, "token_ids", tokens)
    reference = KVConfig(settings.reference_cache_type, settings.reference_cache_type)
    scorer = await asyncio.to_thread(make_scorer, backend, reference)
    try:
        if tokens:
            await asyncio.to_thread(scorer.score, prompt, list(tokens))
    finally:
        scorer.close()
        backend.close()


def main() -> None:
    from kvproxy.backends.native import load_llama_first

    load_llama_first()
    args: dict[str, Any] = json.loads(sys.stdin.read())
    asyncio.run(_run(Settings(**args)))


if __name__ == "__main__":
    main()
