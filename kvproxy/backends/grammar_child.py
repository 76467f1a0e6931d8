"""The grammar compiler's child process: JSON schemas in, checked llama.cpp grammars out (issue 25).

Started by kvproxy.backends.grammar_compiler with the bounds as its one argument (JSON). Each request
is a frame (4-byte big-endian length, then JSON) ``{"schema": ...}``; each answer one frame,
``{"grammar": ...}`` or ``{"refused": message for the client, "bound": what it passed, "detail":
llama.cpp's words}``; the first frame, ``{"ready": true}``, says the child has started.

Why a child: what the checks miss must not take the server down. The schema is checked and
converted here (kvproxy.backends.grammar), then llama.cpp parses the grammar once, here, on a thread
with a stack of CHECK_STACK_BYTES: the server's slot thread, which parses it again to sample, has
SLOT_STACK_BYTES (kvproxy.backends.slots), so a grammar whose parse would overflow that stack
overflows this one first, and this process dies instead of the server. And llama.cpp writes a grammar
it cannot parse to stderr whole (one request's made 14,493 lines of log): here stderr is a file, of
which only the first line is kept, cut short.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

CHECK_STACK_BYTES = 16 * 2**20
# memory the child may take beyond what it holds once started (llama.cpp loaded): a schema the checks
# should have stopped meets a MemoryError here (a 400) rather than the machine's memory
HEADROOM_BYTES = 256 * 2**20
DETAIL_CHARS = 300  # of llama.cpp's error line, for the server's debug log
_PREFIX = "parse: error parsing grammar: "


def read_frame(stream: BinaryIO) -> Any:
    """One frame's JSON, or None at the end of the stream."""
    head = stream.read(4)
    if len(head) < 4:
        return None
    body = stream.read(int.from_bytes(head, "big"))
    return json.loads(body)


def write_frame(stream: BinaryIO, message: dict[str, Any]) -> None:
    body = json.dumps(message, ensure_ascii=False).encode("utf-8", errors="surrogatepass")
    stream.write(len(body).to_bytes(4, "big") + body)
    stream.flush()


def cap_memory(headroom: int) -> None:
    """Cap the data this process may map (RLIMIT_DATA) at what it maps now plus ``headroom``."""
    import resource

    with open("/proc/self/status") as status:
        data = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmData:"))
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = data + headroom
    resource.setrlimit(
        resource.RLIMIT_DATA, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard)
    )


def parse_error(grammar: str) -> str | None:
    """None when llama.cpp parses the grammar, else the first line of what it wrote on stderr (fd
    2 is a file here), cut to DETAIL_CHARS."""
    import llama_cpp

    os.lseek(2, 0, os.SEEK_SET)
    os.ftruncate(2, 0)
    sampler = llama_cpp.llama_sampler_init_grammar(None, grammar.encode(), b"root")
    if sampler:
        llama_cpp.llama_sampler_free(sampler)
        return None
    sys.stderr.flush()  # llama.cpp's log callback writes through Python
    written = os.pread(2, 4096, 0).decode("utf-8", errors="replace")
    first = next((line for line in written.splitlines() if line.strip()), "")
    return first[:DETAIL_CHARS] or "llama.cpp refused the grammar"


def reason(detail: str) -> str:
    """llama.cpp's reason without the grammar text it quotes (``... at <the rest of the grammar>``)."""
    text = detail.removeprefix(_PREFIX).split(" at ", 1)[0]
    return text[:120]


def answer(request: dict[str, Any], limits: Any, parse: Any) -> dict[str, Any]:
    from kvproxy.backends.grammar import json_gbnf
    from kvproxy.schema_limits import SchemaRefused

    try:
        grammar = json_gbnf(request["schema"], limits)
    except SchemaRefused as exc:
        return {"refused": str(exc), "bound": exc.bound}
    error = parse(grammar)
    if error is not None:
        return {
            "refused": f"llama.cpp cannot parse the grammar the schema gives: {reason(error)}",
            "bound": "llama.cpp",
            "detail": error,
        }
    return {"grammar": grammar}


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the server's to handle; stdin's end stops this
    from kvproxy.schema_limits import SchemaLimits

    limits = SchemaLimits(**json.loads(argv[1]))
    import llama_cpp  # noqa: F401  (loaded before the first request, not during it)

    threading.stack_size(CHECK_STACK_BYTES)
    parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-parse")
    parser.submit(int).result()  # its thread (and stack) exists before memory is capped
    cap_memory(HEADROOM_BYTES + 16 * limits.max_grammar_bytes)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
        write_frame(stdout, {"ready": True})
        while (request := read_frame(stdin)) is not None:
            reply = answer(request, limits, lambda g: parser.submit(parse_error, g).result())
            write_frame(stdout, reply)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
