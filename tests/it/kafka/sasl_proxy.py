# A SASL front for a Kafka broker without authentication, for the tests (tansu cannot be
# given users with its in-memory storage). It answers SaslHandshake (api key 17) and
# SaslAuthenticate (v0/v1, api key 36) itself and forwards every other request one by one;
# once a client is in, the rest of its connection is piped to the broker as it is.
#   PLAIN          USER and PASSWORD.
#   SCRAM-SHA-256, SCRAM-SHA-512  RFC 5802/7677 with USER and PASSWORD (4096 iterations).
#   OAUTHBEARER    with the AWS triple, as AWS MSK IAM does it: the token is a SigV4-presigned
#                  `kafka-cluster:Connect` URL (base64url), verified here against those keys.
# Each login attempt is one line on stderr; no password, secret or token is ever printed.
# Run as: python3 sasl_proxy.py LISTEN_PORT BROKER_PORT USER PASSWORD
#                               [AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY REGION]
import asyncio, base64, datetime, hashlib, hmac, os, struct, sys, urllib.parse

listen, upstream_port, user, password = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
aws = sys.argv[5:8] if len(sys.argv) >= 8 else None  # (access key id, secret, region)
mechanisms = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] + (["OAUTHBEARER"] if aws else [])
UNSUPPORTED_SASL_MECHANISM, SASL_AUTHENTICATION_FAILED = 33, 58

class Refused(Exception):
    """A failed login: `message` goes to the client (error 58), `why` (default the same) to
    stderr."""

    def __init__(self, message, why=None):
        super().__init__(message)
        self.why = why or message

def log(mechanism, who, outcome):
    print(f"sasl_proxy: {mechanism} login of {who}: {outcome}", file=sys.stderr, flush=True)

def b64(data):
    return base64.b64encode(data).decode()

# --- SCRAM (RFC 5802): the stored credentials of USER, made once per hash. ---
SCRAM_HASHES = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}
ITERATIONS = 4096

def scram_credentials(name):
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac(name, password.encode(), salt, ITERATIONS)
    client_key = hmac.digest(salted, b"Client Key", name)
    return {"salt": salt, "stored_key": hashlib.new(name, client_key).digest(),
            "server_key": hmac.digest(salted, b"Server Key", name)}

scram_users = {m: scram_credentials(h) for m, h in SCRAM_HASHES.items()}

def scram_attributes(message):
    return dict(part.split("=", 1) for part in message.split(",") if "=" in part)

class Scram:
    """One SCRAM exchange: client-first -> server-first, client-final -> server-final."""

    def __init__(self, mechanism):
        self.mechanism, self.hash, self.state = mechanism, SCRAM_HASHES[mechanism], "first"
        self.who = "?"

    def refuse(self, why):
        # The client is told what Kafka tells it, whatever went wrong.
        raise Refused("Authentication failed during authentication due to invalid credentials "
                      f"with SASL mechanism {self.mechanism}", why)

    def step(self, message):
        message = message.decode(errors="replace")
        if self.state == "first":
            # gs2-header ("n,," or "n,a=authzid,") then the bare message "n=user,r=nonce".
            parts = message.split(",", 2)
            if len(parts) < 3 or parts[0] not in ("n", "y"):
                self.refuse("malformed client-first message")
            self.gs2_header, self.client_first_bare = parts[0] + "," + parts[1] + ",", parts[2]
            attrs = scram_attributes(self.client_first_bare)
            self.who = attrs.get("n", "?").replace("=2C", ",").replace("=3D", "=")
            if self.who != user or not attrs.get("r"):
                self.refuse("unknown user" if self.who != user else "no client nonce")
            self.nonce = attrs["r"] + b64(os.urandom(18))
            creds = scram_users[self.mechanism]
            self.server_first = f"r={self.nonce},s={b64(creds['salt'])},i={ITERATIONS}"
            self.state = "final"
            return self.server_first.encode(), False
        if self.state == "final":
            without_proof, _, proof = message.rpartition(",p=")
            attrs = scram_attributes(without_proof)
            if attrs.get("c") != b64(self.gs2_header.encode()) or attrs.get("r") != self.nonce:
                self.refuse("channel binding or nonce does not match")
            creds = scram_users[self.mechanism]
            auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
            signature = hmac.digest(creds["stored_key"], auth_message, self.hash)
            try:
                client_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature))
            except ValueError:
                self.refuse("the proof is not base64")
            if not hmac.compare_digest(hashlib.new(self.hash, client_key).digest(),
                                       creds["stored_key"]):
                self.refuse("wrong password (the client proof does not match)")
            server_signature = hmac.digest(creds["server_key"], auth_message, self.hash)
            self.state = "done"
            return b"v=" + b64(server_signature).encode(), True
        self.refuse("the exchange is over")

# --- OAUTHBEARER as AWS MSK IAM: a SigV4-presigned URL as the bearer token. ---
def uri_encode(text):
    return urllib.parse.quote(text, safe="-_.~")  # RFC 3986: unreserved kept, %XX upper case

def msk_iam_url(token):
    """The presigned URL in a token, its query parameters (decoded) and the access key id."""
    try:
        padded = token + "=" * (-len(token) % 4)
        url = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except ValueError:
        raise Refused("the token is not a base64url-encoded URL")
    parts = urllib.parse.urlsplit(url)
    # Parameters split by hand: parse_qsl would turn `+` into a space.
    params = [tuple(urllib.parse.unquote(x) for x in (p.split("=", 1) + [""])[:2])
              for p in parts.query.split("&") if p]
    key_id = dict(params).get("X-Amz-Credential", "?").split("/")[0]
    return parts, params, key_id

def verify_msk_iam(parts, params):
    """Checks a presigned `kafka-cluster:Connect` URL against the AWS triple, or Refused."""
    access_key_id, secret, region = aws
    host = f"kafka.{region}.amazonaws.com"
    if parts.scheme != "https" or parts.netloc != host or parts.path not in ("", "/"):
        raise Refused(f"the token's URL is not https://{host}/")
    query = dict(params)
    if len(query) != len(params):
        raise Refused("a query parameter is repeated")
    if query.get("Action") != "kafka-cluster:Connect":
        raise Refused("the action is not kafka-cluster:Connect")
    if query.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256":
        raise Refused("the algorithm is not AWS4-HMAC-SHA256")
    if query.get("X-Amz-SignedHeaders") != "host":
        raise Refused("the signed headers are not `host`")
    credential = query.get("X-Amz-Credential", "").split("/")
    if len(credential) != 5 or credential[0] != access_key_id:
        raise Refused("the access key id is not known")
    day, scope_region, service, terminator = credential[1:]
    if (scope_region, service, terminator) != (region, "kafka-cluster", "aws4_request"):
        raise Refused(f"the credential scope is not {region}/kafka-cluster/aws4_request")
    amz_date = query.get("X-Amz-Date", "")
    try:
        signed_at = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
            tzinfo=datetime.timezone.utc)
        expires = int(query.get("X-Amz-Expires", ""))
    except ValueError:
        raise Refused("X-Amz-Date or X-Amz-Expires is malformed")
    now = datetime.datetime.now(datetime.timezone.utc)
    if amz_date[:8] != day or abs(now - signed_at) > datetime.timedelta(minutes=15):
        raise Refused("the signing time is not within 15 minutes of now")
    if not 0 < expires <= 900 or now > signed_at + datetime.timedelta(seconds=expires):
        raise Refused("the token has expired (or X-Amz-Expires is over 900)")
    # SigV4: all but the signature and the User-Agent (added after signing) is signed.
    canonical_query = "&".join(f"{k}={v}" for k, v in sorted(
        (uri_encode(k), uri_encode(v)) for k, v in params
        if k not in ("X-Amz-Signature", "User-Agent")))
    canonical_request = "\n".join(["GET", "/", canonical_query, f"host:{host}", "", "host",
                                   hashlib.sha256(b"").hexdigest()])
    scope = f"{day}/{region}/kafka-cluster/aws4_request"
    string_to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                                hashlib.sha256(canonical_request.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in (day, region, "kafka-cluster", "aws4_request"):
        key = hmac.digest(key, part.encode(), "sha256")
    expected = hmac.new(key, string_to_sign.encode(), "sha256").hexdigest()
    if not hmac.compare_digest(expected, query.get("X-Amz-Signature", "")):
        raise Refused("the signature does not match")

class OAuthBearer:
    """One message, `n,,\\x01auth=Bearer <token>\\x01\\x01` (RFC 7628), maybe with more
    key=value pairs; the reply is empty."""
    mechanism = "OAUTHBEARER"

    def __init__(self):
        self.who = "?"

    def step(self, message):
        pairs = message.decode(errors="replace").split("\x01")[1:]
        fields = dict(p.split("=", 1) for p in pairs if "=" in p)
        scheme, _, token = fields.get("auth", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Refused("no `auth=Bearer <token>` in the OAUTHBEARER message")
        parts, params, self.who = msk_iam_url(token)  # who: the access key id, not secret
        verify_msk_iam(parts, params)
        return b"", True

class Plain:
    """One message, `authzid\\0user\\0password`; the reply is empty."""
    mechanism = "PLAIN"

    def __init__(self):
        self.who = "?"

    def step(self, message):
        auth = message.split(b"\0")
        self.who = auth[1].decode(errors="replace") if len(auth) == 3 else "?"
        if len(auth) != 3 or auth[1] != user.encode() or auth[2] != password.encode():
            raise Refused("Authentication failed: invalid username or password")
        return b"", True

def exchange(mechanism):
    if mechanism == "PLAIN":
        return Plain()
    if mechanism == "OAUTHBEARER":
        return OAuthBearer()
    return Scram(mechanism)

# --- The Kafka protocol around it. ---
async def read_frame(reader):
    size = struct.unpack(">i", await reader.readexactly(4))[0]
    return await reader.readexactly(size)

def frame(body):
    return struct.pack(">i", len(body)) + body

def string(text):
    data = text.encode()
    return struct.pack(">h", len(data)) + data

def authenticate_response(version, error, message, auth_bytes):
    body = struct.pack(">h", error)
    body += string(message) if message is not None else struct.pack(">h", -1)
    body += struct.pack(">i", len(auth_bytes)) + auth_bytes
    if version >= 1:
        body += struct.pack(">q", 0)  # session_lifetime_ms: none
    return body

async def pump(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except Exception:
        pass
    finally:
        writer.close()

async def handle(client_r, client_w):
    up_r, up_w = await asyncio.open_connection("127.0.0.1", upstream_port)
    login = None  # the exchange of the mechanism this connection chose
    try:
        while True:
            req = await read_frame(client_r)
            api_key, version, correlation = struct.unpack(">hhi", req[:8])
            client_id_len = struct.unpack(">h", req[8:10])[0]
            payload = req[10 + max(client_id_len, 0):]
            if api_key == 17:  # SaslHandshake: mechanism (string)
                n = struct.unpack(">h", payload[:2])[0]
                mechanism = payload[2:2 + n].decode(errors="replace")
                error = 0 if mechanism in mechanisms else UNSUPPORTED_SASL_MECHANISM
                login = exchange(mechanism) if error == 0 else None
                if error:
                    log(mechanism, "?", "failed: the mechanism is not enabled")
                body = struct.pack(">hi", error, len(mechanisms))
                body += b"".join(string(m) for m in mechanisms)
                client_w.write(frame(struct.pack(">i", correlation) + body))
                await client_w.drain()
            elif api_key == 36:  # SaslAuthenticate v0/v1: auth_bytes (bytes)
                n = struct.unpack(">i", payload[:4])[0]
                message = payload[4:4 + n]
                mechanism = login.mechanism if login else "?"
                try:
                    if login is None:
                        raise Refused("SaslAuthenticate before a SaslHandshake")
                    reply, done = login.step(message)
                    body = authenticate_response(version, 0, None, reply)
                except Refused as refused:
                    log(mechanism, getattr(login, "who", "?"), f"failed: {refused.why}")
                    body = authenticate_response(version, SASL_AUTHENTICATION_FAILED,
                                                 str(refused), b"")
                    client_w.write(frame(struct.pack(">i", correlation) + body))
                    await client_w.drain()
                    break
                client_w.write(frame(struct.pack(">i", correlation) + body))
                await client_w.drain()
                if done:
                    log(mechanism, login.who, "ok")
                    # Authenticated: the rest of the connection goes to the broker as it is.
                    await asyncio.gather(pump(client_r, up_w), pump(up_r, client_w))
                    return
            else:
                up_w.write(frame(req))
                await up_w.drain()
                client_w.write(frame(await read_frame(up_r)))
                await client_w.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        client_w.close()
        up_w.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()

asyncio.run(main())
