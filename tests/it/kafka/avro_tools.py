"""Avro test peers: a schema registry on loopback, and a producer using the reference client.

  python3 avro_tools.py registry PORT
      Serves the Confluent Schema Registry REST endpoints clients use, in memory:
      POST /subjects/{subject}/versions (register; the same schema gets the same id),
      GET /schemas/ids/{id}, GET /subjects/{subject}/versions/latest, GET /subjects,
      POST /compatibility/subjects/{subject}/versions/latest (always compatible: the
      registry records; the reader decides). Prints "ready" once listening.

  python3 avro_tools.py produce BOOTSTRAP REGISTRY_URL TOPIC N
      Produces N records with confluent-kafka's AvroSerializer, each with one of four writer
      schemas in turn (record i uses schema i % 4): v1 (no `country`), v2 (`country` added),
      v3 (`user` removed), and one whose `amount` is a string (it does not resolve against a
      reader schema where it is a long). Partition i % 2, key "k{i}".
"""

import json
import sys
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


def serve(port):
    lock = threading.Lock()
    ids = {}  # canonical schema text -> id
    texts = {}  # id -> schema text
    subjects = {}  # subject -> [id]

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
                        return self.reply(200, {"schema": texts[sid]})
                    return self.reply(404, {"error_code": 40403, "message": "Schema not found"})
                if parts == ["subjects"]:
                    return self.reply(200, sorted(subjects))
                if parts[0] == "subjects" and len(parts) == 4 and parts[2] == "versions":
                    versions = subjects.get(parts[1])
                    if not versions:
                        return self.reply(404, {"error_code": 40401, "message": "Subject not found"})
                    v = len(versions) if parts[3] == "latest" else int(parts[3])
                    sid = versions[v - 1]
                    return self.reply(
                        200, {"subject": parts[1], "version": v, "id": sid, "schema": texts[sid]}
                    )
            self.reply(404, {"error_code": 404, "message": "Not found"})

        def do_POST(self):
            parts = self.path.split("?")[0].strip("/").split("/")
            body = self.body()
            with lock:
                if parts[0] == "subjects" and len(parts) == 3 and parts[2] == "versions":
                    text = json.dumps(json.loads(body["schema"]), separators=(",", ":"), sort_keys=True)
                    if text not in ids:
                        ids[text] = len(ids) + 1
                        texts[ids[text]] = body["schema"]
                    sid = ids[text]
                    versions = subjects.setdefault(parts[1], [])
                    if sid not in versions:
                        versions.append(sid)
                    return self.reply(200, {"id": sid})
                if parts[0] == "subjects" and len(parts) == 2:
                    text = json.dumps(json.loads(body["schema"]), separators=(",", ":"), sort_keys=True)
                    sid = ids.get(text)
                    if sid is None or sid not in subjects.get(parts[1], []):
                        return self.reply(404, {"error_code": 40403, "message": "Schema not found"})
                    v = subjects[parts[1]].index(sid) + 1
                    return self.reply(200, {"subject": parts[1], "version": v, "id": sid, "schema": texts[sid]})
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


if __name__ == "__main__":
    if sys.argv[1] == "registry":
        serve(int(sys.argv[2]))
    elif sys.argv[1] == "produce":
        produce(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        sys.exit(__doc__)
