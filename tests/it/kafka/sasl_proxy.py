# A SASL/PLAIN front for a Kafka broker without authentication, for the tests: answers
# SaslHandshake and SaslAuthenticate (v0, v1) itself, checking one user and password, and
# forwards every other request; once a client is in, its connection is piped as it is.
# Run as: python3 sasl_proxy.py LISTEN_PORT BROKER_PORT USER PASSWORD
import asyncio, struct, sys

listen, upstream_port, user, password = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]

async def read_frame(reader):
    size = struct.unpack(">i", await reader.readexactly(4))[0]
    return await reader.readexactly(size)

def frame(body):
    return struct.pack(">i", len(body)) + body

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
    try:
        while True:
            req = await read_frame(client_r)
            api_key, version, correlation = struct.unpack(">hhi", req[:8])
            if api_key == 17:  # SaslHandshake
                body = struct.pack(">hi", 0, 1) + struct.pack(">h", 5) + b"PLAIN"
                client_w.write(frame(struct.pack(">i", correlation) + body))
                await client_w.drain()
            elif api_key == 36:  # SaslAuthenticate v0/v1
                client_len = struct.unpack(">h", req[8:10])[0]
                rest = req[10 + max(client_len, 0):]
                n = struct.unpack(">i", rest[:4])[0]
                auth = rest[4:4 + n].split(b"\0")
                ok = len(auth) == 3 and auth[1].decode() == user and auth[2].decode() == password
                if ok:
                    body = struct.pack(">hh", 0, -1) + struct.pack(">i", 0)
                else:
                    msg = b"Authentication failed: invalid username or password"
                    body = struct.pack(">hh", 58, len(msg)) + msg + struct.pack(">i", 0)
                if version >= 1:
                    body += struct.pack(">q", 0)
                client_w.write(frame(struct.pack(">i", correlation) + body))
                await client_w.drain()
                if not ok:
                    break
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
