// Browser client for the gateway's Server-Sent Events endpoints.
// An ES module with no dependencies and no build step:
//   import { streamChat } from "/static/gateway-client.js";

const BOM = "\uFEFF";

/**
 * A Server-Sent Events parser following the HTML standard's event-stream rules.
 *
 * feed(text) takes decoded text in chunks of any size (an event, or a line, or a CRLF may be
 * split across chunks); end() marks the end of the stream and discards an unfinished event.
 * onEvent({event, data, id, retry}) is called once per dispatched event: event defaults to
 * "message", data is the raw text (multi-line data joined with "\n"), id is the last event id.
 * Comment lines (":" first) are ignored; a "retry:" field is exposed as parser.retry (and on the
 * next event as .retry).
 */
export function createSSEParser(onEvent) {
  let buffer = "";
  let started = false; // the BOM check is done
  let skipLF = false; // the previous chunk ended with CR: an LF starting this one belongs to it
  let eventType = "";
  let data = [];
  let hasData = false;
  let lastEventId = "";
  let retry;
  let retryPending;

  const parser = {
    get retry() {
      return retry;
    },
    get lastEventId() {
      return lastEventId;
    },
    feed(chunk) {
      if (!chunk) return;
      if (!started) {
        buffer += chunk;
        if (buffer.length === 0) return;
        started = true;
        if (buffer[0] === BOM) buffer = buffer.slice(1);
      } else {
        buffer += chunk;
      }
      let pos = 0;
      if (skipLF && buffer.length > 0) {
        if (buffer[0] === "\n") pos = 1;
        skipLF = false;
      }
      for (;;) {
        let cut = -1;
        for (let i = pos; i < buffer.length; i++) {
          const c = buffer.charCodeAt(i);
          if (c === 10 || c === 13) {
            cut = i;
            break;
          }
        }
        if (cut < 0) break;
        const line = buffer.slice(pos, cut);
        if (buffer[cut] === "\r") {
          if (cut + 1 < buffer.length) {
            pos = buffer[cut + 1] === "\n" ? cut + 2 : cut + 1;
          } else {
            pos = cut + 1;
            skipLF = true;
          }
        } else {
          pos = cut + 1;
        }
        processLine(line);
      }
      buffer = buffer.slice(pos);
    },
    end() {
      // The standard: at the end of the stream, pending (undispatched) data is discarded.
      buffer = "";
      data = [];
      hasData = false;
      eventType = "";
    },
  };

  function processLine(line) {
    if (line === "") {
      dispatch();
      return;
    }
    if (line[0] === ":") return; // a comment, e.g. ": ping"
    const colon = line.indexOf(":");
    let field = line;
    let value = "";
    if (colon >= 0) {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value[0] === " ") value = value.slice(1);
    }
    switch (field) {
      case "event":
        eventType = value;
        break;
      case "data":
        data.push(value);
        hasData = true;
        break;
      case "id":
        if (!value.includes("\0")) lastEventId = value;
        break;
      case "retry":
        if (/^[0-9]+$/.test(value)) {
          retry = Number(value);
          retryPending = retry;
        }
        break;
      default:
        break; // unknown fields are ignored
    }
  }

  function dispatch() {
    if (!hasData) {
      eventType = "";
      return;
    }
    const ev = { event: eventType || "message", data: data.join("\n"), id: lastEventId };
    if (retryPending !== undefined) {
      ev.retry = retryPending;
      retryPending = undefined;
    }
    eventType = "";
    data = [];
    hasData = false;
    onEvent(ev);
  }

  return parser;
}

function parseData(raw) {
  if (raw === "[DONE]") return raw;
  try {
    return JSON.parse(raw);
  } catch {
    return raw;
  }
}

async function httpError(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const detail = body && body.error ? body.error : null;
  const message = (detail && detail.message) || response.statusText || "request failed";
  const err = new Error(`HTTP ${response.status}: ${message}`);
  err.status = response.status;
  err.error = detail;
  err.body = body;
  return err;
}

async function postSSE(url, body, { signal, headers } = {}) {
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...headers },
    body: JSON.stringify(body),
    signal,
    cache: "no-store",
  });
  if (!response.ok) throw await httpError(response);
  if (!response.body) throw new Error("the response has no body to stream");
  return response;
}

// Read an SSE response to its end (or to [DONE]); handle({event, data, id}) per event.
// conn, if given, gets .parser (its .retry outlives a read that failed).
async function readEvents(response, handle, conn) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");
  let done = false;
  const parser = createSSEParser((ev) => {
    if (done) return;
    const parsed = { event: ev.event, data: parseData(ev.data), id: ev.id };
    if (ev.retry !== undefined) parsed.retry = ev.retry;
    if (parsed.data === "[DONE]") done = true;
    handle(parsed);
  });
  if (conn) conn.parser = parser;
  try {
    while (!done) {
      const { value, done: eof } = await reader.read();
      if (eof) {
        parser.feed(decoder.decode());
        parser.end();
        break;
      }
      parser.feed(decoder.decode(value, { stream: true }));
    }
  } finally {
    if (done) reader.cancel().catch(() => {});
    else reader.releaseLock();
  }
  return done;
}

function incomplete(text) {
  const err = new Error("the stream ended before it was complete");
  err.code = "incomplete_stream";
  err.text = text;
  return err;
}

/**
 * POST a chat to /chat/stream and stream it.
 * Resolves with {text, end, error, events}: end is the end event's data (finish_reason, usage,
 * ttft_ms, ...), error the error event's error object if one came.  Rejects with an Error that
 * has .status and .error (the JSON error) on an HTTP error, with the AbortError on abort.
 */
export async function streamChat(
  body,
  { onToken, onEvent, signal, url = "/chat/stream", headers } = {},
) {
  const response = await postSSE(url, body, { signal, headers });
  const got = collector(onToken, onEvent);
  const complete = await readEvents(response, got.handle);
  if (!complete && !got.end) {
    const err = incomplete(got.text);
    err.error = got.error;
    throw err;
  }
  return { text: got.text, end: got.end, error: got.error };
}

// What a simple-protocol stream leaves: its text, its end and error events' data.
function collector(onToken, onEvent) {
  const got = { text: "", end: null, error: null };
  got.handle = (ev) => {
    if (ev.event === "message" && ev.data && typeof ev.data === "object") {
      const piece = ev.data.content;
      if (typeof piece === "string") {
        got.text += piece;
        if (onToken) onToken(piece);
      }
    } else if (ev.event === "end") {
      got.end = ev.data;
    } else if (ev.event === "error") {
      got.error = ev.data && ev.data.error ? ev.data.error : ev.data;
    }
    if (onEvent) onEvent(ev);
  };
  return got;
}

/**
 * POST to /chat/fanout ({..., models: [a, b, ...]}) and stream every model at once.
 * onEvent({event, data, id}) gets each event (data.index / data.model say whose);
 * onToken(index, text) each piece of content.  Resolves with {results}: one
 * {model, text, end, error} per requested model, in order.
 */
export async function streamFanout(
  body,
  { onEvent, onToken, signal, url = "/chat/fanout", headers } = {},
) {
  const response = await postSSE(url, body, { signal, headers });
  const models = Array.isArray(body.models) ? body.models : [];
  const results = models.map((model) => ({ model, text: "", end: null, error: null }));
  const slot = (data) => {
    const i = data && typeof data.index === "number" ? data.index : -1;
    if (i < 0) return null;
    if (!results[i]) results[i] = { model: data.model, text: "", end: null, error: null };
    return results[i];
  };
  const complete = await readEvents(response, (ev) => {
    const r = slot(ev.data);
    if (r) {
      if (ev.event === "message" && typeof ev.data.content === "string") {
        r.text += ev.data.content;
        if (onToken) onToken(ev.data.index, ev.data.content);
      } else if (ev.event === "end") {
        r.end = ev.data;
      } else if (ev.event === "error") {
        r.error = ev.data.error || ev.data;
      }
    }
    if (onEvent) onEvent(ev);
  });
  if (!complete && results.some((r) => !r.end)) {
    const err = incomplete("");
    err.results = results;
    throw err;
  }
  return { results };
}

function abortReason(signal) {
  return signal.reason !== undefined
    ? signal.reason
    : new DOMException("This operation was aborted", "AbortError");
}

// Wait ms, or reject with the abort reason as soon as signal aborts.
function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal && signal.aborted) {
      reject(abortReason(signal));
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(abortReason(signal));
    };
    const timer = setTimeout(() => {
      if (signal) signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    if (signal) signal.addEventListener("abort", onAbort, { once: true });
  });
}

// A reconnect worth trying again after these (a proxy or a restarting gateway).
const retryable = (status) => status === 408 || status === 429 || status >= 500;

/**
 * Start a resumable stream (POST /chat/streams) and follow it over fetch, resuming after drops.
 * When the connection fails or ends before [DONE], it waits the server's retry: hint (3 s
 * without one, at most maxRetryDelay ms) and reads the stream's events again with
 * Last-Event-ID set to the last event it handed over: the gateway sends only what came after,
 * and the generation runs once.  A 204 means everything was delivered.
 * Rejects like streamChat on an HTTP error (.status, .error), also on reconnect (404: the stream
 * expired); with an Error whose .code is "reconnect_failed" after maxRetries reconnects in a row
 * that brought no new event; with the AbortError when signal aborts, after sending
 * DELETE /chat/streams/{id} so that the generation stops (an abort before the POST was answered
 * has no id to stop: the gateway ends a stream nobody reads after GATEWAY_RESUME_GRACE_S).
 * Resolves with {text, end, error, id, reconnects}.
 */
export async function streamResumable(
  body,
  {
    onToken,
    onEvent,
    signal,
    url = "/chat/streams",
    headers,
    maxRetries = 5,
    maxRetryDelay = 10000,
  } = {},
) {
  const created = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json", ...headers },
    body: JSON.stringify(body),
    signal,
    cache: "no-store",
  });
  if (!created.ok) throw await httpError(created);
  const { id, events_url: eventsPath } = await created.json();
  const base = new URL(url, globalThis.location ? globalThis.location.href : undefined);
  const eventsUrl = new URL(eventsPath, base);
  const stopUrl = new URL(`${base.pathname.replace(/\/+$/, "")}/${encodeURIComponent(id)}`, base);

  const got = collector(onToken, onEvent);
  let lastId = ""; // the id of the last event handed over: where a resume starts
  let retry; // the server's latest retry: hint, in ms
  let reconnects = 0;
  let failed = 0; // reconnects in a row that brought no new event
  let cause = null; // why the last connection ended early
  let callbackFailed = false; // onToken/onEvent threw: that is no drop, so no reconnect
  const handle = (ev) => {
    if (signal && signal.aborted) return; // stopped: nothing more is handed over
    lastId = ev.id;
    try {
      got.handle(ev);
    } catch (err) {
      callbackFailed = true;
      throw err;
    }
  };

  try {
    for (let attempt = 0; ; attempt++) {
      if (attempt > 0) {
        if (failed >= maxRetries) {
          const tries = failed === 1 ? "1 failed reconnect" : `${failed} failed reconnects`;
          const err = new Error(
            `gave up on stream ${id} after ${tries} in a row` +
              (cause && cause.message ? ` (last: ${cause.message})` : ""),
          );
          err.code = "reconnect_failed";
          err.id = id;
          err.text = got.text;
          err.reconnects = reconnects;
          err.cause = cause;
          throw err;
        }
        const wait = retry === undefined ? 3000 : retry;
        await sleep(Math.max(0, Math.min(wait, maxRetryDelay)), signal);
        reconnects += 1;
      }
      const before = lastId;
      let response = null;
      try {
        response = await fetch(eventsUrl, {
          headers: {
            Accept: "text/event-stream",
            ...headers,
            ...(lastId ? { "Last-Event-ID": lastId } : {}),
          },
          signal,
          cache: "no-store",
        });
      } catch (err) {
        if (signal && signal.aborted) throw err;
        cause = err; // a network error: try again
      }
      if (response && response.status === 204) break; // all delivered already
      if (response && !response.ok) {
        const err = await httpError(response);
        if (!retryable(response.status)) throw err;
        cause = err;
      } else if (response) {
        const conn = {};
        try {
          if (await readEvents(response, handle, conn)) break; // [DONE]
          cause = incomplete(got.text);
        } catch (err) {
          if (callbackFailed || (signal && signal.aborted)) throw err;
          cause = err; // the connection dropped mid-stream
        }
        if (conn.parser && conn.parser.retry !== undefined) retry = conn.parser.retry;
      }
      if (attempt > 0) failed = lastId === before ? failed + 1 : 0;
    }
    if (signal && signal.aborted) throw abortReason(signal); // in a callback, at the end
  } catch (err) {
    if (signal && signal.aborted) {
      // Stop the generation too: leaving would only detach this reader.
      fetch(stopUrl, { method: "DELETE", headers, keepalive: true, cache: "no-store" }).catch(
        () => {},
      );
      throw abortReason(signal);
    }
    throw err;
  }
  return { text: got.text, end: got.end, error: got.error, id, reconnects };
}

/**
 * Stream with the browser's EventSource (GET /chat/stream?prompt=...).
 * Closes the EventSource when [DONE] arrives, so that the browser does not reconnect and
 * start a second generation; onDone({text, end, error}) is then called once.  If the
 * connection fails before [DONE] and the browser gives up, onDone gets {..., failed: true}.
 * Returns the EventSource (call .close() on it to stop).
 */
export function openEventStream(url, { onToken, onEvent, onDone } = {}) {
  const source = new EventSource(url);
  let text = "";
  let end = null;
  let error = null;
  let finished = false;

  const finish = (extra) => {
    if (finished) return;
    finished = true;
    source.close();
    if (onDone) onDone({ text, end, error, ...extra });
  };

  const handler = (name) => (e) => {
    if (finished) return;
    // EventSource fires a plain Event named "error" for connection problems; the gateway's
    // own `event: error` arrives as a MessageEvent with data.
    if (name === "error" && !(e instanceof MessageEvent)) {
      if (source.readyState === EventSource.CLOSED) finish({ failed: true });
      return;
    }
    const data = parseData(e.data);
    const ev = { event: name, data, id: e.lastEventId };
    if (data === "[DONE]") {
      source.close(); // before anything else: no reconnection after the end
      if (onEvent) onEvent(ev);
      finish({});
      return;
    }
    if (name === "message" && data && typeof data.content === "string") {
      text += data.content;
      if (onToken) onToken(data.content);
    } else if (name === "end") {
      end = data;
    } else if (name === "error") {
      error = data && data.error ? data.error : data;
    }
    if (onEvent) onEvent(ev);
  };

  for (const name of ["message", "start", "tool_call", "error", "end"]) {
    source.addEventListener(name, handler(name));
  }
  return source;
}
