"""A loopback fake of the OpenAI HTTP API for tests: chat completions (structured JSON answers derived
deterministically from the request), files and batches, with a fault-injection script and hit counters.

    srv = FakeOpenAI(); srv.start(); base_url = srv.base_url; ...; srv.stop()
    srv.faults.extend(["429", "500", "drop", "timeout", "malformed", "refusal", "bad_id", "hang"])
Each chat request pops one fault (FIFO); an empty queue means a normal answer.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import json
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _texts(content) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if p.get("type") == "text")


def judge_answer(body: dict, fault: str | None = None) -> dict:
    """Inst-IT Bench judge (SampleScore): 1.0 for an answer equal to the ground truth, 0.5 if it shares
    an [ID] with it, else 0.0; fault "bad_score" answers an out-of-range 1.5."""
    user = next(m for m in body["messages"] if m["role"] == "user")
    item = json.loads(user["content"][-1]["text"])  # the second text part: the item as JSON
    truth, response = item["ground_truth_answer"].strip(), item["tester_response"].strip()
    if fault == "bad_score":
        return {"sample_score": 1.5}
    if response == truth:
        return {"sample_score": 1.0}
    shared = set(re.findall(r"\[\d+\]", truth)) & set(re.findall(r"\[\d+\]", response))
    return {"sample_score": 0.5 if shared else 0.0}


def answer_for(body: dict, fault: str | None = None) -> dict:
    """Deterministic structured answer for a chat body (depends only on the first user message)."""
    name = body["response_format"]["json_schema"]["name"]
    if name == "SampleScore":
        return judge_answer(body, fault)
    user = next(m for m in body["messages"] if m["role"] == "user")
    text = _texts(user["content"])
    ids = [int(x) for x in re.findall(r"\[(\d+)\]", text.split("\n")[0])]
    bad = " Also [99]." if fault == "bad_id" else ""
    if name == "FrameAnnotation":
        t = int(re.search(r"Current frame <(\d+)>", text).group(1))
        ids = [int(x) for x in re.findall(r"\[(\d+)\]", re.search(r"Marked objects in the current frame:(.*)",
                                                                   text).group(1))]
        first = "first frame" in text or "single image" in text
        inst = [{"id": i, "caption": f"Object [{i}] is a red shape in frame {t}."} for i in ids]
        if fault == "bad_id":
            inst.append({"id": 99, "caption": "A ghost."})
        return {"instance_level": inst,
                "image_level": f"Frame {t} shows {' '.join(f'[{i}]' for i in ids)} on a grey background.",
                "temporal_change": None if first else f"Since the previous frame [{ids[0]}] moved right." if ids
                else "Nothing changed."}
    ts = [int(x) for x in re.findall(r"<(\d+)>", text.split("\n")[0])]
    if name == "VideoSummary":
        return {"video_level_caption": f"From <{ts[0]}> to <{ts[-1]}> [{ids[0]}] moves across the scene."
                + f" There are {len(text.splitlines()) - 1} frame descriptions.{bad}"}
    if name == "QASet":
        pairs = [{"question": f"What does [{ids[k % len(ids)]}] do at <{ts[k % len(ts)]}>? (q{k})",
                  "answer": f"At <{ts[k % len(ts)]}> [{ids[k % len(ids)]}] moves.{bad if k == 0 else ''}"}
                 for k in range(12)]
        return {"question_answer_pairs": pairs}
    raise ValueError(name)


class FakeOpenAI:
    def __init__(self, timeout_sleep: float = 1.5):
        self.faults: deque[str] = deque()
        self.timeout_sleep = timeout_sleep
        self.lock = threading.RLock()
        self.hits = 0                      # chat-completion requests received
        self.path_hits: dict[str, int] = {}
        self.log: list[tuple[str, str]] = []   # (request hash, outcome) per chat hit
        self.bodies: list[dict] = []             # chat request bodies, in arrival order
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batch_line_faults: dict[int, str] = {}
        self.batch_hold = False                  # keep batches "in_progress" while True  # line index → "error" | "bad_id" | "malformed"
        self.release = threading.Event()
        self.hang_started = threading.Event()
        self.auth_headers: set[str] = set()
        self._n = 0
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, obj=None, raw: bytes | None = None, headers=None):
                data = raw if raw is not None else json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("x-request-id", srv._rid())
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def do_POST(self):
                srv._count(self.path)
                srv.auth_headers.add(self.headers.get("Authorization", ""))
                body = self._body()
                if self.path.endswith("/chat/completions"):
                    return srv._chat(self, json.loads(body))
                if self.path.endswith("/files"):
                    return srv._file_upload(self, body)
                if self.path.endswith("/batches"):
                    return srv._batch_create(self, json.loads(body))
                self._send(404, {"error": {"message": "not found"}})

            def do_GET(self):
                srv._count(self.path)
                m = re.search(r"/files/([^/]+)/content$", self.path)
                if m:
                    return self._send(200, raw=srv.files[m.group(1)])
                m = re.search(r"/batches/([^/]+)$", self.path)
                if m:
                    return self._send(200, srv._batch_retrieve(m.group(1)))
                self._send(404, {"error": {"message": "not found"}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # -------------------------------------------------------------- lifecycle
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _rid(self) -> str:
        with self.lock:
            self._n += 1
            return f"req_{self._n:06d}"

    def _count(self, path: str) -> None:
        with self.lock:
            key = re.sub(r"/(file|batch)-[^/]+", r"/\1-ID", path)
            self.path_hits[key] = self.path_hits.get(key, 0) + 1

    # -------------------------------------------------------------- chat
    @staticmethod
    def completion(content: str | None, refusal: str | None = None, model: str = "gpt-4o") -> dict:
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1_700_000_000, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": content, "refusal": refusal}}],
                "usage": {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200}}

    def _chat(self, h, body: dict) -> None:
        rhash = hashlib.sha256(_canon(body["messages"]).encode()).hexdigest()
        with self.lock:
            self.hits += 1
            fault = self.faults.popleft() if self.faults else None
            self.log.append((rhash, fault or "ok"))
            self.bodies.append(body)
        if fault == "429":
            return h._send(429, {"error": {"message": "rate limited", "type": "requests", "code": None}},
                           headers={"Retry-After": "0.05"})
        if fault == "500":
            return h._send(500, {"error": {"message": "boom", "type": "server_error"}})
        if fault == "quota":
            return h._send(429, {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                                           "code": "insufficient_quota"}})
        if fault == "echo_key":  # a misbehaving server that echoes the credentials into an error message
            return h._send(400, {"error": {"message": f"bad request from {h.headers.get('Authorization')}",
                                           "type": "invalid_request_error"}})
        if fault == "drop":
            h.close_connection = True
            return None
        if fault == "timeout":
            time.sleep(self.timeout_sleep)
        if fault == "hang":
            self.hang_started.set()
            self.release.wait(60)
            return None
        model = body.get("model", "gpt-4o")
        if fault == "malformed":
            return h._send(200, self.completion('{"instance_level": [{"id": 1, "capt', model=model))
        if fault == "refusal":
            return h._send(200, self.completion(None, refusal="I'm sorry, I can't help with that.", model=model))
        content = json.dumps(answer_for(body, fault))
        h._send(200, self.completion(content, model=model))

    # -------------------------------------------------------------- files / batches
    def _new_file(self, data: bytes) -> str:
        fid = f"file-{hashlib.sha256(data).hexdigest()[:12]}-{len(self.files)}"
        self.files[fid] = data
        return fid

    def _file_upload(self, h, body: bytes) -> None:
        msg = email.message_from_bytes(b"Content-Type: " + h.headers["Content-Type"].encode() + b"\r\n\r\n" + body,
                                       policy=email.policy.HTTP)
        data, purpose, filename = b"", "", "upload"
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name == "file":
                data = part.get_payload(decode=True)
                filename = part.get_filename() or filename
            elif name == "purpose":
                purpose = part.get_payload(decode=True).decode()
        with self.lock:
            fid = self._new_file(data)
        h._send(200, {"id": fid, "object": "file", "bytes": len(data), "created_at": 1_700_000_000,
                      "filename": filename, "purpose": purpose, "status": "processed"})

    def _batch_create(self, h, req: dict) -> None:
        with self.lock:
            bid = f"batch-{len(self.batches) + 1}"
            self.batches[bid] = {"id": bid, "object": "batch", "endpoint": req["endpoint"], "errors": None,
                                 "input_file_id": req["input_file_id"], "completion_window": req["completion_window"],
                                 "status": "validating", "output_file_id": None, "error_file_id": None,
                                 "created_at": 1_700_000_000, "metadata": req.get("metadata"),
                                 "request_counts": {"total": 0, "completed": 0, "failed": 0}}
            h._send(200, self.batches[bid])

    def _batch_retrieve(self, bid: str) -> dict:
        with self.lock:
            b = self.batches[bid]
            if b["status"] == "validating":
                b["status"] = "in_progress"
            elif b["status"] == "in_progress" and not self.batch_hold:
                self._run_batch(b)
            return dict(b)

    def _run_batch(self, b: dict) -> None:
        lines = [json.loads(x) for x in self.files[b["input_file_id"]].decode().splitlines() if x.strip()]
        out, err = [], []
        for k, line in enumerate(lines):
            fault = self.batch_line_faults.get(k)
            rid = f"req_batch_{b['id']}_{k}"
            if fault == "error":
                err.append({"id": f"br_{k}", "custom_id": line["custom_id"], "error": None,
                            "response": {"status_code": 500, "request_id": rid,
                                         "body": {"error": {"message": "boom", "type": "server_error"}}}})
                continue
            content = ('{"broken' if fault == "malformed" else json.dumps(answer_for(line["body"], fault)))
            out.append({"id": f"br_{k}", "custom_id": line["custom_id"], "error": None,
                        "response": {"status_code": 200, "request_id": rid,
                                     "body": self.completion(content, model=line["body"]["model"])}})
        out.reverse()  # output order is not guaranteed: the client must join on custom_id
        b["output_file_id"] = self._new_file("".join(json.dumps(x) + "\n" for x in out).encode())
        if err:
            b["error_file_id"] = self._new_file("".join(json.dumps(x) + "\n" for x in err).encode())
        b["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}
        b["status"] = "completed"
