"""The one place where a call's outcome becomes a gRPC status: errors, logs, metrics, in-flight count."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from hpp_csi.errors import CsiError
from hpp_csi.metrics import DriverMetrics

log = logging.getLogger(__name__)
if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]


class InFlight:
    """Counts calls being served, so shutdown can say what it waits for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def __enter__(self) -> None:
        with self._lock:
            self._count += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._count -= 1

    @property
    def count(self) -> int:
        with self._lock:
            return self._count


class CsiInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every unary handler: CsiError -> its status, anything else -> INTERNAL with the reason logged."""

    def __init__(self, metrics: DriverMetrics | None, in_flight: InFlight) -> None:
        self.metrics = metrics
        self.in_flight = in_flight
        self._wrapped: dict[str, Handler] = {}  # one wrapper per method, not one per call

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Handler | None], details: grpc.HandlerCallDetails
    ) -> Handler | None:
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            wrapped = self._wrap(continuation(details), details.method)
            if wrapped is not None:  # unknown methods are not cached: a client cannot grow the table
                self._wrapped[details.method] = wrapped
        return wrapped

    def _wrap(self, handler: Handler | None, full_method: str) -> Handler | None:
        if handler is None or handler.unary_unary is None:
            return handler
        method = full_method.rsplit("/", 1)[-1]
        behaviour = handler.unary_unary

        def serve(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            message = ""
            try:
                with self.in_flight:
                    return behaviour(request, context)
            except CsiError as exc:
                code, message = exc.code, exc.message
            except NotImplementedError:
                code, message = grpc.StatusCode.UNIMPLEMENTED, f"{method} is not supported by this driver"
            except OSError as exc:
                code, message = grpc.StatusCode.INTERNAL, f"{method}: {exc}"
                log.exception("%s failed", method)
            except Exception as exc:
                code, message = grpc.StatusCode.INTERNAL, f"{method}: unexpected error: {exc!r}"
                log.exception("%s failed", method)
            finally:
                elapsed = time.perf_counter() - start
                if self.metrics is not None:
                    self.metrics.observe(method, code.name, elapsed)
                if code != grpc.StatusCode.OK:
                    log.info("%s -> %s: %s", method, code.name, message)
                else:
                    log.debug("%s ok in %.1f ms", method, elapsed * 1e3)
            context.abort(code, message)

        return grpc.unary_unary_rpc_method_handler(
            serve,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
