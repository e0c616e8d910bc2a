"""Schema test peers: a schema registry on loopback, and producers and a consumer using the
reference client (confluent-kafka's Avro and Protobuf serializers).

  python3 schema_tools.py registry PORT
      Serves the Confluent Schema Registry REST endpoints clients use, in memory (Avro
      schemas and, with their schemaType, Protobuf ones):
      POST /subjects/{subject}/versions (register; the same schema gets the same id),
      GET /schemas/ids/{id}, GET /subjects/{subject}/versions/latest, GET /subjects,
      POST /compatibility/subjects/{subject}/versions/latest (always compatible: the
      registry records; the reader decides). Prints "ready" once listening.

  python3 schema_tools.py produce BOOTSTRAP REGISTRY_URL TOPIC N
      Produces N records with confluent-kafka's AvroSerializer, each with one of four writer
      schemas in turn (record i uses schema i % 4): v1 (no `country`), v2 (`country` added),
      v3 (`user` removed), and one whose `amount` is a string (it does not resolve against a
      reader schema where it is a long). Partition i % 2, key "k{i}".

  python3 schema_tools.py produce-rich BOOTSTRAP REGISTRY_URL TOPIC N
      Produces N records of RICH (a nullable union, a timestamp, a date, a decimal, a nested
      record, an array, a double, a boolean) with the AvroSerializer, partition i % 2, key
      "{i}"; then, to partition 0, the malformed messages of MALFORMED, keyed by their name.

  python3 schema_tools.py produce-proto BOOTSTRAP REGISTRY_URL TOPIC N
      Produces N shop.Order messages (tests/it/kafka/proto/order.proto: nested messages,
      repeated fields, a oneof, an enum, a map, proto3 optional, a Timestamp) with the
      ProtobufSerializer, partition i % 2, key "{i}", as proto_order(i) says; then, to
      partition 0, messages that are no shop.Order, keyed by name: a shop.Refund (index
      path [1]), an index path out of range, an unknown schema id, a truncated body.

  python3 schema_tools.py produce-debezium BOOTSTRAP REGISTRY_URL TOPIC N
      Produces the changes of a `customers(id, email, tier)` table as Debezium's
      AvroConverter would (DEBEZIUM_ENVELOPE, with the AvroSerializer): a snapshot of
      N // 10 rows (op r), then N inserts, updates and deletes (each delete followed by a
      tombstone, a null value), keyed '{"id":N}', partition id % 2. Prints the final table
      and the number of events per op as one JSON object.

  python3 schema_tools.py debezium-schema
      Prints DEBEZIUM_ENVELOPE as an .avsc (the reader schema of the envelopes).

  python3 schema_tools.py register REGISTRY_URL SUBJECT NAME
      Registers a schema under SUBJECT with the reference client: NAME is one of SCHEMAS
      (Avro), or proto-bad (a shop.Order whose id is a string).

  python3 schema_tools.py check-proto BOOTSTRAP REGISTRY_URL TOPIC N
      As check, with the ProtobufDeserializer, each message compared with proto_order(i).

  python3 schema_tools.py check BOOTSTRAP REGISTRY_URL TOPIC N
      Reads TOPIC from the start with the reference AvroDeserializer (writer schemas by id
      from the registry) until it holds N distinct ids, and compares each
      record with rich(i) (and an item_count column, when there is one, with its items'
      count). Prints "checked N records, D duplicates, schema ids [...]; TOPIC-value
      is id I" (the subject's latest), or the differences and exits 1. Gives up after 180 s.

  python3 schema_tools.py serialize-rich REGISTRY_URL TOPIC N
      Prints rich(0..N) as the AvroSerializer frames them for TOPIC (registering RICH
      under TOPIC-value), one hex line each: values for another system (Kinesis).

  python3 schema_tools.py check-lines REGISTRY_URL TOPIC N
      As check, of `KEY<TAB>HEX VALUE` lines on standard input (records read from
      another system).
"""

import json
import sys
from pathlib import Path
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ID = {"name": "id", "type": "long"}
USER = {"name": "user", "type": ["null", "string"], "default": None}
COUNTRY = {"name": "country", "type": "string", "default": "??"}


def view(*fields):
    return {"type": "record", "name": "View", "fields": list(fields)}


SCHEMAS = {
    "v1": view(ID, USER, {"name": "amount", "type": "long"}),
    "v2": view(ID, USER, {"name": "amount", "type": "long"}, COUNTRY),
    "v3": view(ID, {"name": "amount", "type": "int"}, COUNTRY),
    "bad": view(ID, {"name": "amount", "type": "string"}),
}


def record(i, version):
    if version == "v1":
        return {"id": i, "user": f"u{i % 7}", "amount": i * 3}
    if version == "v2":
        return {"id": i, "user": f"u{i % 7}", "amount": i * 3, "country": "DE"}
    if version == "v3":
        return {"id": i, "amount": i * 3, "country": "FR"}
    return {"id": i, "amount": str(i * 3)}


# The example pipeline's reader schema (pipelines/orders-avro.yaml).
with open(Path(__file__).resolve().parents[3] / "pipelines/schemas/order.avsc") as f:
    RICH = json.load(f)

# Not one whole Avro value of a known schema: each is a dead letter, keyed by its name.
MALFORMED = {
    "wrong-magic": b"\x01\x00\x00\x00\x01\x02",
    "unknown-id": b"\x00\x00\x00\x03\xe7\x02\x04",
    "empty": b"",
    "tombstone": None,
}


def rich(i):
    import datetime
    import decimal

    utc = datetime.timezone.utc
    return {
        "id": i,
        "user": None if i % 3 == 0 else f"user-{i % 97}\u00e9",
        "at": datetime.datetime(2026, 1, 1, tzinfo=utc) + datetime.timedelta(microseconds=i * 1_000_003),
        "day": datetime.date(2026, 1, 1) + datetime.timedelta(days=i % 400),
        "amount": decimal.Decimal(i * 7 - 50_000).scaleb(-2),
        "address": {"city": ["Berlin", "Paris", "Lagos"][i % 3], "zip": None if i % 5 == 0 else 10_000 + i % 90_000},
        "items": list(range(i % 4)),
        "score": i / 8,
        "gift": i % 2 == 0,
    }


def serve(port):
    lock = threading.Lock()
    ids = {}  # canonical schema text -> id
    texts = {}  # id -> schema text
    subjects = {}  # subject -> [id]
    kinds = {}  # id -> schemaType

    def canonical(body):
        kind = body.get("schemaType", "AVRO")
        if kind == "AVRO":
            return json.dumps(json.loads(body["schema"]), separators=(",", ":"), sort_keys=True)
        return kind + ":" + body["schema"]

    def answer(sid):
        if kinds[sid] == "AVRO":
            return {"schema": texts[sid]}
        return {"schema": texts[sid], "schemaType": kinds[sid]}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def body(self):
            n = int(self.headers.get("Content-Length", "0"))
            return json.loads(self.rfile.read(n) or b"{}")

        def do_GET(self):
            parts = self.path.split("?")[0].strip("/").split("/")
            with lock:
                if parts[:2] == ["schemas", "ids"] and len(parts) >= 3:
                    sid = int(parts[2])
                    if sid in texts:
                        return self.reply(200, answer(sid))
                    return self.reply(404, {"error_code": 40403, "message": "Schema not found"})
                if parts == ["subjects"]:
                    return self.reply(200, sorted(subjects))
                if parts[0] == "subjects" and len(parts) == 4 and parts[2] == "versions":
                    versions = subjects.get(parts[1])
                    if not versions:
                        return self.reply(404, {"error_code": 40401, "message": "Subject not found"})
                    v = len(versions) if parts[3] == "latest" else int(parts[3])
                    sid = versions[v - 1]
                    return self.reply(200, {"subject": parts[1], "version": v, "id": sid, **answer(sid)})
            self.reply(404, {"error_code": 404, "message": "Not found"})

        def do_POST(self):
            parts = self.path.split("?")[0].strip("/").split("/")
            body = self.body()
            with lock:
                if parts[0] == "subjects" and len(parts) == 3 and parts[2] == "versions":
                    text = canonical(body)
                    if text not in ids:
                        ids[text] = len(ids) + 1
                        texts[ids[text]] = body["schema"]
                        kinds[ids[text]] = body.get("schemaType", "AVRO")
                    sid = ids[text]
                    versions = subjects.setdefault(parts[1], [])
                    if sid not in versions:
                        versions.append(sid)
                    return self.reply(200, {"id": sid})
                if parts[0] == "subjects" and len(parts) == 2:
                    sid = ids.get(canonical(body))
                    if sid is None or sid not in subjects.get(parts[1], []):
                        return self.reply(404, {"error_code": 40403, "message": "Schema not found"})
                    v = subjects[parts[1]].index(sid) + 1
                    return self.reply(200, {"subject": parts[1], "version": v, "id": sid, **answer(sid)})
                if parts[0] == "compatibility":
                    return self.reply(200, {"is_compatible": True})
            self.reply(404, {"error_code": 404, "message": "Not found"})

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("ready", flush=True)
    server.serve_forever()


def produce(bootstrap, registry, topic, n):
    from confluent_kafka import Producer
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    client = SchemaRegistryClient({"url": registry})
    serializers = {
        v: AvroSerializer(client, json.dumps(s), conf={"auto.register.schemas": True})
        for v, s in SCHEMAS.items()
    }
    order = ["v1", "v2", "v3", "bad"]
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    ctx = SerializationContext(topic, MessageField.VALUE)
    for i in range(n):
        version = order[i % 4]
        value = serializers[version](record(i, version), ctx)
        while True:
            try:
                producer.produce(topic, value=value, key=f"k{i}", partition=i % 2)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    left = producer.flush(60)
    if left:
        sys.exit(f"{left} messages not delivered")


def producer_for(bootstrap):
    from confluent_kafka import Producer

    return Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 20})


def send(producer, topic, value, key, partition):
    while True:
        try:
            producer.produce(topic, value=value, key=key, partition=partition)
            break
        except BufferError:
            producer.poll(0.1)
    producer.poll(0)


def produce_rich(bootstrap, registry, topic, n):
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    client = SchemaRegistryClient({"url": registry})
    serializer = AvroSerializer(client, json.dumps(RICH))
    ctx = SerializationContext(topic, MessageField.VALUE)
    producer = producer_for(bootstrap)
    last = None
    for i in range(n):
        last = serializer(rich(i), ctx)
        send(producer, topic, last, str(i), i % 2)
    for name, value in MALFORMED.items():
        send(producer, topic, value, name, 0)
    send(producer, topic, last[: len(last) // 2], "truncated", 0)
    left = producer.flush(60)
    if left:
        sys.exit(f"{left} messages not delivered")


def proto_classes():
    """order_pb2, compiled from proto/order.proto by grpc_tools' protoc."""
    import importlib
    import os
    import tempfile

    import grpc_tools
    from grpc_tools import protoc

    out = tempfile.mkdtemp()
    proto = Path(__file__).resolve().parent / "proto"
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    if protoc.main(["protoc", f"-I{proto}", f"-I{well_known}", f"--python_out={out}", str(proto / "order.proto")]):
        sys.exit("protoc failed on order.proto")
    sys.path.insert(0, out)
    return importlib.import_module("order_pb2")


def proto_order(pb, i):
    order = pb.Order(id=i, score=i / 8, status=i % 3)
    if i % 3:
        order.user = f"user-{i % 97}\u00e9"
    order.at.seconds = 1_767_225_600 + i
    order.at.nanos = (i % 1000) * 1000
    order.address.city = ["Berlin", "Paris", "Lagos"][i % 3]
    if i % 5:
        order.address.zip = 10_000 + i
    order.items.extend(range(i % 4))
    if i % 2:
        order.card = f"card-{i}"
    else:
        order.voucher = f"V{i}"
    order.counts["a"] = i % 7
    order.counts["b"] = 1
    return order


def produce_proto(bootstrap, registry, topic, n):
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    pb = proto_classes()
    client = SchemaRegistryClient({"url": registry})
    orders = ProtobufSerializer(pb.Order, client)
    refunds = ProtobufSerializer(pb.Refund, client)
    ctx = SerializationContext(topic, MessageField.VALUE)
    producer = producer_for(bootstrap)
    last = None
    for i in range(n):
        last = orders(proto_order(pb, i), ctx)
        send(producer, topic, last, str(i), i % 2)
    # The same schema id (the subject's one file), the index path [1]: a shop.Refund.
    refund = refunds(pb.Refund(order_id=7), ctx)
    sid = last[1:5]
    bad = {
        "refund": refund,
        "index-out-of-range": b"\x00" + sid + b"\x02\x12" + pb.Order(id=1).SerializeToString(),
        "unknown-id": b"\x00\x00\x00\x03\xe7\x00\x08\x01",
        "truncated": last[: len(last) - 3],
    }
    for name, value in bad.items():
        send(producer, topic, value, name, 0)
    left = producer.flush(60)
    if left:
        sys.exit(f"{left} messages not delivered")


def avro_reading(client):
    """Decodes a message with the AvroDeserializer; what rich(i) says it holds; the id."""
    from confluent_kafka.schema_registry.avro import AvroDeserializer

    deserializer = AvroDeserializer(client)

    def decode(value, ctx):
        return deserializer(value, ctx)

    def differs(record, i):
        want = rich(i)
        if "item_count" in record:
            # The example pipeline's one new column.
            want["item_count"] = len(want["items"])
        # Decimal equality ignores the scale: compare it too.
        same_scale = record["amount"].as_tuple().exponent == want["amount"].as_tuple().exponent
        return None if record == want and same_scale else want

    return decode, differs, lambda record: record["id"]


def proto_reading(client):
    """Decodes a message with the ProtobufDeserializer as a shop.Order; proto_order(i); the id."""
    from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer

    pb = proto_classes()
    # With the registry: the writer schema fetched by id (format=serialized) and the
    # message its index path names found in it, as a consumer of a real registry does.
    deserializer = ProtobufDeserializer(pb.Order, {"use.deprecated.format": False}, client)

    def differs(record, i):
        want = proto_order(pb, i)
        return None if record == want else want

    return (lambda value, ctx: deserializer(value, ctx)), differs, lambda record: record.id


VALUE = {
    "type": "record",
    "name": "Value",
    "namespace": "shop.public.customers",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "email", "type": ["null", "string"], "default": None},
        {"name": "tier", "type": ["null", "string"], "default": None},
    ],
}

DEBEZIUM_ENVELOPE = {
    "type": "record",
    "name": "Envelope",
    "namespace": "shop.public.customers",
    "fields": [
        {"name": "before", "type": ["null", VALUE], "default": None},
        {"name": "after", "type": ["null", "Value"], "default": None},
        {
            "name": "source",
            "type": {
                "type": "record",
                "name": "Source",
                "namespace": "io.debezium.connector.postgresql",
                "fields": [{"name": "connector", "type": "string"}, {"name": "table", "type": "string"}],
            },
        },
        {"name": "op", "type": "string"},
        {"name": "ts_ms", "type": ["null", "long"], "default": None},
    ],
}


def produce_debezium(bootstrap, registry, topic, n):
    import random

    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    client = SchemaRegistryClient({"url": registry})
    serializer = AvroSerializer(client, json.dumps(DEBEZIUM_ENVELOPE))
    ctx = SerializationContext(topic, MessageField.VALUE)
    producer = producer_for(bootstrap)
    rng = random.Random(7)
    table, ops = {}, {}
    source = {"connector": "postgresql", "table": "customers"}

    def emit(i, key, op, before, after):
        ops[op] = ops.get(op, 0) + 1
        event = {"before": before, "after": after, "source": source, "op": op, "ts_ms": 1_700_000_000_000 + i}
        send(producer, topic, serializer(event, ctx), json.dumps({"id": key}, separators=(",", ":")), key % 2)

    snapshot = max(n // 10, 1)
    for key in range(snapshot):
        row = {"id": key, "email": f"c{key}@shop", "tier": "free"}
        emit(key, key, "r", None, row)
        table[key] = row
    for i in range(n):
        key = rng.randrange(snapshot * 3 // 2)
        old = table.get(key)
        if old is None:
            row = {"id": key, "email": f"new{i}@shop", "tier": None}
            emit(i, key, "c", None, row)
            table[key] = row
        elif rng.random() < 0.7:
            row = {"id": key, "email": f"u{i}@shop", "tier": rng.choice(["free", "plus", "pro"])}
            emit(i, key, "u", old, row)
            table[key] = row
        else:
            emit(i, key, "d", {"id": key, "email": None, "tier": None}, None)
            send(producer, topic, None, json.dumps({"id": key}, separators=(",", ":")), key % 2)
            del table[key]
    left = producer.flush(60)
    if left:
        sys.exit(f"{left} messages not delivered")
    print(json.dumps({"table": {str(k): v for k, v in table.items()}, "ops": ops}))


PROTO_BAD = 'syntax = "proto3";\npackage shop;\nmessage Order {\n  string id = 1;\n}\n'


def register(registry, subject, name):
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

    client = SchemaRegistryClient({"url": registry})
    if name == "proto-bad":
        schema = Schema(PROTO_BAD, "PROTOBUF")
    else:
        schema = Schema(json.dumps(SCHEMAS[name]), "AVRO")
    print(client.register_schema(subject, schema))


class Verifier:
    """Decodes messages of `topic` with the reference deserializer and compares each
    with what was produced under its id (the key is the id too)."""

    def __init__(self, registry, topic, reading):
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.serialization import MessageField, SerializationContext

        self.client = SchemaRegistryClient({"url": registry})
        self.topic = topic
        self.decode, self.differs, self.id_of = reading(self.client)
        self.ctx = SerializationContext(topic, MessageField.VALUE)
        self.seen, self.duplicates, self.ids, self.wrong = {}, 0, set(), []

    def add(self, key, value):
        self.ids.add(int.from_bytes(value[1:5], "big"))
        record = self.decode(value, self.ctx)
        i = self.id_of(record)
        if i in self.seen:
            self.duplicates += 1
            if self.seen[i] != record:
                self.wrong.append(f"id {i}: a duplicate that differs: {record} vs {self.seen[i]}")
            return
        self.seen[i] = record
        want = self.differs(record, i)
        if want is not None or key != str(i).encode():
            self.wrong.append(f"id {i} (key {key}): got {record}, want {want}")

    def report(self, n):
        missing = n - len(self.seen)
        wrong = self.wrong + [f"id {i} not in the input" for i in self.seen if not 0 <= i < n]
        if wrong or missing:
            print("\n".join(wrong[:10]), f"\n{len(wrong)} records differ, {missing} missing", file=sys.stderr)
            sys.exit(1)
        latest = self.client.get_latest_version(f"{self.topic}-value").schema_id
        print(
            f"checked {len(self.seen)} records, {self.duplicates} duplicates, schema ids {sorted(self.ids)}; "
            f"{self.topic}-value is id {latest}"
        )


def check(bootstrap, registry, topic, n, reading):
    import time

    from confluent_kafka import Consumer

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"check-{time.time()}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    verifier = Verifier(registry, topic, reading)
    deadline = time.time() + 180
    # Until every id is in, then 3 s more: a message after them (a duplicate, garbage) counts.
    quiet_until = None
    while time.time() < deadline and (quiet_until is None or time.time() < quiet_until):
        if quiet_until is None and len(verifier.seen) >= n:
            quiet_until = time.time() + 3
        m = consumer.poll(0.5)
        if m is None or m.error():
            continue
        verifier.add(m.key(), m.value())
    consumer.close()
    verifier.report(n)


def serialize_rich(registry, topic, n):
    """rich(0..n) as the AvroSerializer frames them for `topic`, a hex line each."""
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    serializer = AvroSerializer(SchemaRegistryClient({"url": registry}), json.dumps(RICH))
    ctx = SerializationContext(topic, MessageField.VALUE)
    for i in range(n):
        print(serializer(rich(i), ctx).hex())


def check_lines(registry, topic, n):
    """Like check, of records read elsewhere (a Kinesis stream): `key<TAB>hex value`
    lines on standard input."""
    verifier = Verifier(registry, topic, avro_reading)
    for line in sys.stdin:
        key, value = line.rstrip("\n").split("\t")
        verifier.add(key.encode(), bytes.fromhex(value))
    verifier.report(n)


if __name__ == "__main__":
    if sys.argv[1] == "registry":
        serve(int(sys.argv[2]))
    elif sys.argv[1] == "produce":
        produce(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif sys.argv[1] == "produce-rich":
        produce_rich(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif sys.argv[1] == "produce-proto":
        produce_proto(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), avro_reading)
    elif sys.argv[1] == "debezium-schema":
        print(json.dumps(DEBEZIUM_ENVELOPE, indent=1))
    elif sys.argv[1] == "produce-debezium":
        produce_debezium(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif sys.argv[1] == "register":
        register(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "serialize-rich":
        serialize_rich(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1] == "check-lines":
        check_lines(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1] == "check-proto":
        check(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), proto_reading)
    else:
        sys.exit(__doc__)
