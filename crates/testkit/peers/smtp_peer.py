"""An independent SMTP server (aiosmtpd) for tinyfat's outbound SMTP tests.

    python3 smtp_peer.py FOLDER [USER PASSWORD]

Listens on 127.0.0.1, an ephemeral port it prints on stdout. Each message it
accepts is written to FOLDER/msg-N.eml (the bytes as received) with
FOLDER/msg-N.json ({"mail_from", "rcpt_tos"}). Before each DATA answer it
pops the first line of FOLDER/replies, if any: "451 ..." or "550 ..." is
answered as is (nothing stored); "drop" stores the message and closes the
connection without answering (a 250 that never arrived); "hold SECONDS"
stores it and waits that long before the 250. With USER and
PASSWORD, AUTH is offered (no TLS: loopback only) and other credentials get
535; each login is appended to FOLDER/auth.log. Exits when stdin closes.
"""

import asyncio
import json
import os
import sys
import logging

from aiosmtpd.smtp import SMTP, AuthResult

# aiosmtpd warns about its own use of a deprecated attribute on every login.
logging.getLogger("mail.log").setLevel(logging.ERROR)

folder = sys.argv[1]
credentials = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else None


def next_reply():
    path = os.path.join(folder, "replies")
    try:
        with open(path) as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    except FileNotFoundError:
        return None
    if not lines:
        return None
    with open(path + ".tmp", "w") as f:
        f.write("".join(line + "\n" for line in lines[1:]))
    os.replace(path + ".tmp", path)
    return lines[0]


def store(envelope):
    n = len([name for name in os.listdir(folder) if name.endswith(".eml")]) + 1
    meta = {"mail_from": envelope.mail_from, "rcpt_tos": envelope.rcpt_tos}
    with open(os.path.join(folder, f".msg-{n}.json"), "w") as f:
        json.dump(meta, f)
    os.replace(os.path.join(folder, f".msg-{n}.json"), os.path.join(folder, f"msg-{n}.json"))
    with open(os.path.join(folder, f".msg-{n}.eml"), "wb") as f:
        f.write(envelope.original_content)
    os.replace(os.path.join(folder, f".msg-{n}.eml"), os.path.join(folder, f"msg-{n}.eml"))


class Handler:
    async def handle_DATA(self, server, session, envelope):
        reply = next_reply()
        if reply and reply.startswith("hold "):
            # Stored, then the 250 waits: the test kills the sender meanwhile.
            store(envelope)
            await asyncio.sleep(float(reply.split()[1]))
            return "250 OK queued"
        if reply == "drop":
            store(envelope)
            server.transport.close()
            return "250 OK (never delivered: the connection is closed)"
        if reply and reply[0] in "45":
            return reply
        store(envelope)
        return "250 OK queued"


def authenticator(server, session, envelope, mechanism, auth_data):
    ok = credentials is not None and (auth_data.login.decode(), auth_data.password.decode()) == credentials
    if ok:
        with open(os.path.join(folder, "auth.log"), "a") as f:
            f.write(f"{mechanism} {auth_data.login.decode()}\n")
    return AuthResult(success=ok, handled=False)


async def main():
    loop = asyncio.get_running_loop()
    kwargs = {"hostname": "peer.test", "decode_data": False}
    if credentials is not None:
        kwargs.update(authenticator=authenticator, auth_require_tls=False)
    server = await loop.create_server(lambda: SMTP(Handler(), **kwargs), "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    stdin_closed = loop.create_future()

    def watch_stdin():
        sys.stdin.read()
        loop.call_soon_threadsafe(stdin_closed.set_result, None)

    loop.run_in_executor(None, watch_stdin)
    await stdin_closed
    server.close()


asyncio.run(main())
