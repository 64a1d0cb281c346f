"""Judges: the OpenAI-compatible client against a real HTTP server on 127.0.0.1, and the local judge."""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from screener.commands.extract import add_commands
from screener.extract.judges import JudgeError, LocalJudge, OpenAIJudge, _retry_after, integer_expectation
from screener.extract.traits import TraitError, load_trait
from screener.models import load_model


def logprobs_reply(probs: dict[str, float]) -> dict:
    top = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in probs.items()]
    content = [{"token": next(iter(probs)), "logprob": top[0]["logprob"], "top_logprobs": top}]
    return {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "x"}, "logprobs": {"content": content}}
        ]
    }


class FakeOpenAI:
    """A chat-completions server that plays a script of replies, one per request, then repeats the last.

    Each step is ("json", body), ("status", code, headers) or ("slow", seconds, body).
    """

    def __init__(self):
        self.script: list[tuple] = []
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(
                    {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                )
                step = fake.script[min(len(fake.requests), len(fake.script)) - 1]
                if step[0] == "status":
                    self.send_response(step[1])
                    for k, v in step[2].items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "scripted"}}')
                    return
                if step[0] == "slow":
                    time.sleep(step[1])
                data = json.dumps(step[-1]).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out first
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeOpenAI()
    yield server
    server.close()


def judge(fake: FakeOpenAI, **kw) -> OpenAIJudge:
    opts = {"timeout": 0.5, "max_retries": 4, "backoff": 0.01}
    return OpenAIJudge(fake.url, "judge-model", "sk-test", **{**opts, **kw})


def test_integer_expectation():
    assert integer_expectation({"10": 0.5, " 20": 0.25, "abc": 0.25}) == pytest.approx((5 + 5) / 0.75)
    assert integer_expectation({"100": 0.3, "101": 0.6, "-5": 0.1}) == 100  # only 0..100 count
    assert integer_expectation({"7": 0.24, "no": 0.76}) is None  # below 0.25 of the mass
    assert integer_expectation({"7": 0.25, "no": 0.75}) == 7


def test_openai_judge_scores_from_logprobs(fake):
    fake.script = [("json", logprobs_reply({"80": 0.6, "90": 0.3, "Sure": 0.1}))]
    assert judge(fake).score_one("rate this") == pytest.approx((48 + 27) / 0.9)
    req = fake.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "judge-model" and body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["max_tokens"] == 1 and body["messages"] == [{"role": "user", "content": "rate this"}]


def test_openai_judge_low_mass_is_none(fake):
    fake.script = [("json", logprobs_reply({"I": 0.8, "50": 0.2}))]
    assert judge(fake).score_one("rate this") is None


def test_openai_judge_retries_rate_limit_errors_and_timeouts(fake):
    fake.script = [
        ("status", 429, {"Retry-After": "0.3"}),
        ("status", 500, {}),
        ("slow", 1.5, logprobs_reply({"1": 1.0})),  # beyond the 0.5 s client timeout
        ("json", logprobs_reply({"40": 1.0})),
    ]
    started = time.perf_counter()
    assert judge(fake).score_one("q") == 40
    assert len(fake.requests) == 4
    assert time.perf_counter() - started >= 0.3 + 0.5  # honoured Retry-After, waited out the timeout


def test_openai_judge_gives_up_and_does_not_retry_client_errors(fake):
    fake.script = [("status", 503, {})]
    with pytest.raises(JudgeError, match="gave up after 3 attempts"):
        judge(fake, max_retries=2).score_one("q")
    assert len(fake.requests) == 3
    fake.requests.clear()
    fake.script = [("status", 401, {})]
    with pytest.raises(JudgeError, match="HTTP 401"):
        judge(fake).score_one("q")
    assert len(fake.requests) == 1


def test_openai_judge_concurrent_batch_keeps_order(fake):
    fake.script = [("json", logprobs_reply({"30": 1.0}))]
    assert judge(fake, concurrency=4).score(["a", "b", "c", "d", "e"]) == [30] * 5


def test_openai_judge_from_env(monkeypatch):
    monkeypatch.delenv("SCREENER_JUDGE_API_KEY", raising=False)
    monkeypatch.setenv("SCREENER_JUDGE_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("SCREENER_JUDGE_MODEL", "m")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fallback")
    j = OpenAIJudge.from_env()
    assert (j.url, j.model, j.api_key) == ("http://127.0.0.1:9/v1/chat/completions", "m", "sk-fallback")
    monkeypatch.delenv("SCREENER_JUDGE_MODEL")
    with pytest.raises(JudgeError, match="SCREENER_JUDGE_MODEL"):
        OpenAIJudge.from_env()


def test_retry_after_parsing():
    assert _retry_after("2", 9.0, 60.0) == 2.0
    assert _retry_after("500", 9.0, 60.0) == 60.0  # capped
    assert _retry_after(None, 9.0, 60.0) == 9.0
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 9.0, 60.0) == 0.0  # a date in the past
    assert _retry_after("soon", 9.0, 60.0) == 9.0


def test_traits_new_drafts_with_a_generator(fake, tmp_path, monkeypatch):
    draft = {
        "instruction": [{"pos": "Be gloomy.", "neg": "Be cheerful."}],
        "questions": ["How was your day?", "What is the weather like?"],
        "eval_questions": ["Any plans for the weekend?"],
    }
    fake.script = [
        ("json", {"choices": [{"message": {"content": "```json\n" + json.dumps(draft) + "\n```"}}]})
    ]
    monkeypatch.setenv("SCREENER_GENERATOR_BASE_URL", fake.url)
    monkeypatch.setenv("SCREENER_GENERATOR_MODEL", "writer")
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(
        ["traits", "new", "gloomy", "Sees the dark side.", "--traits-dir", str(tmp_path)]
    )
    assert args.func(args) == 0
    trait = load_trait("gloomy", tmp_path)
    assert trait.instructions[0].pos == "Be gloomy." and trait.eval_questions == (
        "Any plans for the weekend?",
    )
    assert "{question}" in trait.eval_prompt and "Sees the dark side." in trait.eval_prompt
    assert fake.requests[0]["body"]["model"] == "writer"


def test_traits_new_scaffold_without_generator(tmp_path, monkeypatch, capsys):
    for var in ("SCREENER_GENERATOR_MODEL", "SCREENER_JUDGE_MODEL"):
        monkeypatch.delenv(var, raising=False)
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(
        ["traits", "new", "gloomy", "Sees the dark side.", "--traits-dir", str(tmp_path)]
    )
    assert args.func(args) == 0
    data = json.loads((tmp_path / "gloomy.json").read_text())
    assert data["name"] == "gloomy" and data["version"] == 1 and data["instruction"] == []
    assert "fill it in" in capsys.readouterr().out
    with pytest.raises(TraitError, match="'instruction'"):
        load_trait(str(tmp_path / "gloomy.json"))
    assert args.func(args) == 2  # refuses to overwrite


def test_local_judge_matches_full_forward_passes(tiny_llama):
    """The cached continuation rows give the same candidate probabilities as separate full passes."""
    model, tok = load_model(str(tiny_llama))
    j = LocalJudge(model, tok)
    prompt = "Rate this answer from 0 to 100: hello"
    dists = j.next_token_probs(prompt)
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for prefix, dist in dists.items():
        with torch.no_grad():
            full = model(input_ids=torch.tensor([ids + list(prefix)])).logits[0, -1].softmax(-1)
        torch.testing.assert_close(dist, full, atol=1e-5, rtol=1e-4)
    probs = j.candidate_probs(dists)
    # by hand for one candidate: product of its tokens' conditionals (times "no further digit" if a prefix)
    seq = j.candidates["7"]
    expected = math.prod(float(dists[seq[:i]][t]) for i, t in enumerate(seq))
    if seq in dists:
        cont = [c[len(seq)] for c in j.candidates.values() if len(c) > len(seq) and c[: len(seq)] == seq]
        expected *= 1 - float(dists[seq][sorted(set(cont))].sum())
    assert probs["7"] == pytest.approx(expected)
    assert j.score_one(prompt) == integer_expectation(probs)
    assert 0 < sum(probs.values()) <= 1 + 1e-6
