"""`llava-jax eval --judge-url`: LLaVA-Bench and MM-Vet judged by a fake OpenAI-compatible server (scripted
replies; the requests checked against the official prompts' layout), scored against hand-computed numbers; the
judgments cache, unreadable replies, and an unreachable or failing judge."""

import http.server
import json
import socket
import threading

import pytest

import eval_fixtures
from eval_fixtures import eval_cli_error, use_scripted_session
from llava_jax.eval import judge_prompts, runner
from llava_jax.eval.judge import JudgeClient
from llava_jax.eval.tasks import parse_tasks


KEY = "sk-test-secret-123"

# What the fake judge replies, by a line of the request it is asked; the last reply repeats.
SCRIPT = {
    "[Question]\nDescribe the image.": ["8 6\nAssistant 2 is short."],
    "[Question]\nWhat is the man doing?": ["Assistant 1: 9, Assistant 2: 9", "9, 9\nBoth are right."],
    "[Question]\nWhy is it funny?": ["I cannot rate this."],
    "What is written here? | Hello | Hello. | ": ["0.8"],
    "What is x in the equation? | -1 <AND> -5 | x = -1 | ": ["The answer"],
}


class FakeJudge(http.server.ThreadingHTTPServer):
  def __init__(self):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.requests, self.asked = [], {}
    self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(http.server.BaseHTTPRequestHandler):
  def do_POST(self):
    server = self.server
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
    if self.path.startswith("/broken/"):  # an upstream error whose message echoes the key
      return self._send(500, {"error": {"message": f"upstream failed for key {KEY}"}})
    marker = next(m for m in SCRIPT if m in _asked(body))
    n = server.asked[marker] = server.asked.get(marker, -1) + 1
    replies = SCRIPT[marker]
    self._send(200, {"choices": [{"message": {"role": "assistant", "content": replies[min(n, len(replies) - 1)]}}]})

  def _send(self, code, payload):
    data = json.dumps(payload).encode()
    self.send_response(code)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, *args):
    pass


@pytest.fixture
def judge_server():
  server = FakeJudge()
  threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
  yield server
  server.shutdown()
  server.server_close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return eval_fixtures.build(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """The scripted session answers; the runner reads only the model's config.json."""
  folder = tmp_path_factory.mktemp("model")
  (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))
  return folder


@pytest.fixture
def scripted(monkeypatch):
  return use_scripted_session(monkeypatch)


def _asked(body) -> str:
  """The request's last message without MM-Vet's few-shot table (its examples would match the markers)."""
  return body["messages"][-1]["content"].replace(judge_prompts.MM_VET_PROMPT, "")


def _requests(server, text):
  return [r for r in server.requests if text in _asked(r["body"])]


def test_judged_scores_by_hand_and_a_rerun_asks_nothing(data, model, scripted, judge_server, tmp_path, monkeypatch):
  monkeypatch.setenv("MY_JUDGE_KEY", KEY)
  judge = JudgeClient.from_flags(judge_server.url, "judge-1", "MY_JUDGE_KEY")
  out = tmp_path / "out"
  results = runner.eval_command(str(model), "llava_bench,mm_vet", str(data), str(out), batch_size=2, judge=judge)
  # LLaVA-Bench: pairs (reference, ours) = detail (8, 6), conv (9, 9) after one unreadable reply; complex: 3
  # unreadable replies, a failed judgment left out of the means.
  bench = results["llava_bench"]
  assert bench["relative_score"] == pytest.approx((6 + 9) / (8 + 9) * 100)
  assert bench["by_category"] == {"conv": pytest.approx(100.0), "detail": pytest.approx(75.0)}
  assert (bench["reference_mean"], bench["model_mean"]) == (pytest.approx(8.5), pytest.approx(7.5))
  assert bench["judge"] == "judge-1"
  assert (bench["judged"], bench["judge_failures"], bench["judge_failure_ids"]) == (3, 1, ["2"])
  # MM-Vet: v1_0 (ocr, rec) 0.8; v1_1 (ocr, math): 5 unreadable replies, 0.0 as MM-Vet's evaluator gives.
  vet = results["mm_vet"]
  assert vet["total"] == pytest.approx(40.0)
  assert vet["by_capability"] == {"rec": pytest.approx(80.0), "ocr": pytest.approx(40.0), "math": 0.0}
  assert (vet["judged"], vet["judge_failures"], vet["judge_failure_ids"]) == (2, 1, ["v1_1"])
  assert results == json.loads((out / "results.json").read_text())
  assert runner.table(parse_tasks("llava_bench,mm_vet"), results).splitlines()[2] == "| 88.2 | 40.0 |"

  requests = judge_server.requests
  assert len(requests) == 1 + 2 + 3 + 1 + 5
  assert all(r["auth"] == f"Bearer {KEY}" and r["body"]["model"] == "judge-1" for r in requests)
  assert all(r["path"] == "/v1/chat/completions" for r in requests)
  # LLaVA's review: the caption (context.jsonl's sentences a line each), question, GPT-4's answer as Assistant 1,
  # ours as Assistant 2, the rule; system message, temperature 0.2.
  (detail,) = _requests(judge_server, "Describe the image.")
  assert detail["body"]["messages"] == [
      {"role": "system", "content": "You are a helpful and precise assistant for checking the quality of the answer."},
      {"role": "user", "content": "[Context]\nA man irons on a taxi.\nThe street is busy.\n\n[Question]\nDescribe the "
                                  "image.\n\n[Assistant 1]\nA man irons clothes on the back of a taxi.\n\n[End of "
                                  "Assistant 1]\n\n[Assistant 2]\nA picture.\n\n[End of Assistant 2]\n\n[System]\n"
                                  + judge_prompts.LLAVA_BENCH_RULE + "\n\n"}]
  assert (detail["body"]["temperature"], detail["body"]["max_tokens"]) == (0.2, 1024)
  complex_ = _requests(judge_server, "Why is it funny?")
  assert len(complex_) == 3 and "[Context]\nA cat wears a hat.\n\n" in complex_[0]["body"]["messages"][1]["content"]
  assert "[Assistant 1]\nCats do not wear hats.\n\n" in complex_[0]["body"]["messages"][1]["content"]
  # MM-Vet's grading table, the question's row last with the ground truth's <AND> spaced; retries add the
  # "(digit)" line at rising temperature.
  (written,) = _requests(judge_server, "What is written here?")
  assert written["body"]["messages"] == [
      {"role": "user", "content": judge_prompts.MM_VET_PROMPT + "\nWhat is written here? | Hello | Hello. | "}]
  assert (written["body"]["temperature"], written["body"]["max_tokens"]) == (0.0, 3)
  equation = _requests(judge_server, "What is x in the equation? | -1 <AND> -5 | x = -1 | ")
  assert [r["body"]["temperature"] for r in equation] == [0.0, 0.0, 0.5, 1.0, 1.5]
  suffix = "\nPredict the correctness of the answer (digit): "
  assert [r["body"]["messages"][0]["content"].endswith(suffix) for r in equation] == [False] + [True] * 4

  # The rerun reads every judgment from OUT/TASK/judgments.jsonl: no request, the same results.
  lines = [json.loads(l) for l in (out / "llava_bench" / "judgments.jsonl").read_text().splitlines()]
  assert [(l["question_id"], l["score"], len(l["replies"])) for l in lines] == [
      ("0", [8.0, 6.0], 1), ("1", [9.0, 9.0], 2), ("2", None, 3)]
  asked = len(requests)
  again = runner.eval_command(str(model), "llava_bench,mm_vet", str(data), str(out), batch_size=2, judge=judge)
  assert len(judge_server.requests) == asked and scripted.batches == [2, 2, 2]  # nothing asked twice
  assert again == results



def test_exports_carry_the_judges_inputs(data, model, scripted, judge_server, tmp_path):
  """lmms-lab's exports hold the caption, category and reference (MM-Vet: ground truth, capabilities) in their
  rows: judged from them, the requests and scores are those of LLaVA's layout."""
  judge = JudgeClient.from_flags(judge_server.url, "judge-1", None)
  exports = eval_fixtures.build_exports(tmp_path / "exports")
  results = {}
  for name, root in (("llava", data), ("exports", exports)):
    before = len(judge_server.requests)
    out = runner.eval_command(str(model), "llava_bench,mm_vet", str(root), str(tmp_path / name), batch_size=2,
                              judge=judge)
    results[name] = ({t: {k: v for k, v in out[t].items() if k != "submission"} for t in ("llava_bench", "mm_vet")},
                     sorted(json.dumps(r["body"], sort_keys=True) for r in judge_server.requests[before:]))
    judge_server.asked.clear()  # the second run gets the same scripted replies
  assert results["exports"] == results["llava"]
  assert results["exports"][0]["llava_bench"]["judged"] == 3 and results["exports"][0]["mm_vet"]["judged"] == 2


def test_an_unreachable_or_failing_judge_exits_2_with_one_line(data, model, scripted, judge_server, tmp_path,
                                                              capsys, monkeypatch):
  with socket.socket() as s:  # a port nothing listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  out = tmp_path / "out"
  args = ["--model", str(model), "--data", str(data), "--out", str(out), "--task", "mm_vet", "--judge-model", "j"]
  err = eval_cli_error(capsys, *args, "--judge-url", f"http://127.0.0.1:{port}/v1")
  assert err.startswith(f"llava-jax: error: judge http://127.0.0.1:{port}/v1/chat/completions: cannot connect")
  assert not (out / "results.json").exists() and not (out / "mm_vet" / "judgments.jsonl").exists()
  assert len((out / "mm_vet" / "answers.jsonl").read_text().splitlines()) == 2  # the answers are kept
  monkeypatch.setenv("OPENAI_API_KEY", KEY)  # the default key variable
  err = eval_cli_error(capsys, *args, "--judge-url", judge_server.url.replace("/v1", "/broken/v1"))
  assert "chat/completions: HTTP 500 upstream failed for key ***" in err and KEY not in err
  assert judge_server.requests[-1]["auth"] == f"Bearer {KEY}"
  assert "environment variable NOPE is not set" in eval_cli_error(capsys, *args, "--judge-url", judge_server.url,
                                                               "--judge-key-env", "NOPE")
  assert not (out / "results.json").exists()
  assert "--judge-model/--judge-key-env: also give --judge-url" in eval_cli_error(capsys, *args)


def test_the_judges_files_are_checked_before_the_model_is_asked(model, scripted, judge_server, tmp_path, capsys):
  bench = tmp_path / "data" / "llava-bench-in-the-wild"
  bench.mkdir(parents=True)
  (bench / "questions.jsonl").write_text(json.dumps({"question_id": 0, "image": "w.png", "text": "Describe it.",
                                                     "category": "detail"}) + "\n")
  args = ["--model", str(model), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
          "--task", "llava_bench", "--judge-url", judge_server.url, "--judge-model", "j"]
  assert f"{bench}/answers_gpt4.jsonl: no such file" in eval_cli_error(capsys, *args)
  (bench / "answers_gpt4.jsonl").write_text(json.dumps({"question_id": 0, "text": "A photo."}) + "\n")
  assert f"{bench}/context.jsonl: no such file" in eval_cli_error(capsys, *args)
  assert scripted.batches == [] and judge_server.requests == []
