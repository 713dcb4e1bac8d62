"""Encodes and decodes orders.v1 messages with Python's protobuf implementation.

Used by proto/tests/interop.rs to prove the Rust (prost) types are wire-compatible
with another implementation, in both directions.

  orders_interop.py PROTO_ROOT encode   -> JSON {name: {"type": T, "hex": H}} on stdout
  orders_interop.py PROTO_ROOT decode   <- JSON [{"type": T, "hex": H}] on stdin
                                        -> JSON [dict of fields] on stdout
"""
import importlib
import json
import os
import sys
import tempfile

from google.protobuf import json_format
from grpc_tools import protoc


def load(proto_root):
    out = tempfile.mkdtemp(prefix="orders-py-")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out}",
                      "orders/v1/orders.proto"])
    if rc != 0:
        sys.exit(f"protoc failed with {rc}")
    sys.path.insert(0, out)
    return importlib.import_module("orders.v1.orders_pb2")


def encode(pb):
    created = pb.OrderCreated(order_id="ord-42", customer_id="cust-7", total_amount=25.5)
    created.items.add(product_id="sku-1", quantity=2, unit_price=10.0)
    created.items.add(product_id="sku-2", quantity=1, unit_price=5.5)
    created.created_at.seconds = 1_700_000_000
    created.created_at.nanos = 123
    rejected = pb.OrderRejected(order_id="ord-43", customer_id="cust-8",
                                reason_code=pb.REJECT_REASON_TOTAL_MISMATCH,
                                message="total 10.00 != sum of items 12.00", worker="w-1")
    dead = pb.DeadLetter(original_subject="ORDER.created", original_stream="ORDERS",
                         original_stream_sequence=99, payload=b"\xff\x00garbage",
                         error_class=pb.ERROR_CLASS_UNDECODABLE,
                         error_message="invalid wire type", delivery_count=1, order_id="")
    dead.headers.add(name="Nats-Msg-Id", value="ord-44")
    dead.headers.add(name="traceparent", value="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    processed = pb.OrderProcessed(order_id="ord-42", customer_id="cust-7", total_amount=25.5,
                                  delivery_count=3, worker="pod-a")
    msgs = {"created": created, "rejected": rejected, "dead": dead, "processed": processed}
    return {k: {"type": type(v).__name__, "hex": v.SerializeToString().hex()} for k, v in msgs.items()}


def decode(pb, items):
    out = []
    for item in items:
        msg = getattr(pb, item["type"])()
        msg.ParseFromString(bytes.fromhex(item["hex"]))
        out.append(json_format.MessageToDict(msg, preserving_proto_field_name=True))
    return out


def main():
    proto_root, mode = sys.argv[1], sys.argv[2]
    pb = load(proto_root)
    if mode == "encode":
        json.dump(encode(pb), sys.stdout)
    elif mode == "decode":
        json.dump(decode(pb, json.load(sys.stdin)), sys.stdout)
    else:
        sys.exit(f"unknown mode {mode!r}: use encode or decode")


if __name__ == "__main__":
    main()
