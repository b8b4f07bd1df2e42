#!/usr/bin/env python3
"""The official `openai` and `ollama` Python clients and LiteLLM's `openai/`
provider, pinned and unchanged, against the coordinator's OpenAI- and
Ollama-compatible endpoints (issue 15), with real daemons and Mosquitto.

    tests/peers/fleet_clients.py PATH/TO/pifleet

Starts Mosquitto on a free port and `pifleet up --mqtt` on it (two nodes and
the Ollama simulator), spawns two agents, runs each client, exits 1 on any
failure.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import litellm
import ollama
import openai


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, probe, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def http(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def check(what, ok, detail):
    print(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}")
    return ok


def answer(agent_system, messages, last):
    """The simulator's deterministic answer."""
    return (f'[llama3.2:latest] received {messages} messages with system prompt '
            f'"{agent_system}"; last user message: "{last}"')


def start_fleet(pifleet, workdir):
    mqtt_port, api_port = free_port(), free_port()
    conf = os.path.join(workdir, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", conf],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for("mosquitto", lambda: socket.create_connection(("127.0.0.1", mqtt_port)).close() or True)
    no_ollama = f"http://127.0.0.1:{free_port()}"
    up = subprocess.Popen(
        [pifleet, "up", "--nodes", "2", "--mqtt", f"127.0.0.1:{mqtt_port}",
         "--api-port", str(api_port), "--ollama-url", no_ollama,
         "--data-dir", os.path.join(workdir, "up")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in up.stdout:
        if "Ctrl-C stops everything" in line:
            break
    else:
        raise SystemExit("pifleet up did not get ready")
    return broker, up, f"http://127.0.0.1:{api_port}"


def main():
    workdir = tempfile.mkdtemp(prefix="pifleet-peers-")
    broker, up, api = start_fleet(sys.argv[1], workdir)
    results = []
    try:
        for name in ("alice", "bob"):
            http("POST", f"{api}/v1/agents",
                 {"name": name, "model": "llama3.2", "system": f"You are {name}."})
        wait_for("agents running", lambda: all(
            a["state"] == "running" for a in http("GET", f"{api}/v1/agents")["agents"]))
        hello = [{"role": "user", "content": "Hello"}]
        want = answer("You are alice.", 2, "Hello")

        # The OpenAI SDK.
        client = openai.OpenAI(base_url=f"{api}/v1", api_key="unused")
        models = sorted(m.id for m in client.models.list())
        results.append(check("openai models.list", models == ["alice", "bob"], models))
        done = client.chat.completions.create(model="alice", messages=hello)
        text = done.choices[0].message.content
        results.append(check("openai chat", text == want and done.usage.completion_tokens > 0,
                             text))
        stream = client.chat.completions.create(model="alice", messages=hello, stream=True,
                                                stream_options={"include_usage": True})
        pieces, usage = [], None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        results.append(check("openai chat (stream)",
                             "".join(pieces) == want and len(pieces) > 1 and usage is not None,
                             f"{len(pieces)} chunks, usage {usage and usage.completion_tokens}"))
        system = [{"role": "system", "content": "Be brief."}] + hello
        text = client.chat.completions.create(model="bob", messages=system).choices[0].message.content
        results.append(check("openai chat: the request's system prompt wins",
                             text == answer("Be brief.", 2, "Hello"), text))
        try:
            client.chat.completions.create(model="nobody", messages=hello)
            results.append(check("openai unknown model", False, "no error"))
        except openai.NotFoundError as e:
            results.append(check("openai unknown model", e.code == "model_not_found", e.message))
        # With memory, the second turn follows the first in bob's history.
        client.chat.completions.create(
            model="bob", messages=hello, extra_headers={"X-Pifleet-Memory": "on"})
        again = client.chat.completions.create(
            model="bob", messages=hello, extra_headers={"X-Pifleet-Memory": "on"})
        results.append(check("openai chat with X-Pifleet-Memory: on",
                             again.choices[0].message.content == answer("You are bob.", 4, "Hello"),
                             again.choices[0].message.content))

        # The ollama client.
        oc = ollama.Client(host=api)
        names = sorted(m.model for m in oc.list().models)
        results.append(check("ollama list", names == ["alice:latest", "bob:latest"], names))
        shown = oc.show("alice")
        results.append(check("ollama show", shown.details.parent_model == "llama3.2:latest",
                             shown.details))
        running = sorted(m.model for m in oc.ps().models)
        results.append(check("ollama ps", running == ["alice:latest", "bob:latest"], running))
        reply = oc.chat(model="alice", messages=hello)
        results.append(check("ollama chat", reply.message.content == want,
                             reply.message.content))
        parts = list(oc.chat(model="alice:latest", messages=hello, stream=True))
        text = "".join(p.message.content for p in parts)
        results.append(check("ollama chat (stream)",
                             text == want and len(parts) > 2 and parts[-1].done
                             and parts[-1].eval_count > 0, f"{len(parts)} chunks"))

        # LiteLLM's OpenAI provider, streaming.
        stream = litellm.completion(model="openai/alice", api_base=f"{api}/v1",
                                    api_key="unused", messages=hello, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream)
        results.append(check("litellm openai/ (stream)", text == want, text[:60]))
        # ...and its Ollama provider, at the Ollama-compatible endpoints.
        stream = litellm.completion(model="ollama_chat/alice", api_base=api,
                                    messages=hello, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream)
        results.append(check("litellm ollama_chat/ (stream)", text == want, text[:60]))
    finally:
        up.terminate()
        up.wait(timeout=30)
        broker.terminate()
        broker.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
