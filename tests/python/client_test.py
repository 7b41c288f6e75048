"""A client in another language: Python stubs generated from proto/ talk
to a real `courier serve` on 127.0.0.1 (run by .ci/run after cargo test).

Usage: python3 tests/python/client_test.py PATH_TO_COURIER_BINARY
Needs grpcio and grpcio-tools (tests/python/requirements.txt).
"""

import os
import re
import subprocess
import sys
import tempfile
import time

import grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def generate_stubs(out):
    proto_dir = os.path.join(ROOT, "proto")
    files = [os.path.join(proto_dir, "courier", "v1", f) for f in
             ("common.proto", "publisher.proto", "subscriber.proto", "admin.proto")]
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}", *files])
    assert rc == 0, "protoc failed"
    sys.path.insert(0, out)


def start_broker(binary, data_dir):
    proc = subprocess.Popen([binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", data_dir],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"listening on (\S+)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise RuntimeError("broker did not start")


def main():
    binary = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        generate_stubs(tmp)
        from courier.v1 import (admin_pb2, admin_pb2_grpc, common_pb2, publisher_pb2,
                                publisher_pb2_grpc, subscriber_pb2, subscriber_pb2_grpc)
        proc, addr = start_broker(binary, os.path.join(tmp, "data"))
        try:
            ch = grpc.insecure_channel(addr)
            admin = admin_pb2_grpc.AdminStub(ch)
            pub = publisher_pb2_grpc.PublisherStub(ch)
            sub = subscriber_pb2_grpc.SubscriberStub(ch)

            admin.CreateTopic(admin_pb2.CreateTopicRequest(name="py"))
            for name in ("py-a", "py-b"):
                admin.CreateSubscription(common_pb2.Subscription(name=name, topic="py"))
            ids = pub.Publish(publisher_pb2.PublishRequest(topic="py", messages=[
                publisher_pb2.PublishMessage(data=b"one", attributes={"lang": "python"}),
                publisher_pb2.PublishMessage(data=b"two", ordering_key="k"),
            ])).message_ids
            assert list(ids) == ["0", "1"], ids

            # Unary pull and ack on one subscription.
            got = sub.Pull(subscriber_pb2.PullRequest(subscription="py-a", max_messages=10, wait_ms=2000))
            msgs = got.received_messages
            assert [m.message.data for m in msgs] == [b"one", b"two"], msgs
            assert dict(msgs[0].message.attributes) == {"lang": "python"}
            assert msgs[1].message.ordering_key == "k"
            assert all(m.delivery_attempt == 1 for m in msgs)
            res = sub.Acknowledge(subscriber_pb2.AcknowledgeRequest(
                subscription="py-a", ack_ids=[m.ack_id for m in msgs]))
            assert all(r.status == common_pb2.ACK_STATUS_OK for r in res.results), res

            # StreamingPull with flow control on the other: one at a time.
            def requests():
                yield subscriber_pb2.StreamingPullRequest(subscription="py-b", max_outstanding_messages=1)
                time.sleep(1.0)
            stream = sub.StreamingPull(requests())
            first = next(stream)
            assert len(first.received_messages) == 1, first
            stream.cancel()

            # Errors carry their documented codes.
            try:
                pub.Publish(publisher_pb2.PublishRequest(topic="nope", messages=[
                    publisher_pb2.PublishMessage(data=b"x")]))
                raise AssertionError("publish to an unknown topic succeeded")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND, e
            try:
                pub.Publish(publisher_pb2.PublishRequest(topic="py", messages=[]))
                raise AssertionError("an empty batch was accepted")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages" in e.details(), e

            stats = admin.GetSubscriptionStats(admin_pb2.GetSubscriptionStatsRequest(name="py-a"))
            assert stats.backlog_messages == 0, stats
            print("python client test: ok")
        finally:
            proc.terminate()
            assert proc.wait(timeout=30) == 0, "broker did not shut down cleanly"


if __name__ == "__main__":
    main()
