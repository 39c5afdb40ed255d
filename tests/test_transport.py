"""HTTPTransport against a raw loopback server that answers with scripted bytes.

The transport is driven the way the SDKs drive it, through an ``httpx2.AsyncClient``. The
server below speaks HTTP/1.1 by hand so each test can send exactly the framing it is
about (lengths, chunks, closes, 1xx, stalls, drops), which the LLM server does not.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import ssl
import warnings
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx2 as httpx
import pytest
import trustme
from llm_server import LLMServer

from agentflow.transport import HTTPClient, HTTPTransport

Action = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


def reply(body: bytes = b"ok", status: str = "200 OK", *headers: str) -> bytes:
    """A Content-Length response."""
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Received:
    head: list[str]
    body: bytes

    @property
    def headers(self) -> dict[str, str]:
        return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in self.head[1:])}


@dataclass
class RawServer:
    """Each request gets the next scripted item: raw bytes to send, or an action to run."""

    port: int = 0
    connections: int = 0
    requests: list[Received] = field(default_factory=list)
    script: deque[bytes | Action] = field(default_factory=deque)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                try:
                    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")[:-2]
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request = Received(head, b"")
                if request.headers.get("transfer-encoding") == "chunked":
                    while size := int((await reader.readline()).strip(), 16):
                        request.body += (await reader.readexactly(size + 2))[:-2]
                    await reader.readline()
                else:
                    request.body = await reader.readexactly(int(request.headers.get("content-length", "0")))
                self.requests.append(request)
                item = self.script.popleft() if self.script else reply()
                if isinstance(item, bytes):
                    writer.write(item)
                    await writer.drain()
                elif not await item(reader, writer):
                    return
        finally:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[RawServer]:
    raw = RawServer()
    listener = await asyncio.start_server(raw.serve, "127.0.0.1", 0)
    raw.port = listener.sockets[0].getsockname()[1]
    yield raw
    for writer in raw.writers:
        writer.close()
    listener.close()
    await listener.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=HTTPTransport(), timeout=5) as http:
        yield http


def then_close(data: bytes) -> Action:
    async def action(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(data)
        await writer.drain()
        return False

    return action


async def test_a_request_arrives_whole_and_keep_alive_reuses_one_connection(
    server: RawServer, client: httpx.AsyncClient
) -> None:
    server.script.extend([reply(b'{"n": 1}'), reply(b'{"n": 2}'), reply(b'{"n": 3}')])
    for n in (1, 2, 3):
        response = await client.post(server.url("/v1/chat?x=1"), json={"n": n}, headers={"X-Trace": "t"})
        assert response.status_code == 200 and response.json() == {"n": n}
    assert server.connections == 1
    first = server.requests[0]
    assert first.head[0] == "POST /v1/chat?x=1 HTTP/1.1"
    assert first.headers["host"] == f"127.0.0.1:{server.port}" and first.headers["x-trace"] == "t"
    assert first.body == b'{"n":1}' and first.headers["content-length"] == "7"


async def test_chunked_bodies_with_extensions_and_trailers_keep_the_connection(
    server: RawServer, client: httpx.AsyncClient
) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: y\r\n\r\n"
    )
    server.script.extend([chunked, reply(b"after")])
    assert (await client.get(server.url())).content == b"hello world"
    assert (await client.get(server.url())).content == b"after"
    assert server.connections == 1


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\n\r\nuntil the close", id="close-delimited"),
        pytest.param(reply(b"until the close", "200 OK", "Connection: close"), id="connection-close"),
        pytest.param(reply(b"until the close").replace(b"HTTP/1.1", b"HTTP/1.0"), id="http-1.0"),
    ],
)
async def test_a_response_that_ends_the_connection_is_read_whole_and_not_reused(
    server: RawServer, client: httpx.AsyncClient, response: bytes
) -> None:
    server.script.extend([then_close(response), reply(b"next")])
    assert (await client.get(server.url())).content == b"until the close"
    assert (await client.get(server.url())).content == b"next"
    assert server.connections == 2


async def test_informational_responses_are_skipped_and_bodiless_ones_do_not_wait(
    server: RawServer, client: httpx.AsyncClient
) -> None:
    server.script.extend(
        [
            b"HTTP/1.1 100 Continue\r\n\r\n" + reply(b"real"),
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",  # a HEAD reply: no body follows
        ]
    )
    assert (await client.get(server.url())).content == b"real"
    assert (await client.get(server.url())).status_code == 204
    assert (await client.get(server.url())).status_code == 304
    head = await client.head(server.url())
    assert head.status_code == 200 and head.content == b""
    assert server.connections == 1


async def test_gzip_bodies_are_decoded_by_the_client(server: RawServer, client: httpx.AsyncClient) -> None:
    server.script.append(reply(gzip.compress(b"x" * 1000), "200 OK", "Content-Encoding: gzip"))
    assert (await client.get(server.url())).content == b"x" * 1000


async def test_large_bodies_both_ways(server: RawServer, client: httpx.AsyncClient) -> None:
    big = bytes(range(256)) * 8192  # 2 MiB, more than the socket buffers take at once

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(reply(server.requests[-1].body))
        await writer.drain()
        return True

    server.script.append(echo)
    assert (await client.post(server.url(), content=big)).content == big


async def test_a_streamed_request_body_goes_out_chunked(server: RawServer, client: httpx.AsyncClient) -> None:
    async def parts() -> AsyncIterator[bytes]:
        for part in (b"one ", b"", b"two ", b"three"):
            yield part

    assert (await client.post(server.url(), content=parts())).status_code == 200
    assert server.requests[0].headers["transfer-encoding"] == "chunked"
    assert server.requests[0].body == b"one two three"


async def test_a_streamed_response_yields_each_part_as_it_arrives(
    server: RawServer, client: httpx.AsyncClient
) -> None:
    go_on = asyncio.Event()

    async def two_parts(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst \r\n")
        await writer.drain()
        await go_on.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        return True

    server.script.append(two_parts)
    async with client.stream("GET", server.url()) as response:
        parts = []
        async for part in response.aiter_raw():
            parts.append(part)
            go_on.set()  # the second part is sent only after the first was received
    assert parts == [b"first ", b"second"]
    assert (await client.get(server.url())).content == b"ok" and server.connections == 1


async def test_a_response_closed_half_read_drops_its_connection(
    server: RawServer, client: httpx.AsyncClient
) -> None:
    server.script.append(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    async with client.stream("GET", server.url()) as response:
        async for part in response.aiter_raw():
            assert part == b"x" * 10
            break
    assert (await client.get(server.url())).content == b"ok"
    assert server.connections == 2  # the half-read connection could not carry another request


@pytest.mark.parametrize(
    ("response", "message"),
    [
        pytest.param(b"", "without sending a response", id="no-response"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "before the end", id="short-body"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "chunked", id="cut-chunk"
        ),
        pytest.param(b"SMTP ready\r\n\r\n", "not an HTTP/1.x status line", id="not-http"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "bad Content-Length", id="bad-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "bad header line", id="bad-header"),
    ],
)
async def test_broken_responses_raise_remote_protocol_errors_and_the_next_request_works(
    server: RawServer, client: httpx.AsyncClient, response: bytes, message: str
) -> None:
    server.script.extend([then_close(response), reply(b"fine")])
    with pytest.raises(httpx.RemoteProtocolError, match=message):
        await client.get(server.url())
    assert (await client.get(server.url())).content == b"fine"


async def test_a_stalled_response_times_out_and_its_connection_is_dropped(server: RawServer) -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(5)
        return False

    server.script.append(stall)
    async with httpx.AsyncClient(transport=HTTPTransport(), timeout=0.2) as client:
        started = asyncio.get_running_loop().time()
        with pytest.raises(httpx.ReadTimeout):
            await client.get(server.url())
        assert asyncio.get_running_loop().time() - started < 1.0
        assert (await client.get(server.url())).content == b"ok"
    assert server.connections == 2


async def test_a_cancelled_request_drops_its_connection(server: RawServer, client: httpx.AsyncClient) -> None:
    arrived = asyncio.Event()

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        arrived.set()
        await asyncio.sleep(5)
        return False

    server.script.append(stall)
    call = asyncio.ensure_future(client.get(server.url()))
    await arrived.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert (await client.get(server.url())).content == b"ok"
    assert server.connections == 2


async def test_an_idle_connection_the_server_closed_or_that_expired_is_not_reused(server: RawServer) -> None:
    async with httpx.AsyncClient(transport=HTTPTransport(keepalive_expiry=0.3), timeout=5) as client:
        server.script.append(reply(b"one"))
        assert (await client.get(server.url())).content == b"one"
        server.writers[-1].close()  # the server ends the idle keep-alive connection
        await asyncio.sleep(0.05)
        assert (await client.get(server.url())).content == b"ok"
        assert server.connections == 2
        await asyncio.sleep(0.4)  # past keepalive_expiry
        assert (await client.get(server.url())).content == b"ok"
        assert server.connections == 3


async def test_connect_failures_are_connect_errors() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    async with httpx.AsyncClient(transport=HTTPTransport()) as client:
        with pytest.raises(httpx.ConnectError, match=f"127.0.0.1:{port}"):
            await client.get(f"http://127.0.0.1:{port}/")
        with pytest.raises(httpx.UnsupportedProtocol):
            await client.get("ftp://127.0.0.1/")


async def test_aclose_closes_idle_and_busy_connections(server: RawServer) -> None:
    transport = HTTPTransport()
    client = httpx.AsyncClient(transport=transport)
    await client.get(server.url())
    server.script.append(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    response = await client.send(client.build_request("GET", server.url()), stream=True)
    await client.aclose()
    with pytest.raises(httpx.RemoteProtocolError):
        await response.aread()
    with pytest.raises(RuntimeError):
        await transport.handle_async_request(httpx.Request("GET", server.url()))
    await asyncio.sleep(0.05)
    assert all(writer.is_closing() or writer.transport.is_closing() for writer in server.writers)


async def test_tls_verifies_the_server_against_the_given_authority() -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    raw = RawServer(script=deque([reply(b"secure")]))
    listener = await asyncio.start_server(raw.serve, "127.0.0.1", 0, ssl=server_context)
    port = listener.sockets[0].getsockname()[1]
    try:
        trusting = ssl.create_default_context()
        authority.configure_trust(trusting)
        async with httpx.AsyncClient(transport=HTTPTransport(verify=trusting)) as client:
            assert (await client.get(f"https://127.0.0.1:{port}/")).content == b"secure"
            assert (await client.get(f"https://127.0.0.1:{port}/")).content == b"ok"
        assert raw.connections == 1
        async with httpx.AsyncClient(transport=HTTPTransport()) as client:  # the system's CAs only
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(f"https://127.0.0.1:{port}/")
    finally:
        for writer in raw.writers:
            writer.close()
        listener.close()
        await listener.wait_closed()


async def test_the_client_still_sends_through_proxies_named_in_the_environment(
    server: RawServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")
    server.script.append(reply(b"via the proxy"))
    async with HTTPClient() as client:
        assert isinstance(client._transport, HTTPTransport)
        assert (await client.get("http://api.example.invalid/v1/models")).content == b"via the proxy"
    assert server.requests[0].head[0] == "GET http://api.example.invalid/v1/models HTTP/1.1"


def test_a_client_outlives_its_event_loop() -> None:
    # A script calling asyncio.run() twice with one provider, hence one client. A connection
    # made on the first loop cannot be used (or even closed) from the second one.
    client = httpx.AsyncClient(transport=HTTPTransport())
    with LLMServer() as llm, warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # the first loop's socket, when collected
        url = f"{llm.openai_base_url}/chat/completions"
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(2):
            assert asyncio.run(client.post(url, json=body)).status_code == 200
        asyncio.run(client.aclose())
        gc.collect()
        assert llm.connections == 2  # the second loop made a connection of its own
