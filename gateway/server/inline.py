"""Fast-dispatched requests run in the connection's own task, not in a Task of their own.

aiohttp's ``RequestHandler.start()`` is the connection's loop: one task per
connection that waits for the parser's next message and handles it.  For
every request it creates a second task (``_handle_request``, which awaits
the handler, then ``finish_response``) and awaits it, so that each request
gets its own copy of the context variables.  On Python 3.11 that is a Task
object, two more loop callbacks (the task's first step, and start()'s
wake-up when it is done) and two more coroutine frames per request.

The data plane's exact paths (server/dispatch.py) do not need that copy: the
only context variable of the gateway is tracing's, and with tracing on the
fast dispatch is off.  ``InlineRequests.start()`` is a copy of aiohttp's
whose per-request step runs such a request inline: the body of
``_handle_request`` in start()'s own frame, awaiting the middleware's
coroutine directly, and for a response that needs nothing else (no upgrade
being declined) ``finish_response``'s body too.  Every other request
(another path, a query string, a parser error's answer) takes aiohttp's own
step, a task of its own.

What the inline step keeps from aiohttp, and the internals it relies on
(aiohttp 3.14.5; ``inline_supported()`` compares the source of start(),
``_handle_request`` and ``finish_response`` with the one this copy was made
from, and the server falls back to aiohttp's own start(), with a warning at
start-up, when they differ):

- ``_request_in_progress`` and ``_handler_waiter``, set and resolved exactly
  as ``_handle_request`` does: ``RequestHandler.shutdown()`` (graceful
  drain, ``Server.shutdown``) waits on them, and GatewayProtocol's 408
  deadline reads the first;
- ``_current_request``, which ``connection_lost`` and ``shutdown`` cancel
  (``request._cancel``), and ``_task_handler``, start()'s task: with
  ``handler_cancellation`` on, ``connection_lost`` cancels it, which here
  cancels the handler itself (aiohttp cancels the request's task through
  start()'s ``await``);
- the answer: ``HTTPException``, ``TimeoutError`` (504) and other errors
  through ``handle_error`` (GatewayProtocol's JSON) and ``finish_response``,
  inside the ``except`` as aiohttp does (the access logger sees the
  exception); a handler's response prepared, ``write_eof``, ``log_access``
  (``finish_response`` itself when an upgrade's tail is pending, or the
  handler returned no response); a ``ConnectionError`` ends the connection
  quietly;
- the rest of start() unchanged: the parser's message queue and its
  pause/resume, the lingering read of an unread body,
  ``payload.set_exception``, ``request._task`` cleared, keep-alive and its
  timer, the close at the end.

What differs: the handler runs in start()'s task, in start()'s context, so
``asyncio.current_task()`` is the connection's task, and a context variable
a handler sets would be seen by the connection's later requests (none is set
on these paths).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import sys
import warnings
from asyncio.base_events import BaseEventLoop
from collections.abc import Awaitable

from aiohttp import web_protocol
from aiohttp.helpers import ceil_timeout
from aiohttp.http import StreamWriter
from aiohttp.web_exceptions import HTTPException
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_response import StreamResponse

from gateway.server.dispatch import Direct
from gateway.server.response import WholeResponse

# The methods InlineRequests.start() follows besides start(), and the sha256 of the source of all three in
# aiohttp 3.14.5, the one it was copied from.
_FOLLOWED = (RequestHandler._handle_request, RequestHandler.finish_response)
_NAMES = ("_ErrInfo", "ERROR", "_PAYLOAD_ACCESS_ERROR")  # web_protocol's private names start() uses
_COPIED_FROM = "a35d25caad3d905c102f69e8cabc94beb4a052483a67073ad40b4dc913c2cddf"


def aiohttp_source_digest() -> str | None:
    """The digest of the aiohttp methods the copy follows, or None when they or their source are not there."""
    try:
        if not all(hasattr(web_protocol, name) for name in _NAMES):
            return None
        text = "".join(inspect.getsource(f) for f in (RequestHandler.start, *_FOLLOWED))
    except (OSError, TypeError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def inline_supported() -> bool:
    """Whether the installed aiohttp's start() is the one ``InlineRequests.start()`` copies."""
    return aiohttp_source_digest() == _COPIED_FROM


class InlineRequests(RequestHandler):
    """A RequestHandler whose ``_direct`` requests run in start()'s task (a mixin: its class holds the slot)."""

    __slots__ = ()

    _direct: Direct | None

    async def start(self) -> None:
        """aiohttp 3.14's start(), with the per-request step inline for a ``_direct`` request."""
        loop = self._loop
        manager = self._manager
        assert manager is not None
        keepalive_timeout = self._keepalive_timeout
        resp = None
        assert self._request_factory is not None
        assert self._request_handler is not None
        direct = self._direct
        assert direct is not None
        # aiohttp's private names, looked up here: another aiohttp may not have them (this is then never run).
        err_info = web_protocol._ErrInfo
        error_message = web_protocol.ERROR
        access_error = web_protocol._PAYLOAD_ACCESS_ERROR

        while not self._force_close:
            if not self._messages:
                try:
                    # wait for next request
                    self._waiter = loop.create_future()
                    await self._waiter
                finally:
                    self._waiter = None

            message, payload = self._messages.popleft()

            # Free a parser slot; resume reading once drained to low water.
            if self._parser is not None:
                self._parser.message_consumed()
            if self._buffer_paused and len(self._messages) <= self._msg_queue_resume_size:
                self._resume_reading_if_drained()

            start = loop.time() if self._logging_enabled else None

            manager.requests_count += 1
            writer = StreamWriter(self, loop)
            inline: Awaitable[StreamResponse] | None = None
            if isinstance(message, err_info):
                request_handler = self._make_error_handler(message)
                message = error_message
            else:
                request_handler = self._request_handler

            request = self._request_factory(
                message,
                payload,
                self,
                writer,
                self._task_handler or asyncio.current_task(loop),  # type: ignore[arg-type]
            )
            try:
                if request_handler is self._request_handler:
                    inline = direct(request)
                if inline is None:
                    # aiohttp's step: a new task is used for copy context vars (#3406)
                    coro = self._handle_request(request, start, request_handler)
                    if sys.version_info >= (3, 14):
                        if isinstance(loop, BaseEventLoop):
                            task = asyncio.create_task(coro, eager_start=True)
                        else:
                            task = asyncio.Task(coro, loop=loop, eager_start=True)
                    elif sys.version_info >= (3, 12):
                        task = asyncio.Task(coro, loop=loop, eager_start=True)
                    else:
                        task = loop.create_task(coro)
                    try:
                        resp, reset = await task
                    except ConnectionError:
                        self.log_debug("Ignored premature client disconnection")
                        break
                    # Drop the processed task from asyncio.Task.all_tasks() early
                    del task
                else:
                    # The same step inline: _handle_request's body.
                    try:
                        self._request_in_progress = True
                        try:
                            try:
                                self._current_request = request
                                resp = await inline
                            finally:
                                self._current_request = None
                        except HTTPException as exc:
                            resp, reset = await self.finish_response(request, exc, start)
                        except asyncio.CancelledError:
                            raise
                        except TimeoutError as exc:
                            self.log_debug("Request handler timed out.", exc_info=exc)
                            resp = self.handle_error(request, 504)
                            resp, reset = await self.finish_response(request, resp, start)
                        except Exception as exc:  # noqa: BLE001 - aiohttp's 500 answer
                            resp = self.handle_error(request, 500, exc)
                            resp, reset = await self.finish_response(request, resp, start)
                        else:
                            if getattr(resp, "__http_exception__", False):
                                warnings.warn(
                                    "returning HTTPException object is deprecated "
                                    "(#2415) and will be removed, "
                                    "please raise the exception instead",
                                    DeprecationWarning,
                                    stacklevel=1,
                                )
                            prepare = getattr(resp, "prepare", None)
                            if self._upgraded or prepare is None:
                                resp, reset = await self.finish_response(request, resp, start)
                            else:
                                # finish_response's usual case, inline: no upgrade tail to feed, a response.
                                if request._post is not None:  # what _finish() looks at first
                                    request._finish()
                                reset = False
                                try:
                                    await prepare(request)
                                    if resp.__class__ is not WholeResponse or not resp._eof_sent:
                                        await resp.write_eof()  # a WholeResponse went whole in prepare()
                                except ConnectionError:
                                    reset = True
                                if self._logging_enabled:  # what log_access() looks at first
                                    self.log_access(request, resp, start)
                        finally:
                            self._request_in_progress = False
                            if self._handler_waiter is not None:
                                self._handler_waiter.set_result(None)
                    except ConnectionError:
                        self.log_debug("Ignored premature client disconnection")
                        break

                if reset:
                    self.log_debug("Ignored premature client disconnection 2")
                    break

                # notify server about keep-alive
                self._keepalive = bool(resp.keep_alive)

                # check payload
                if not payload.is_eof():
                    lingering_time = self._lingering_time
                    if not self._force_close and lingering_time:
                        self.log_debug("Start lingering close timer for %s sec.", lingering_time)

                        now = loop.time()
                        end_t = now + lingering_time

                        try:
                            while not payload.is_eof() and now < end_t:
                                async with ceil_timeout(end_t - now):
                                    # read and ignore
                                    await payload.readany()
                                now = loop.time()
                        except (asyncio.CancelledError, TimeoutError):
                            if (t := asyncio.current_task()) and t.cancelling():
                                raise

                    # if payload still uncompleted
                    if not payload.is_eof() and not self._force_close:
                        self.log_debug("Uncompleted request.")
                        self.close()

                payload.set_exception(access_error)

            except asyncio.CancelledError:
                self.log_debug("Ignored premature client disconnection")
                self.force_close()
                raise
            except Exception as exc:  # noqa: BLE001 - aiohttp's: logged, the connection closed
                self.log_exception("Unhandled exception", exc_info=exc)
                self.force_close()
            except BaseException:
                self.force_close()
                raise
            finally:
                request._task = None  # type: ignore[assignment]  # Break reference cycle in case of exception
                if self.transport is None and resp is not None:
                    self.log_debug("Ignored premature client disconnection.")

            if self._keepalive and not self._close and not self._force_close:
                # start keep-alive timer
                close_time = loop.time() + keepalive_timeout
                self._next_keepalive_close_time = close_time
                if self._keepalive_handle is None:
                    self._keepalive_handle = loop.call_at(close_time, self._process_keepalive)
            else:
                break

        # remove handler, close transport if no handlers left
        if not self._force_close:
            self._task_handler = None
            if self.transport is not None:
                self.transport.close()
