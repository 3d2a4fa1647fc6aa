"""reward.v1 RewardService on grpc.aio: protobuf in, the inference core, protobuf out, domain errors mapped
by gRPC's status table."""

from __future__ import annotations

import asyncio
import functools

import grpc

from rm_contract.pb import reward_pb2 as pb
from rm_contract.pb import reward_pb2_grpc
from rm_server.core.inference import Inference, new_request_id
from rm_server.errors import RewardServiceError
from rm_server.transport.grpc.convert import (
    compare_response,
    model_info_response,
    rank_response,
    score_request,
    score_response,
)
from rm_server.transport.grpc.status import status_of

STREAM_INFLIGHT = 64
"""Requests of one ScoreStream held at once (scored, or answered and waiting to be sent)."""


def rpc(method):
    """A unary handler run through the core's `call()`; a domain error becomes the call's gRPC status."""

    @functools.wraps(method)
    async def wrapper(self: RewardService, request, context: grpc.aio.ServicerContext):
        request_id = getattr(request, "request_id", "") or new_request_id()
        try:
            return await self.inference.call(method.__name__, request_id, method(self, request, request_id))
        except RewardServiceError as e:
            await context.abort(status_of(e), str(e))

    return wrapper


class RewardService(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, inference: Inference):
        self.inference = inference

    async def _score(self, request: pb.ScoreRequest, request_id: str) -> pb.ScoreResponse:
        result = await self.inference.score(score_request(request, self.inference.limits))
        return score_response(request_id, result)

    @rpc
    async def Score(self, request, request_id):
        return await self._score(request, request_id)

    async def ScoreStream(self, request_iterator, context):
        """Each request is scored concurrently; responses go out as they finish, tied by request_id.

        At most STREAM_INFLIGHT requests of one stream are held at once (being scored or answered and not yet
        sent): beyond that the server stops reading, and gRPC's flow control holds the client back, so a
        client that writes fast and never reads costs bounded memory. A message that does not parse ends the
        stream at once with INVALID_ARGUMENT."""
        responses: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(STREAM_INFLIGHT)
        tasks: set[asyncio.Task] = set()
        broken: list[str] = []

        async def one(request: pb.ScoreRequest) -> None:
            request_id = request.request_id or new_request_id()
            try:
                response = await self.inference.call("ScoreStream", request_id, self._score(request, request_id))
            except RewardServiceError as e:  # the stream goes on; this request's answer carries the error
                error = pb.Error(code=status_of(e).value[0], message=str(e))
                response = pb.ScoreResponse(request_id=request_id, error=error)
            await responses.put(response)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()  # released when its response has been sent
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                await asyncio.gather(*list(tasks))
            except Exception as e:  # noqa: BLE001 - a message that does not parse: end the stream, say why
                broken.append(f"a message on the stream is not a valid ScoreRequest ({type(e).__name__})")
            finally:  # whatever ends the reader, the writer learns that nothing more comes
                responses.put_nowait(None)

        reader = asyncio.create_task(read())
        self.inference.inflight += 1
        try:
            while (response := await responses.get()) is not None:
                yield response
                slots.release()
            await reader
            if broken:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, broken[0])
        finally:  # done, or the caller went away: drop its queued work
            self.inference.inflight -= 1
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    @rpc
    async def Compare(self, request, request_id):
        comparison = await self.inference.compare(
            request.prompt, request.response_a, request.response_b, request.model, request.model_version
        )
        return compare_response(comparison)

    @rpc
    async def Rank(self, request, request_id):
        ranking = await self.inference.rank(
            request.prompt, list(request.responses), request.model, request.model_version
        )
        return rank_response(ranking)

    @rpc
    async def GetModelInfo(self, request, request_id):
        return model_info_response(self.inference.model_info(request.model, request.model_version))

    @rpc
    async def ReloadModels(self, request, request_id):
        return pb.ReloadModelsResponse(**await self.inference.reload())
