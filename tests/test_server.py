"""`llava-jax serve`: the batcher and text streaming on a fake engine, then the real server.

The real server runs uvicorn in a thread on 127.0.0.1 (a port the OS picks) over a tiny random
LLaVA folder and is driven with real HTTP. Its session also computes the expected answers (as
`llava-jax generate` does), so each compiled program is built once: streaming at batch 1 and at
batch 8 (the concurrent requests).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from llava_jax.infer import run
from llava_jax.infer.serve.request_batcher import RequestBatcher, Job, group_jobs
from llava_jax.infer.generate import Prompt
from llava_jax.infer.sampling import SamplingParams
from llava_jax.infer.serve.app import create_app
from llava_jax.infer.serve.command import listen_socket, load_service
from llava_jax.infer.serve.limits import Limits
from llava_jax.infer.serve.output import RequestOutput

MODEL_ID = "tiny-llava"
MAX_TOKENS = 12

# ---- fakes ------------------------------------------------------------------------------------


class FakeEngine:
  """Row i generates prompt[0] + 1, + 2, ... (EOS 2 never occurs unless the prompt plans it:
  a prompt [k, ..., -1] ends with EOS after k tokens). Yields chunks of 3 tokens per row."""
  eos_token_ids = (2,)

  def __init__(self, fail_on=None):
    self.calls, self.chunks_pulled, self.fail_on = [], 0, fail_on

  def stream(self, prompts, max_new_tokens, params):
    self.calls.append((len(prompts), max_new_tokens, params))
    if self.fail_on is not None and any(int(p.input_ids[0]) == self.fail_on for p in prompts):
      raise RuntimeError("engine exploded")
    rows = [self._row(p.input_ids, max_new_tokens) for p in prompts]
    for start in range(0, max_new_tokens, 3):
      self.chunks_pulled += 1
      yield [np.asarray(r[start:start + 3], np.int32) for r in rows]
      if all(start + 3 >= len(r) for r in rows):
        return

  @staticmethod
  def _row(ids, n):
    ids = [int(i) for i in ids]
    tokens = [100 + ids[0] + k for k in range(n)]
    if ids[-1] == -1:  # planned EOS
      tokens = tokens[:ids[0] - 1] + [2]
    return tokens


class ListSink:
  def __init__(self, stop_after=None):
    self.tokens, self.reason, self.error, self.stop_after = [], None, None, stop_after
    self.cancelled = False
    self.done = threading.Event()

  def feed(self, tokens):
    self.tokens.extend(int(t) for t in tokens)
    return self.stop_after is not None and len(self.tokens) >= self.stop_after

  def finish(self, reason):
    self.reason = reason
    self.done.set()

  def fail(self, error):
    self.error = error
    self.done.set()


def _job(first, max_new=7, sink=None, sampling=SamplingParams(), seeded=False, eos=False):
  ids = np.asarray([first, 5] + ([-1] if eos else []), np.int32)
  return Job(Prompt(ids), max_new, sampling, sink or ListSink(), seeded)


def _run_jobs(engine, jobs, max_batch=8):
  batcher = RequestBatcher(engine, max_batch=max_batch, wait_s=2.0)
  batcher.start()
  try:
    for job in jobs:
      batcher.submit(job)
    for job in jobs:
      assert job.sink.done.wait(10)
  finally:
    batcher.stop()
  return batcher


# ---- batcher ------------------------------------------------------------------------------------


def test_batcher_runs_one_batch_with_per_row_limits_eos_and_stops():
  engine = FakeEngine()
  jobs = [_job(1, max_new=7), _job(2, max_new=2), _job(4, max_new=9, eos=True), _job(5, sink=ListSink(stop_after=4))]
  batcher = _run_jobs(engine, jobs, max_batch=4)
  assert batcher.batch_sizes == [4] and engine.calls[0][:2] == (4, 9)
  assert jobs[0].sink.tokens == [101 + k for k in range(7)] and jobs[0].sink.reason == "length"
  assert jobs[1].sink.tokens == [102, 103] and jobs[1].sink.reason == "length"
  assert jobs[2].sink.tokens == [104, 105, 106, 2] and jobs[2].sink.reason == "stop"
  assert jobs[3].sink.tokens == [105 + k for k in range(6)] and jobs[3].sink.reason == "stop"  # whole chunks
  assert engine.chunks_pulled == 3  # the 9-token budget was not used up: every row had ended


def test_batcher_groups_by_sampling_settings():
  hot = SamplingParams(temperature=0.7, top_p=0.9)
  jobs = [_job(1), _job(2, sampling=hot), _job(3, sampling=SamplingParams(seed=5)),  # greedy ignores seeds
          _job(4, sampling=hot), _job(5, sampling=SamplingParams(temperature=0.7, seed=3), seeded=True),
          _job(6, sampling=SamplingParams(temperature=0.7, seed=3), seeded=True)]
  assert [[j.prompt.input_ids[0] for j in g] for g in group_jobs(jobs)] == [[1, 3], [2, 4], [5], [6]]
  engine = FakeEngine()
  _run_jobs(engine, jobs, max_batch=6)
  seeds = [params.seed for rows, _, params in engine.calls if params.temperature > 0]
  assert [rows for rows, _, _ in engine.calls] == [2, 2, 1, 1] and seeds[1:] == [3, 3]  # seeded: as asked
  assert all(j.sink.reason == "length" for j in jobs)


def test_batcher_survives_a_failing_batch_and_skips_cancelled_requests():
  engine = FakeEngine(fail_on=9)
  bad, gone, good = _job(9), _job(3), _job(4)
  gone.sink.cancelled = True
  batcher = RequestBatcher(engine, max_batch=1, wait_s=0)
  batcher.start()
  try:
    for job in (bad, gone, good):
      batcher.submit(job)
    assert bad.sink.done.wait(10) and good.sink.done.wait(10)
  finally:
    batcher.stop()
  assert isinstance(bad.sink.error, RuntimeError) and good.sink.reason == "length"
  assert gone.sink.tokens == [] and batcher.batch_sizes == [1, 1]


# ---- text streaming -----------------------------------------------------------------------------


def _collect(stop, chunks, finish="length"):
  """Feeds chunks of token ids (id = a character's code point) and returns (deltas, events)."""

  async def run():
    out = RequestOutput(lambda ids: "".join(map(chr, ids)), stop, asyncio.get_running_loop())
    stopped = False
    for chunk in chunks:
      if out.feed(np.asarray([ord(c) for c in chunk])):
        stopped = True
        break
    out.finish("stop" if stopped else finish)
    await asyncio.sleep(0)
    events = []
    while not out.events.empty():
      events.append(out.events.get_nowait())
    return events

  events = asyncio.run(run())
  return [v for k, v in events if k == "text"], events[-1]


def test_text_stream_holds_back_possible_stop_strings():
  deltas, end = _collect(["STOP"], ["ab S", "TO", "P and more"])
  assert deltas == ["ab "] and end == ("done", "stop")  # "S", "STO" were held back, then cut
  deltas, end = _collect(["STOP"], ["ab S", "TOx", "y"])
  assert deltas == ["ab ", "STOx", "y"] and end == ("done", "length")  # a false alarm is released
  deltas, _ = _collect(["\n\n", "END"], ["one\n", "\ntwo"])
  assert "".join(deltas) == "one"
  deltas, _ = _collect([], ["caf", "\ufffd", "é!"])  # a split character waits for its bytes
  assert deltas == ["caf", "\ufffdé!"]


# ---- the real server ----------------------------------------------------------------------------

# The LLaVA-1.5-hf chat template's shape: role, image lines, then the text.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

LIMITS = Limits(max_body_bytes=2**20, max_image_bytes=20_000, max_image_pixels=128 * 128, max_images=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  from hf_fixtures import tiny_hf_model
  from tokenizer_fixture import build_tiny_tokenizer
  from llava_jax.data.images import ImageProcessor
  folder = tmp_path_factory.mktemp("served")
  tiny_hf_model(seed=3).save_pretrained(folder)
  build_tiny_tokenizer(folder)
  ImageProcessor.default(28).save(folder)
  (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
  return folder


@pytest.fixture(scope="module")
def service(model_dir):
  return load_service(str(model_dir), model_id=MODEL_ID, max_batch=8, batch_wait_ms=5, limits=LIMITS)


@pytest.fixture(scope="module")
def client(service):
  import uvicorn
  sock = listen_socket("127.0.0.1", 0)
  port = sock.getsockname()[1]
  uv = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
  thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not uv.started:
    assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
    time.sleep(0.05)
  # trust_env=False: no proxy from the environment may see these requests.
  with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, trust_env=False) as http:
    yield http
  uv.should_exit = True
  thread.join(30)
  assert not thread.is_alive()


def _png(size=(30, 40), seed=0, noise=True) -> bytes:
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, size + (3,), dtype=np.uint8) if noise else np.full(size + (3,), 90, np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def _data_url(data: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(data).decode()


def _request(text, image=None, **fields):
  content = text if image is None else [{"type": "image_url", "image_url": {"url": _data_url(image)}},
                                        {"type": "text", "text": text}]
  body = {"model": MODEL_ID, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
          "temperature": 0}
  body.update(fields)
  return body


# Eight different requests; all fall in one prompt-length bucket, so one program serves them.
CASES = [("What is in the image?", 0), ("How many shapes are there?", 1), ("Is there a green cat?", 2),
         ("Left, right, top or bottom?", 3),
         ("What is in the image? Be polite and detailed.", None),
         ("The quick brown fox jumps over the lazy dog 0123 times!", None),
         ("Describe the picture.", 4), ("Yes or no?", 5)]


@pytest.fixture(scope="module")
def expected(service):
  """Each case run alone the `llava-jax generate` way: prepare, then run.stream_text (greedy)."""
  session, answers = service.session, []
  for text, seed in CASES:
    images = [] if seed is None else [Image.open(io.BytesIO(_png(seed=seed)))]
    inputs = session.processor.prepare(text, images)
    prompt = Prompt.of(inputs)
    answer = "".join(run.stream_text(session, prompt, MAX_TOKENS, SamplingParams()))
    tokens = np.concatenate([rows[0] for rows in session.engine.stream([prompt], MAX_TOKENS)])
    reason = "stop" if tokens[-1] in session.engine.eos_token_ids else "length"
    answers.append((answer, reason, len(inputs.input_ids), len(tokens)))
  return answers


def _stream(client, body) -> tuple[list[dict], str]:
  events = []
  with client.stream("POST", "/v1/chat/completions", json=dict(body, stream=True)) as response:
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    for line in response.iter_lines():
      if line.startswith("data: "):
        events.append(line[len("data: "):])
  assert events[-1] == "[DONE]"
  chunks = [json.loads(e) for e in events[:-1]]
  assert all(c["object"] == "chat.completion.chunk" for c in chunks)
  text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
  return chunks, text


def test_models_lists_the_model(client):
  response = client.get("/v1/models")
  assert response.status_code == 200
  assert [m["id"] for m in response.json()["data"]] == [MODEL_ID]


def test_concurrent_requests_are_batched_and_each_equals_its_solo_run(client, service, expected):
  service.batcher.wait_s = 2.0  # the eight requests below surely land in one batch
  service.batcher.batch_sizes.clear()
  streamed = {1, 6}  # streaming and whole answers share the batch
  try:
    with concurrent.futures.ThreadPoolExecutor(len(CASES)) as pool:
      futures = []
      for i, (text, seed) in enumerate(CASES):
        body = _request(text, None if seed is None else _png(seed=seed))
        if i in streamed:
          futures.append(pool.submit(_stream, client, body))
        else:
          futures.append(pool.submit(client.post, "/v1/chat/completions", json=body))
      results = [f.result() for f in futures]
  finally:
    service.batcher.wait_s = 0.005
  assert service.batcher.batch_sizes == [8]
  for i, (result, (text, reason, prompt_tokens, completion_tokens)) in enumerate(zip(results, expected)):
    if i in streamed:
      chunks, got = result
      assert got == text and chunks[-1]["choices"][0]["finish_reason"] == reason
      continue
    assert result.status_code == 200, result.text
    body = result.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL_ID
    assert body["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert body["choices"][0]["finish_reason"] == reason
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}


def test_streaming_concatenates_to_the_whole_answer(client, expected):
  text, seed = CASES[0]
  body = _request(text, _png(seed=seed), stream_options={"include_usage": True})
  chunks, streamed = _stream(client, body)
  whole = client.post("/v1/chat/completions", json=_request(text, _png(seed=seed))).json()
  assert streamed == whole["choices"][0]["message"]["content"] == expected[0][0]
  assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
  assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) >= 2
  assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
  assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_stop_strings_cut_the_answer(client, expected):
  text, seed = CASES[0]
  answer = expected[0][0]
  assert len(answer) >= 6, answer
  stop = answer[3:6]
  want = answer[:answer.find(stop)]
  body = _request(text, _png(seed=seed), stop=[stop, "never-generated-ZZZ"])
  whole = client.post("/v1/chat/completions", json=body).json()
  assert whole["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": want},
                                 "finish_reason": "stop"}
  assert _stream(client, body)[1] == want


def _bad_requests():
  good = _request("Hi")
  big_noise = _png((120, 120), seed=1)  # about 43 KB: over the 20 KB limit
  assert len(big_noise) > LIMITS.max_image_bytes
  many_pixels = _png((200, 200), noise=False)  # small file, 40,000 pixels: over 128 x 128
  assert len(many_pixels) < LIMITS.max_image_bytes
  truncated = _png(seed=2)[:200]
  yield "malformed JSON", b'{"model": "tiny-llava", "messages": [', 400, "invalid_json"
  yield "not an object", b"[1, 2]", 400, "invalid_json"
  yield "no messages", {"model": MODEL_ID}, 400, "invalid_value"
  yield "empty messages", dict(good, messages=[]), 400, "invalid_value"
  yield "bad role", dict(good, messages=[{"role": "robot", "content": "hi"}]), 400, "invalid_value"
  yield "bad part type", _request("x") | {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, \
      "invalid_value"
  yield "temperature as text", dict(good, temperature="hot"), 400, "invalid_value"
  yield "negative temperature", dict(good, temperature=-1), 400, "invalid_value"
  yield "top_p zero", dict(good, top_p=0), 400, "invalid_value"
  yield "zero max_tokens", dict(good, max_tokens=0), 400, "invalid_value"
  yield "n=2", dict(good, n=2), 400, "invalid_value"
  yield "five stop strings", dict(good, stop=["a", "b", "c", "d", "e"]), 400, "invalid_value"
  yield "unknown model", dict(good, model="gpt-4"), 404, "model_not_found"
  yield "not an image", _request("x", b"this is not an image"), 400, "invalid_image"
  yield "truncated image", _request("x", truncated), 400, "invalid_image"
  yield "bad base64", dict(good, messages=[{"role": "user", "content": [
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]), 400, "invalid_image"
  yield "image over the byte limit", _request("x", big_noise), 400, "image_too_large"
  yield "image over the pixel limit", _request("x", many_pixels), 400, "image_too_large"
  for url in ("http://127.0.0.1:9/cat.png", "file:///etc/passwd"):
    yield f"{url} URL", dict(good, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}]), 400, "unsupported_image_url"
  yield "too many images", dict(good, messages=[{"role": "user", "content": [
      {"type": "image_url", "image_url": {"url": _data_url(_png(seed=s))}} for s in range(3)]}]), 400, \
      "too_many_images"
  yield "image in an assistant message", dict(good, messages=[
      {"role": "user", "content": "hi"},
      {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": _data_url(_png())}}]},
      {"role": "user", "content": "and?"}]), 400, "invalid_value"
  yield "ends with the assistant", dict(good, messages=[{"role": "assistant", "content": "hi"}]), 400, \
      "invalid_value"
  yield "an <image> tag without an image", _request("look: <image>"), 400, "invalid_messages"
  yield "max_tokens over the context", dict(good, max_tokens=600), 400, "context_length_exceeded"
  yield "prompt over the context", _request("times! " * 400, max_tokens=1), 400, "context_length_exceeded"
  yield "body over the limit", _request("x" * (LIMITS.max_body_bytes + 10)), 413, "request_too_large"


def test_bad_requests_get_4xx_and_the_server_keeps_serving(client, expected):
  text, seed = CASES[4]
  good = _request(text)
  for name, body, status, code in _bad_requests():
    if isinstance(body, bytes):
      response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
      response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, (name, response.text)
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"], (name, error)
    after = client.post("/v1/chat/completions", json=good)
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == expected[4][0], name
  missing = client.get("/v1/nothing-here")
  assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
