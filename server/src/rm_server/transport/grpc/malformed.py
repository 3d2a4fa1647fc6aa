"""Bytes that are not a valid request message get INVALID_ARGUMENT naming the expected type.

grpcio answers a request its deserializer cannot parse with INTERNAL ("Exception deserializing request!"),
which reads like a server fault. This interceptor parses unary requests itself: a parse failure becomes a
sentinel that the wrapped handler turns into INVALID_ARGUMENT. (Streams keep grpcio's behaviour: the
stream fails with a status, the server keeps serving.)
"""

from __future__ import annotations

import grpc

MALFORMED = object()


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        parse, behaviour = handler.request_deserializer, handler.unary_unary
        if parse is None or behaviour is None:
            return handler

        def tolerant_parse(data: bytes):
            try:
                return parse(data)
            except Exception:  # noqa: BLE001 - any parse failure is the caller's malformed message
                return MALFORMED

        async def checked(request, context: grpc.aio.ServicerContext):
            if request is MALFORMED:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request body is not a valid message for {handler_call_details.method}",
                )
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked, request_deserializer=tolerant_parse, response_serializer=handler.response_serializer
        )
