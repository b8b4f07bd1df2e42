#!/usr/bin/python3
"""Pulls Ollama models, one after the other, each tried again on failure.

    pifleet-ollama-pull --url http://127.0.0.1:11434 --progress FILE --retries 3 MODEL...

Installed and started in the background by pifleet's ollama role. Streams
Ollama's POST /api/pull and keeps FILE (JSON, replaced atomically) up to date:
the model being pulled, its attempt, Ollama's status and bytes done of total,
the models done, and `done: true` at the end. A failed pull (Ollama's error,
a broken connection) is tried again after 10 s, 20 s, ...: Ollama resumes a
partial download. Prints one line per model; exits 1 if any could not be
pulled.
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request


def write(path, state):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)


def pull(url, model, state, path):
    """One attempt: None when pulled, else the reason it failed."""
    request = urllib.request.Request(
        f"{url}/api/pull", data=json.dumps({"model": model, "stream": True}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    last_write = 0.0
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            for line in response:
                if not line.strip():
                    continue
                event = json.loads(line)
                if "error" in event:
                    return event["error"]
                state.update(status=event.get("status", ""), completed=event.get("completed"),
                             total=event.get("total"))
                if time.monotonic() - last_write >= 1:
                    write(path, state)
                    last_write = time.monotonic()
                if event.get("status") == "success":
                    return None
        return "Ollama closed the pull without saying success"
    except urllib.error.HTTPError as e:
        body = e.read()[:300].decode(errors="replace")
        return f"HTTP {e.code}: {body}"
    except (OSError, ValueError) as e:
        return str(e)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--progress", required=True)
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()
    url = args.url.rstrip("/")
    state = {"done": False, "pulled": [], "failed": {}}
    for model in args.models:
        for attempt in range(1, args.retries + 2):
            state.update(model=model, attempt=attempt, status="starting", completed=None, total=None)
            write(args.progress, state)
            started = time.monotonic()
            error = pull(url, model, state, args.progress)
            if error is None:
                print(f"{model}: pulled in {time.monotonic() - started:.0f}s (attempt {attempt})", flush=True)
                state["pulled"].append(model)
                break
            print(f"{model}: attempt {attempt} failed: {error}", flush=True)
            if attempt > args.retries:
                state["failed"][model] = error
            else:
                state.update(status=f"failed ({error}); again in {10 * attempt}s")
                write(args.progress, state)
                time.sleep(10 * attempt)
    state.update(done=True, model=None, status="finished")
    write(args.progress, state)
    if state["failed"]:
        print(f"could not pull: {', '.join(state['failed'])}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
