"""A stand-in entitlements service for pipelines/entitlements.yaml (Python standard library).

Protocol of Sluice's `http` stage: the request body is {"rows": [{column: value, ...}, ...]};
the response is {"results": [{field: value, ...}, ...]}, one result per row in the same
order. A result {"error": "..."} fails that row alone (it goes to the dead letters); an HTTP
429 or 5xx fails the whole request, which Sluice retries with backoff.

Rule: a title is licensed everywhere unless its id is a multiple of 7 (then only in US and
GB); title ids that are multiples of 101 are unknown to the catalogue (an error row).

    python3 pipelines/functions/entitlements_server.py [PORT]      # default 8808
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def entitle(row):
    title, country = row.get("title_id"), row.get("country")
    if title is None or title % 101 == 0:
        return {"error": f"title {title} is not in the catalogue"}
    if title % 7 == 0:
        allowed = country in ("US", "GB")
        return {"allowed": allowed, "license": "regional" if allowed else "not licensed in " + str(country)}
    return {"allowed": True, "license": "worldwide"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        try:
            rows = json.loads(body)["rows"]
        except (ValueError, KeyError) as e:
            return self.reply(400, {"message": f"bad request: {e}"})
        self.reply(200, {"results": [entitle(r) for r in rows]})

    def reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8808
    print(f"entitlements service on http://127.0.0.1:{port}/entitlements", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
