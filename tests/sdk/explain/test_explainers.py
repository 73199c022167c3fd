"""Explainers against real things: a knowledge-base file, an OpenAI-protocol HTTP server on loopback, a tiny LM."""
from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler

import pytest

from clipmatch.errors import ExplainerError
from clipmatch.explain.explainers import (
    CachedExplainer,
    KnowledgeBaseExplainer,
    OpenAIExplainer,
    clean_explanation,
    normalise,
    query_names,
)

from .loopback import LoopbackEndpoint, send

KB = {"Kestrel-7 valve": "a blue circle with yellow stripes and a white dot",
      "Kestrel valve": "a red square with green dots",
      "Orrin pump": "a green star with purple checks and a black rim"}


class ChatServer(LoopbackEndpoint):
    """Speaks the chat-completions protocol; ``script`` says what each request gets, by query text."""

    def __init__(self):
        self.requests: list[dict] = []
        self.behaviour: dict[str, list[str]] = {}  # query -> answers in order ("ok", "429", "500", ...)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                prompt = body["messages"][-1]["content"]
                query = prompt.rsplit("Query: ", 1)[-1]
                plan = server.behaviour.get(query, ["ok"])
                what = plan.pop(0) if len(plan) > 1 else plan[0]
                if what == "slow":
                    time.sleep(1.0)
                    what = "ok"
                if what in ("429", "500"):
                    return send(self, int(what), b'{"error": "busy"}')
                if what == "malformed":
                    return send(self, 200, b'{"choices": [{"mess')
                content = {"empty": "", "name only": query}.get(
                    what, f"The {query} is a green star with purple checks. It is made of brass.")
                send(self, 200, json.dumps({"choices": [{"message": {"role": "assistant",
                                                                     "content": content}}]}).encode())

        self._serve(Handler)


@pytest.fixture()
def chat():
    s = ChatServer()
    yield s
    s.close()


def test_knowledge_base_finds_mentions_ignoring_case_and_punctuation(tmp_path):
    path = tmp_path / "kb.json"
    path.write_text(json.dumps(KB))
    kb = KnowledgeBaseExplainer(path)
    assert kb.explain("a photo of the KESTREL 7 valve!").text == KB["Kestrel-7 valve"]  # longest mention wins
    assert kb.explain("the kestrel valve, again").text == KB["Kestrel valve"]
    missing = kb.explain("a red circle")
    assert not missing.ok and "no entity" in missing.error and missing.query == "a red circle"
    lines = tmp_path / "kb.jsonl"
    lines.write_text("\n".join(json.dumps({"entity": k, "explanation": v}) for k, v in KB.items()) + "\n")
    assert KnowledgeBaseExplainer(lines).explain("the Orrin pump").text == KB["Orrin pump"]
    assert normalise(" Orrin--Pump ") == "orrin pump"


def test_knowledge_base_problems_are_named(tmp_path):
    with pytest.raises(ExplainerError, match="knowledge base not found"):
        KnowledgeBaseExplainer(tmp_path / "nope.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"entity": "A", "explanation": "x"}) + "\n{oops\n")
    with pytest.raises(ExplainerError, match=r"bad.jsonl:2:"):
        KnowledgeBaseExplainer(bad)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ExplainerError, match="JSON object of entity -> description"):
        KnowledgeBaseExplainer(tmp_path / "list.json")


def test_endpoint_explainer_speaks_the_protocol_with_the_key_from_the_environment(chat, monkeypatch):
    monkeypatch.setenv("CLIPMATCH_TEST_KEY", "sk-test")
    e = OpenAIExplainer(chat.base_url, "tiny-llm", api_key_env="CLIPMATCH_TEST_KEY", backoff_s=0.01)
    out = e.explain("the Orrin pump")
    assert out.ok and out.text == "a green star with purple checks"  # the look, cleaned of the answer around it
    raw = OpenAIExplainer(chat.base_url, "tiny-llm", clean=False).explain("the Orrin pump")
    assert raw.text == "The the Orrin pump is a green star with purple checks. It is made of brass."
    assert raw.source != out.source  # cleaned and raw answers are cached apart
    req = chat.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "tiny-llm" and "Do not repeat its name" in req["body"]["messages"][0]["content"]


def test_endpoint_failures_never_lose_the_query(chat):
    chat.behaviour = {"busy": ["429", "429", "ok"], "down": ["500"], "broken": ["malformed"], "blank": ["empty"],
                      "slow": ["slow"], "the Zarn-9 tap": ["name only"]}
    e = OpenAIExplainer(chat.base_url, "m", timeout_s=0.3, retries=2, backoff_s=0.01, concurrency=3)
    got = {x.query: x for x in e.explain_many(["busy", "down", "broken", "blank", "slow", "fine", "the Zarn-9 tap"])}
    assert "nothing the query does not say: 'the Zarn-9 tap'" in got["the Zarn-9 tap"].error
    assert got["the Zarn-9 tap"].final and not got["down"].final  # settled, against worth another try
    assert got["busy"].ok  # retried through two 429s
    assert not got["down"].ok and "500" in got["down"].error and "after 3 attempts" in got["down"].error
    assert "malformed" in got["broken"].error and "empty" in got["blank"].error
    assert "timed out" in got["slow"].error
    assert got["fine"].ok and len(got) == 7
    with pytest.raises(ExplainerError, match="must start with http"):
        OpenAIExplainer("localhost:8000", "m")


K7 = "the Kestrel-7 valve"


@pytest.mark.parametrize("answer, query, look", [
    ("The Kestrel-7 valve is a blue circle with yellow stripes.", K7, "a blue circle with yellow stripes"),
    ("It looks like an orange star with green dots. It is used in boilers.", "a photo of the Orrin pump",
     "an orange star with green dots"),
    ('"A red square with a white rim"', "the Orrin pump", "A red square with a white rim"),
    ("This is a Kestrel-7: a blue circle", K7, "a blue circle"),
    ("**Kestrel-7 valve:** a blue circle", K7, "a blue circle"),
    # Preambles, lists, abbreviations and adverbs around the look.
    ("Sure! The Kestrel-7 valve is typically a blue circle.", K7, "a blue circle"),
    ("1. A blue circle. 2. Yellow stripes.", K7, "A blue circle"),
    ("St. Mary's bell is a bronze bell with a green patina.", "St. Mary's bell", "a bronze bell with a green patina"),
    ("A Kestrel-7 valve typically has a blue body with stripes", K7, "a blue body with stripes"),
    # The look in the second sentence: the first sentence names no colour, shape or pattern.
    ("The Kestrel-7 is an industrial valve. It is a blue circle with yellow stripes.", K7,
     "a blue circle with yellow stripes"),
    # A subject that is not the query's thing stays, and so does its colour.
    ("A blue circle that is a bit shiny", "the Orrin pump", "A blue circle that is a bit shiny"),
    ("A green pump that is a star with purple checks", "the Orrin pump", "A green pump that is a star with purple checks"),
    # Capitalised colours and shapes in a query are not names.
    ("A white cube with a red cross on it", "a first-aid box with a Red Cross", "A white cube with a red cross on it"),
    ("A red sneaker with a white swoosh", "Nike Air Max 90 in Red", "A red sneaker with a white swoosh"),
    ("The valve is a red star", "the WH-1000XM5 valve", "a red star"),
    # Nothing the query does not already say.
    ("A red circle.", "a red circle", ""),
    ("the Zarn-9 tap", "the Zarn-9 tap", ""),
])
def test_an_answer_is_cleaned_to_the_look_it_describes(answer, query, look):
    assert clean_explanation(answer, query) == look


def test_names_in_a_query_are_found_by_their_shape():
    assert query_names("the Kestrel-7 valve") == ["Kestrel-7"]
    assert query_names("an iPhone in Red") == ["iPhone"]  # a colour is not a name
    assert query_names("Sony WH-1000XM5 headphones") == ["WH-1000XM5"]  # a first capital may just start the query
    assert query_names("Sony WH-1000XM5 headphones", "headphones by Sony, black") == ["Sony", "WH-1000XM5"]
    assert query_names("Red circle left of a blue square") == []


def test_a_settled_failure_is_cached_and_a_cache_from_before_is_read(chat, tmp_path):
    import sqlite3

    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as old:  # the schema before settled failures were kept
        old.execute("CREATE TABLE explanations (key TEXT PRIMARY KEY, query TEXT, explainer TEXT, text TEXT, "
                    "source TEXT, created REAL)")
    chat.behaviour = {"the Zarn-9 tap": ["name only"]}
    cached = CachedExplainer(OpenAIExplainer(chat.base_url, "m", retries=0), db)
    first = cached.explain("the Zarn-9 tap")
    again = cached.explain("the Zarn-9 tap")
    assert not first.ok and first.final and not first.cached
    assert again.cached and again.final and again.error == first.error and len(chat.requests) == 1


def test_an_endpoint_that_is_down_is_a_reported_failure():
    e = OpenAIExplainer("http://127.0.0.1:9/v1", "m", retries=1, backoff_s=0.01, timeout_s=1)
    out = e.explain("the Orrin pump")
    assert not out.ok and "unreachable" in out.error


def test_cache_makes_each_explanation_once_and_survives_a_restart(chat, tmp_path):
    chat.behaviour = {"flaky": ["500", "500", "500", "500", "ok"]}
    db = tmp_path / "explanations.sqlite"
    cached = CachedExplainer(OpenAIExplainer(chat.base_url, "m", retries=0, backoff_s=0.01), db)
    first = cached.explain_many(["a", "b", "a", "flaky"])
    assert [x.cached for x in first] == [False, False, False, False] and len(chat.requests) == 3
    assert not first[3].ok  # failed once: not cached
    cached.close()
    again = CachedExplainer(OpenAIExplainer(chat.base_url, "m", retries=0, backoff_s=0.01), db)
    second = again.explain_many(["a", "b"])
    assert [x.cached for x in second] == [True, True] and [x.text for x in second] == [x.text for x in first[:2]]
    assert len(chat.requests) == 3  # nothing asked again
    # Another prompt is another explainer: its own cache entries.
    other = CachedExplainer(OpenAIExplainer(chat.base_url, "m", prompt="Look of {query}?", retries=0), db)
    assert not other.explain("a").cached and len(chat.requests) == 4


def test_local_causal_lm_explainer_runs_a_tiny_random_model(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from clipmatch.explain.explainers import TransformersExplainer

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "a", "blue", "circle", "the", "orrin", "pump", "query",
                                         ":", "describe", "look", "shape", "with", "dots"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    folder = tmp_path / "lm"
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(vocab), n_positions=128, n_embd=16, n_layer=1, n_head=2,
                                     eos_token_id=1, bos_token_id=1)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    e = TransformersExplainer(folder, max_new_tokens=5)
    out = e.explain("the Orrin pump")
    assert out.query == "the Orrin pump" and out.source == e.identity
    # A random model may well say nothing, or nothing the query does not already say.
    assert out.ok or "empty" in out.error or "nothing the query does not say" in out.error
    raw = TransformersExplainer(folder, max_new_tokens=5, clean=False).explain("the Orrin pump")
    assert raw.ok and len(raw.text.split()) >= 1 and raw.source != out.source
    assert e.explain("the Orrin pump") == out  # greedy: the same every time
    # New weights under the same file names are another explainer: the cache must not serve old answers.
    torch.manual_seed(1)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    assert TransformersExplainer(folder, max_new_tokens=5).identity != e.identity
    with pytest.raises(ExplainerError, match="no causal LM"):
        TransformersExplainer(tmp_path)
