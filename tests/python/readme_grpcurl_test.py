"""The README's grpcurl commands, run as written against a real
`courier serve` on 127.0.0.1 (run by .ci/run after cargo test).

grpcurl itself cannot be installed here, so this does what it does with
those arguments: it learns the services and message types from the
broker's server reflection alone (no .proto files), builds each request
from the command's JSON, calls the method and prints the response as
JSON. The commands are read from README.md, so the README cannot drift
from what was checked.

Usage: python3 tests/python/readme_grpcurl_test.py PATH_TO_COURIER_BINARY
Needs grpcio and grpcio-reflection (tests/python/requirements.txt).
"""

import json
import os
import re
import shlex
import sys
import tempfile

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from client_test import ROOT, start_broker


def readme_commands():
    """Every grpcurl command of README.md's gRPC section, as argv lists."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("## gRPC", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    joined = block.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.startswith("grpcurl ")]


class Grpcurl:
    """grpcurl's `-plaintext [-d JSON] ADDR (list | SERVICE/METHOD)`."""

    def __init__(self, channel):
        self.channel = channel
        self.db = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.db)

    def run(self, argv, addr):
        assert argv[0] == "grpcurl" and "-plaintext" in argv, argv
        args = argv[1:]
        body = None
        if "-d" in args:
            i = args.index("-d")
            body = args[i + 1]
            del args[i:i + 2]
        args.remove("-plaintext")
        target, what = args
        assert target == "127.0.0.1:50051", f"README addresses {target}"
        if what == "list":
            return "\n".join(sorted(self.db.get_services()))
        service_name, method_name = what.split("/")
        method = self.pool.FindServiceByName(service_name).FindMethodByName(method_name)
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request = json_format.Parse(body or "{}", request_class())
        call = self.channel.unary_unary(
            f"/{service_name}/{method_name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        return json_format.MessageToJson(call(request, timeout=30))


def main():
    binary = sys.argv[1]
    commands = readme_commands()
    assert len(commands) == 3, f"expected README's three grpcurl commands, found {commands}"
    with tempfile.TemporaryDirectory() as tmp:
        proc, addr = start_broker(binary, os.path.join(tmp, "data"))
        try:
            channel = grpc.insecure_channel(addr)
            grpcurl = Grpcurl(channel)
            # The README's walkthrough has made these by the time it shows
            # grpcurl; make them the same way, through the same reflection.
            grpcurl.run(["grpcurl", "-plaintext", "-d", '{"name":"orders"}',
                         "127.0.0.1:50051", "courier.v1.Admin/CreateTopic"], addr)
            grpcurl.run(["grpcurl", "-plaintext", "-d", '{"name":"shipping","topic":"orders"}',
                         "127.0.0.1:50051", "courier.v1.Admin/CreateSubscription"], addr)

            listed = grpcurl.run(commands[0], addr)
            for service in ("courier.v1.Admin", "courier.v1.Publisher", "courier.v1.Subscriber",
                            "grpc.health.v1.Health"):
                assert service in listed.splitlines(), f"{service} not listed:\n{listed}"

            published = json.loads(grpcurl.run(commands[1], addr))
            assert published["messageIds"] == ["0"], published

            pulled = json.loads(grpcurl.run(commands[2], addr))
            got = pulled["receivedMessages"]
            assert len(got) == 1, pulled
            assert got[0]["message"]["data"] == "aGVsbG8=", got  # "hello"
            assert got[0]["deliveryAttempt"] == 1, got
            print("README grpcurl commands: ok")
        finally:
            proc.terminate()
            assert proc.wait(timeout=30) == 0, "broker did not shut down cleanly"


if __name__ == "__main__":
    main()
