"""Real parts, no sockets, for the unit tests of the core (``tests/test_unit_*.py``).

- ``Scripted``: a ``Provider`` (``app.providers.base``) that plays, for each
  attempt on a model, the next script given for it. A script is a list of
  steps: a list of ``ProviderEvent`` (one batch, yielded), a ``GatewayError``
  (raised there: before the first batch it is a failure to open, after it a
  failure mid-stream) or a ``Sleep`` (``HANG`` for an upstream that stays
  silent). It records the request of every attempt (``seen``) and how many
  of its streams are still open (``live``): a stream never closed is an
  upstream connection never released. An attempt with no script left fails
  the test loudly (``AssertionError``), never a ``GatewayError`` the code
  under test could swallow.
- ``Recorder``: an ``app.failover.Observer`` that keeps what it was told.
- ``World``: settings, router, upstreams and two scripted providers ``p``
  (models a, b, c) and ``q`` (x, y; it accepts continuations), with the
  aliases in ``ALIASES``; builds failovers, generations and a dispatcher.
- ``ManualClock`` for circuits, ``shifted_loop_time`` for what reads the
  event loop's clock (the rate limiter), ``until`` to wait on a condition.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import Any

from app.capacity import Capacity
from app.config import AliasConfig, ProviderConfig, Settings
from app.dispatch import Dispatch
from app.errors import GatewayError
from app.events import (
    End,
    Error,
    Finish,
    FinishReason,
    ProviderEvent,
    RelayEvent,
    Start,
    TextDelta,
    Usage,
)
from app.failover import Failover
from app.metrics import Metrics
from app.providers.base import Provider
from app.ratelimit import MemoryLimits
from app.relay import Generation
from app.requests import ChatRequest
from app.routing import Router, Target
from app.upstreams import Upstreams


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


HANG = Sleep(3600.0)  # an upstream that says nothing more (a deadline must end it)

Step = list[ProviderEvent] | GatewayError | Sleep
Script = list[Step]


@dataclass(slots=True)
class Seen:
    """What one attempt was asked, copied when its stream started (the request object is
    shared by the attempts and changes between them)."""

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None
    continuation: bool


class Scripted:
    """A provider kind whose upstream does what each attempt's script says."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.scripts: dict[str, list[Script]] = {}
        self.seen: list[Seen] = []
        self.live = 0  # streams started and not yet closed

    @property
    def ready(self) -> bool:
        return True

    async def start(self, *, warm: bool) -> None:
        return None

    async def list_models(self) -> list[str]:
        return sorted(self.scripts)

    async def aclose(self) -> None:
        return None

    def script(self, model: str, *attempts: Script) -> None:
        """Queue one script per coming attempt on ``model``, in order."""
        self.scripts.setdefault(model, []).extend(attempts)

    def calls(self, model: str) -> int:
        return sum(1 for s in self.seen if s.model == model)

    def stream(self, request: ChatRequest) -> AsyncIterator[list[ProviderEvent]]:
        return self._play(request)

    async def _play(self, request: ChatRequest) -> AsyncIterator[list[ProviderEvent]]:
        # Runs at the first __anext__, as a real provider reads its request then.
        self.seen.append(
            Seen(
                request.model,
                [dict(m) for m in request.messages],
                request.max_tokens,
                request.continuation,
            )
        )
        queue = self.scripts.get(request.model)
        if not queue:
            raise AssertionError(f"{self.name}/{request.model}: no script left for an attempt")
        steps = queue.pop(0)
        self.live += 1
        try:
            for step in steps:
                if isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                elif isinstance(step, GatewayError):
                    raise step
                else:
                    yield step
        finally:
            self.live -= 1


def answer(
    *texts: str,
    input_tokens: int | None = 3,
    output_tokens: int | None = -1,
    reason: FinishReason = "stop",
) -> Script:
    """A whole answer: Start, one batch per text, then usage and the finish reason.
    ``output_tokens=-1``: one per text; None: the upstream reports none."""
    out = len(texts) if output_tokens == -1 else output_tokens
    script: Script = [[Start()]]
    for text in texts:
        script.append([TextDelta(text)])
    script.append([Usage(input_tokens, out), Finish(reason)])
    return script


class Recorder:
    """An ``Observer`` that keeps what failover and the relay reported, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, ...]] = []
        self.ends: list[tuple[End, Target | None]] = []

    def attempt(self, target: Target) -> None:
        self.log.append(("attempt", target.name))

    def retry(self, target: Target) -> None:
        self.log.append(("retry", target.name))

    def fallback(self, source: Target, target: Target) -> None:
        self.log.append(("fallback", source.name, target.name))

    def ended(self, end: End, request: ChatRequest, target: Target | None) -> None:
        self.log.append(("ended", end.finish_reason))
        self.ends.append((end, target))

    def of(self, kind: str) -> list[tuple[str, ...]]:
        return [entry for entry in self.log if entry[0] == kind]


class ManualClock:
    """A monotonic clock that moves only when told (circuit cool-downs without waiting)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextmanager
def shifted_loop_time() -> Iterator[Callable[[float], None]]:
    """The running loop's clock, moved forward on demand by the function yielded.

    For code that reads ``loop.time()`` itself (the rate limiter's window): a
    minute passes without waiting one. Timers due meanwhile just fire early.
    """
    loop = asyncio.get_running_loop()
    real = loop.time
    offset = 0.0

    def shifted() -> float:
        return real() + offset

    def advance(seconds: float) -> None:
        nonlocal offset
        offset += seconds

    setattr(loop, "time", shifted)  # noqa: B010  (mypy refuses assigning to a method)
    try:
        yield advance
    finally:
        delattr(loop, "time")


async def until(condition: Callable[[], bool], within: float = 2.0) -> None:
    """Wait until ``condition()`` holds (polled), failing after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


# Seconds small enough that nothing in these tests waits long; tests that are
# about a deadline set their own, smaller still.
BASE_SETTINGS: dict[str, Any] = {
    "_env_file": None,
    "local_enabled": False,
    "openai_api_key": None,
    "anthropic_api_key": None,
    "api_keys": [],
    "max_retries": 2,
    "retry_backoff_s": 0.001,
    "retry_backoff_max_s": 0.004,
    "retry_after_max_s": 1.0,
    "first_token_timeout_s": 2.0,
    "idle_timeout_s": 2.0,
    "total_timeout_s": 5.0,
    "circuit_failure_threshold": 5,
    "circuit_cooldown_s": 30.0,
}

PROVIDERS: dict[str, dict[str, Any]] = {
    "p": {
        "kind": "openai-compatible",
        "base_url": "http://p.invalid/v1",
        "models": ["a", "b", "c"],
    },
    "q": {
        "kind": "openai-compatible",
        "base_url": "http://q.invalid/v1",
        "models": ["x", "y"],
        "accepts_continuation": True,
    },
}

ALIASES: dict[str, dict[str, Any]] = {
    "duo": {"targets": ["p/a", "q/x"]},
    "trio": {"targets": ["p/a", "p/b", "q/x"]},
    "big": {
        "targets": ["p/a", "p/b"],
        "context_window_fallbacks": ["q/y"],
        "content_policy_fallbacks": ["q/x"],
    },
    "cont": {"targets": ["p/a", "q/x"], "continue_on_failure": True},
}


class World:
    """The core's parts over scripted providers ``p`` and ``q``; ``settings`` overrides
    ``BASE_SETTINGS``, ``providers`` is merged into each provider's config by name."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        providers: dict[str, dict[str, Any]] | None = None,
        aliases: dict[str, dict[str, Any]] | None = None,
        **settings: Any,
    ) -> None:
        configs = {
            name: ProviderConfig(**{**cfg, **(providers or {}).get(name, {})})
            for name, cfg in PROVIDERS.items()
        }
        named = ALIASES if aliases is None else aliases
        self.settings = Settings(
            **{**BASE_SETTINGS, **settings},
            providers=configs,
            aliases={name: AliasConfig(**alias) for name, alias in named.items()},
        )
        self.configs = self.settings.provider_configs()
        self.p = Scripted("p")
        self.q = Scripted("q")
        scripted: dict[str, Provider] = {"p": self.p, "q": self.q}
        self.router = Router(self.settings, self.configs, scripted)
        self.upstreams = Upstreams(self.settings, scripted, self.configs, clock=clock)
        self.observer = Recorder()

    @property
    def live(self) -> int:
        """Upstream streams still open, over both providers."""
        return self.p.live + self.q.live

    def breaker_of(self, name: str) -> Any:
        provider, _, model = name.partition("/")
        return self.upstreams.breaker(Target(provider, model))

    @staticmethod
    def request(**fields: Any) -> ChatRequest:
        fields.setdefault("messages", [{"role": "user", "content": "hi"}])
        return ChatRequest(model="", request_id="rid-unit", endpoint="/unit", **fields)

    def failover(self, name: str, request: ChatRequest | None = None) -> Failover:
        route = self.router.resolve(name)
        return Failover(
            self.upstreams, route, request or self.request(), self.observer, self.settings
        )

    async def generation(self, name: str, request: ChatRequest | None = None) -> Generation:
        gen = Generation(self.failover(name, request))
        await gen.open()
        return gen

    def dispatch(
        self, *, rpm: int | None = None, cap: int | None = None, max_open: int = 100
    ) -> Dispatch:
        metrics = Metrics(self.upstreams.circuits)
        capacity = Capacity(max_open, 8, 64)
        capacity.export(metrics)  # refusals counted, as the app does
        return Dispatch(
            self.settings, self.router, self.upstreams, MemoryLimits(rpm, cap), capacity, metrics
        )


async def batches(gen: Generation) -> list[list[RelayEvent]]:
    """Every batch the generation yields, to its end."""
    async with aclosing(gen.events()) as events:
        return [batch async for batch in events]


async def relay(gen: Generation) -> list[RelayEvent]:
    """Every event the generation yields, checked for an honest ending."""
    out = [ev for batch in await batches(gen) for ev in batch]
    honest(out)
    return out


def honest(events: list[RelayEvent]) -> End:
    """Exactly one End, last; an Error only just before it; nothing a provider alone says."""
    assert events and isinstance(events[-1], End), events
    assert sum(isinstance(ev, End) for ev in events) == 1, events
    errors = [i for i, ev in enumerate(events) if isinstance(ev, Error)]
    assert errors in ([], [len(events) - 2]), events
    assert not any(isinstance(ev, Usage | Finish) for ev in events), events
    return events[-1]


def texts(events: list[RelayEvent]) -> str:
    return "".join(ev.text for ev in events if isinstance(ev, TextDelta))


@dataclass(slots=True)
class Closes:
    """An ``on_close`` that counts its calls."""

    calls: int = 0

    async def __call__(self) -> None:
        self.calls += 1
