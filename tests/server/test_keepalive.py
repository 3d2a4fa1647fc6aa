"""Idle channels stay up: the client library pings idle channels (keepalive, permitted without calls), and
the server accepts those pings instead of answering GOAWAY "too_many_pings" (which cost the next call of a
PPO run an UNAVAILABLE and a retry)."""

from __future__ import annotations

import time

import grpc

from rm_client.channel import channel_options
from rm_contract.pb import reward_pb2 as pb
from rm_contract.pb import reward_pb2_grpc

PING_S = 1.5  # the library's default is 30 s; the server accepts pings down to 1 s apart


def test_an_idle_channel_survives_several_keepalive_pings(server):
    request = pb.ScoreRequest(samples=[pb.Sample(text=pb.TextPair(prompt="Hi", response="Hello"))])
    states: list[grpc.ChannelConnectivity] = []
    with grpc.insecure_channel(server.target, options=channel_options(64, PING_S)) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        stub.Score(request, timeout=30)
        channel.subscribe(states.append)  # READY now; a GOAWAY would drop it to IDLE
        time.sleep(8 * PING_S)  # idle: the server saw 8 pings without a call
        assert len(stub.Score(request, timeout=30).results) == 1
    assert set(states) == {grpc.ChannelConnectivity.READY}, states
