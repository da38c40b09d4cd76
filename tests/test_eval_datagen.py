"""Generated data (App. B, C): templates, validation, the LLM client against a local stub
server (retries after 429/500, rate limiting, validation feedback) and resume after interruption."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from medsight.data.taxonomy import Taxonomy
from medsight.data.datagen.diagseg_builder import build_diagseg
from medsight.data.datagen.grounding_conversations import build_grounding_conversations
from medsight.data.datagen.jsonl_store import JsonlStore
from medsight.data.datagen.llm_client import ChatClient, LLMError, parse_json_reply
from medsight.data.datagen.llm_generator import LLMGenerator
from medsight.data.datagen.records import RegionInfo, Triple
from medsight.data.datagen.templates import TemplateGenerator
from medsight.data.datagen.validation import mask_files_in_token_order, validate_conversation, validate_diagseg_qa


def make_triple(index: int, token_base: int = 0, lesion: str = "tumor") -> Triple:
    return Triple(
        triple_id=f"img{index:02d}",
        image=f"images/img{index:02d}.png",
        modality="CT",
        regions=(
            RegionInfo("liver", "liver in abdomen CT", f"masks/img{index:02d}_liver.png", False, f"[C0_{token_base}]"),
            RegionInfo(lesion, f"{lesion} in liver in abdomen CT, upper left", f"masks/img{index:02d}_{lesion}.png", True, f"[C0_{token_base + 1}]", host="liver"),
        ),
        findings=tuple(sorted(Taxonomy.synthetic().lesion_classes)),
    )


# ---------------------------------------------------------------------------- validation


def test_template_output_is_valid_and_deterministic():
    triple = make_triple(1)
    generator = TemplateGenerator(seed=4)
    question, answer = generator.diagseg_qa(triple, triple.lesions[0])
    assert validate_diagseg_qa(question, answer, triple.lesions[0], triple) == []
    assert "tumor" not in question.lower() and "[C0_1]" in answer
    turns = generator.conversation(triple)
    assert validate_conversation(turns, triple) == []
    assert turns == TemplateGenerator(seed=4).conversation(triple)
    assert mask_files_in_token_order(turns, triple)[0] == "masks/img01_liver.png"


@pytest.mark.parametrize(
    "question, answer, problem",
    [
        ("Is this a tumor? Segment it.", "A tumor [C0_1].", "gives the diagnosis away"),
        ("What is it?", "Something odd [C0_1].", "does not name the diagnosis"),
        ("What is it?", "A tumor and a cyst [C0_1].", "not in the image: cyst"),
        ("What is it?", "A tumor in the lower right [C0_1].", "description says otherwise"),
        ("What is it?", "A tumor [C0_7].", "exactly the region token"),
        ("What is it?", "A tumor.", "exactly the region token"),
        ("What is it [C0_1]?", "A tumor [C0_1].", "must not contain region tokens"),
        ("What is it?", "A tumor in the kidney [C0_1].", None),  # kidney is not in this image: no structure conflict
        ("", "A tumor [C0_1].", "empty"),
    ],
)
def test_diagseg_validation_catches_drift(question, answer, problem):
    triple = make_triple(1)
    problems = validate_diagseg_qa(question, answer, triple.lesions[0], triple)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


def test_conversation_validation():
    triple = make_triple(1)
    good = [("human", "What is shown?"), ("gpt", "The liver [C0_0] with a tumor [C0_1].")]
    assert validate_conversation(good, triple) == []
    bad_cases = {
        "belongs to no region": [("human", "q"), ("gpt", "The liver [C0_0], a tumor [C0_1] and [C5_5].")],
        "cannot know region codes": [("human", "Show [C0_0]"), ("gpt", "The liver [C0_0], a tumor [C0_1].")],
        "without naming its region": [("human", "q"), ("gpt", "Here [C0_0]. A tumor [C0_1].")],
        "never used": [("human", "q"), ("gpt", "The liver [C0_0].")],
        "even number": [("human", "q")],
    }
    for problem, turns in bad_cases.items():
        assert any(problem in p for p in validate_conversation(turns, triple)), problem
    # One-[SEG] ablation: both regions share the token; each occurrence maps to the region named before it.
    seg = Triple("s", "i.png", "CT", tuple(RegionInfo(r.class_name, r.description, r.mask_file, r.is_lesion, "[SEG]") for r in triple.regions), triple.findings)
    turns = [("human", "q"), ("gpt", "The tumor [SEG] sits in the liver [SEG].")]
    assert validate_conversation(turns, seg) == []
    assert mask_files_in_token_order(turns, seg) == ["masks/img01_tumor.png", "masks/img01_liver.png"]


# ---------------------------------------------------------------------------- stub LLM server


class StubLLM:
    """An OpenAI-compatible /chat/completions endpoint driven by a script of status codes."""

    def __init__(self, script=()):
        self.script = list(script)  # status codes to return before answering normally
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.fail_after: int | None = None  # answer this many times, then return 500 forever
        self.invalid_first = False  # first successful reply breaks validation
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                stub.headers.append(dict(self.headers))
                status = stub.script.pop(0) if stub.script else 200
                answered = sum(1 for r in stub.requests) - 1
                if stub.fail_after is not None and answered >= stub.fail_after:
                    status = 500
                if status != 200:
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(b'{"error": "try later"}')
                    return
                content = stub.reply(body)
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def reply(self, body: dict) -> str:
        prompt = body["messages"][1]["content"]
        finding = re.search(r"the finding \(([^)]+)\)", prompt).group(1)
        token = re.search(r"region code (\[C\d+_\d+\])", prompt).group(1)
        if self.invalid_first:
            self.invalid_first = False
            return json.dumps({"question": f"Is this a {finding}?", "answer": f"A {finding} {token}."})
        return "```json\n" + json.dumps({"question": "What abnormality is seen? Segment it.", "answer": f"It is a {finding} {token}."}) + "\n```"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def client_for(stub: StubLLM, sleeps: list, **kwargs) -> ChatClient:
    return ChatClient(stub.url, "stub-model", api_key="test-key", sleep=sleeps.append, backoff_s=0.5, requests_per_minute=0, **kwargs)


def test_client_retries_after_429_and_500(tmp_path):
    sleeps: list[float] = []
    with StubLLM(script=[429, 500]) as stub:
        generator = LLMGenerator(client_for(stub, sleeps), max_attempts=1)
        triples = [make_triple(1)]
        report = build_diagseg(triples, generator, tmp_path / "diagseg.json", progress=False)
    assert report.written == 1 and len(stub.requests) == 3
    assert sleeps == [0.0, 1.0]  # Retry-After: 0 honoured, then backoff 0.5 * 2**1
    assert stub.headers[0]["Authorization"] == "Bearer test-key" and stub.requests[0]["model"] == "stub-model"
    entry = json.loads((tmp_path / "diagseg.json").read_text())[0]
    assert entry["conversations"][1]["value"] == "It is a tumor [C0_1]."
    assert entry["mask_files"] == ["masks/img01_tumor.png"] and entry["diagnosis"] == "tumor"


def test_validation_feedback_then_fallback(tmp_path):
    sleeps: list[float] = []
    with StubLLM() as stub:
        stub.invalid_first = True
        generator = LLMGenerator(client_for(stub, sleeps), max_attempts=2)
        question, answer = generator.diagseg_qa(make_triple(1), make_triple(1).lesions[0])
        assert "tumor" not in question.lower() and len(stub.requests) == 2
        assert "gives the diagnosis away" in stub.requests[1]["messages"][-1]["content"]
        # Always invalid and one attempt: the template text is used instead.
        stub.invalid_first = True
        fallback = LLMGenerator(client_for(stub, sleeps), max_attempts=1, fallback=TemplateGenerator())
        triple = make_triple(2)
        assert fallback.diagseg_qa(triple, triple.lesions[0]) == TemplateGenerator().diagseg_qa(triple, triple.lesions[0])
        assert fallback.fallbacks_used == 1


def test_non_retryable_error_and_exhausted_retries():
    sleeps: list[float] = []
    with StubLLM(script=[401]) as stub:
        with pytest.raises(LLMError, match="HTTP 401"):
            client_for(stub, sleeps).complete([{"role": "user", "content": "x"}])
        assert len(stub.requests) == 1
    with StubLLM(script=[503, 503, 503]) as stub:
        with pytest.raises(LLMError, match="gave up after 3 attempts"):
            client_for(stub, sleeps, max_retries=2).complete([{"role": "user", "content": "x"}])


def test_rate_limit_spaces_requests():
    sleeps: list[float] = []
    now = [100.0]
    client = ChatClient("http://unused", "m", requests_per_minute=30, sleep=lambda s: (sleeps.append(s), now.__setitem__(0, now[0] + s)), clock=lambda: now[0])
    client._wait_for_rate_limit()
    now[0] += 0.5
    client._wait_for_rate_limit()
    assert sleeps == [pytest.approx(1.5)]  # 30 rpm = one request every 2 s


def test_resume_after_interruption(tmp_path):
    triples = [make_triple(i, token_base=2 * i) for i in range(5)]
    output = tmp_path / "diagseg.json"
    sleeps: list[float] = []
    with StubLLM() as stub:
        stub.fail_after = 2  # the endpoint dies after two items
        generator = LLMGenerator(client_for(stub, sleeps, max_retries=1), max_attempts=1)
        with pytest.raises(LLMError):
            build_diagseg(triples, generator, output, progress=False)
    assert not output.exists()
    assert len((tmp_path / "diagseg.work" / "items.jsonl").read_text().splitlines()) == 2
    with StubLLM() as stub:
        report = build_diagseg(triples, LLMGenerator(client_for(stub, sleeps), max_attempts=1), output, progress=False)
        assert len(stub.requests) == 3  # only the remaining items were requested
    assert report.written == 5 and report.generated_now == 3
    assert [e["id"] for e in json.loads(output.read_text())] == [f"img{i:02d}__tumor" for i in range(5)]


def test_jsonl_store_drops_torn_last_line(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"key": "a", "v": 1}\n{"key": "b", "v"')
    store = JsonlStore(path)
    assert "a" in store and "b" not in store and len(store) == 1
    store.append({"key": "b", "v": 2})
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b"]
    with pytest.raises(ValueError, match="not generated yet"):
        store.finalize(tmp_path / "out.json", ["a", "b", "c"])


def test_grounding_conversations_template_and_token_requirement(tmp_path):
    triples = [make_triple(i, token_base=2 * i) for i in range(3)]
    report = build_grounding_conversations(triples, TemplateGenerator(), tmp_path / "conv.json", progress=False)
    entries = json.loads((tmp_path / "conv.json").read_text())
    assert report.written == 3 and entries[0]["conversations"][0]["value"].startswith("<image>\n")
    for entry in entries:
        tokens = [t for turn in entry["conversations"] if turn["from"] == "gpt" for t in re.findall(r"\[C\d+_\d+\]", turn["value"])]
        assert len(tokens) == len(entry["mask_files"])
    untokened = Triple("x", "x.png", "CT", (RegionInfo("liver", "liver", "m.png", False, None),))
    with pytest.raises(ValueError, match="without a region token"):
        build_grounding_conversations([untokened], TemplateGenerator(), tmp_path / "c2.json", progress=False)


def test_env_configuration_and_reply_parsing(monkeypatch):
    for key in ("MEDSIGHT_LLM_BASE_URL", "OPENAI_BASE_URL", "MEDSIGHT_LLM_MODEL"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(LLMError, match="MEDSIGHT_LLM_BASE_URL"):
        ChatClient.from_env()
    monkeypatch.setenv("MEDSIGHT_LLM_BASE_URL", "http://localhost:9/v1")
    monkeypatch.setenv("MEDSIGHT_LLM_MODEL", "m")
    monkeypatch.setenv("MEDSIGHT_LLM_RPM", "12")
    client = ChatClient.from_env()
    assert client.requests_per_minute == 12 and client._url() == "http://localhost:9/v1/chat/completions"
    assert parse_json_reply('Sure! {"a": 1} hope that helps') == {"a": 1}
    with pytest.raises(ValueError):
        parse_json_reply("no json here")
