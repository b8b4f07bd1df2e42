#!/usr/bin/env python3
"""The official `ollama` Python client and LiteLLM's Ollama providers, unchanged,
against `pifleet ollama-sim` (issue 9: peers are measured through the simulator,
so it must speak to them as Ollama does).

    tests/peers/ollama_clients.py PATH/TO/pifleet

Starts the simulator on a free port, runs each client, exits 1 on any failure.
"""

import subprocess
import sys

import litellm
import ollama


def start_simulator(pifleet):
    sim = subprocess.Popen(
        [pifleet, "ollama-sim", "--listen", "127.0.0.1:0", "--first-token-ms", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in sim.stdout:
        if "listening on " in line:
            return sim, line.split("listening on ")[1].strip()
    raise SystemExit("ollama-sim did not say where it listens")


def check(what, ok, detail):
    print(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}")
    return ok


def main():
    sim, url = start_simulator(sys.argv[1])
    results = []
    try:
        client = ollama.Client(host=url)
        models = [m.model for m in client.list().models]
        results.append(check("ollama list", "llama3.2:latest" in models, models))
        shown = client.show("llama3.2")
        results.append(check("ollama show", shown.details is not None, shown.details))
        reply = client.chat(model="llama3.2", messages=[{"role": "user", "content": "Hello"}])
        results.append(check("ollama chat", bool(reply.message.content), reply.message.content[:60]))
        parts = list(client.chat(model="llama3.2", stream=True,
                                 messages=[{"role": "user", "content": "Hello"}]))
        results.append(check("ollama chat (stream)", len(parts) > 1 and parts[-1].done,
                             f"{len(parts)} chunks"))
        gen = client.generate(model="llama3.2", prompt="Hello")
        results.append(check("ollama generate", bool(gen.response), gen.response[:60]))
        # LiteLLM's providers: `ollama/` posts to /api/generate without a
        # Content-Type header, `ollama_chat/` to /api/chat.
        for provider in ("ollama", "ollama_chat"):
            answer = litellm.completion(model=f"{provider}/llama3.2", api_base=url,
                                        messages=[{"role": "user", "content": "Hello"}])
            text = answer.choices[0].message.content or ""
            results.append(check(f"litellm {provider}/", bool(text), text[:60]))
    finally:
        sim.terminate()
        sim.wait()
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
