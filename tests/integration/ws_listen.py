"""Print a ComfyUI server's websocket messages as JSON lines (run with the host's python, which has aiohttp).

    python ws_listen.py PORT CLIENT_ID SECONDS

Prints {"type": "connected"} once the socket is open, then one line per JSON message, and exits after SECONDS
or when stdin closes. Used by the integration tests to watch per-step progress of a run.
"""
import asyncio
import json
import sys

import aiohttp


async def main(port: int, client_id: str, seconds: float) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://127.0.0.1:{port}/ws?clientId={client_id}", heartbeat=10) as ws:
            print(json.dumps({"type": "connected"}), flush=True)
            end = asyncio.get_running_loop().time() + seconds
            while True:
                left = end - asyncio.get_running_loop().time()
                if left <= 0:
                    return
                try:
                    msg = await ws.receive(timeout=left)
                except asyncio.TimeoutError:
                    return
                if msg.type == aiohttp.WSMsgType.TEXT:
                    print(msg.data, flush=True)
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], float(sys.argv[3])))
