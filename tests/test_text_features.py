"""text_features: templates, descriptions files, the chat-completions client (against a local mock
server), text encoders (random-weight open_clip, offline MiniLM), the build CLI and features files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from reference_assets import PAPER_FEATURES

import text_features as tf
from text_features import build as build_cli
from text_features import describe as describe_cli
from text_features.descriptions import normalize_name
from text_features.fileio import sha256_file
from text_features.templates import format_question

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "text_features" / "assets"
FM_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SMALL_CLIP = "ViT-S-32-alt"  # smallest built-in open_clip text tower (256-d), built with random weights


@pytest.fixture
def fm_names_file(tmp_path: Path) -> Path:
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(FM_NAMES) + "\n")
    return path


def assert_unit_rows(feats: torch.Tensor) -> None:
    assert torch.allclose(feats.norm(dim=1), torch.ones(feats.shape[0]), atol=1e-5)


# ------------------------------------------------------------------------------- templates, files


def test_questions_per_dataset_and_articles() -> None:
    assert tf.questions_for("imagenet") == tf.DEFAULT_QUESTIONS
    assert tf.questions_for("fashion-mnist") != tf.DEFAULT_QUESTIONS
    for dataset in ("imagenet", "fashion-mnist", "food101", "gtsrb"):
        assert len(tf.questions_for(dataset)) >= 3
        assert all(q.count("{}") == 1 for q in tf.questions_for(dataset))
    assert "Describe a photo of a {}." in tf.DEFAULT_QUESTIONS  # the paper's example
    assert format_question("Describe what a {} looks like.", "Ankle boot") == "Describe what an Ankle boot looks like."
    assert format_question("How can you identify a {}?", "Sneaker") == "How can you identify a Sneaker?"
    assert tf.CLASSNAME_TEMPLATE == "a photo of a {}"


def test_descriptions_files_both_layouts(tmp_path: Path) -> None:
    ours = tmp_path / "ours.json"
    tf.save_descriptions(ours, {"Ankle boot": ["a boot", "  "], "Bag": ["a bag"]}, {"source": "test"})
    loaded = tf.load_descriptions(ours)
    assert loaded.meta["source"] == "test"
    assert loaded.descriptions == {"Ankle boot": ["a boot"], "Bag": ["a bag"]}  # blanks dropped

    cupl = tmp_path / "cupl.json"
    cupl.write_text(json.dumps({"ankle_boot": ["x1", "x2"], "bag": ["y"]}))
    plain = tf.load_descriptions(cupl)
    assert "plain" in plain.meta["source"]
    assert tf.match_classes(plain.descriptions, ["Ankle boot", "Bag"]) == [["x1", "x2"], ["y"]]
    assert tf.match_classes({"k1": ["a"], "k2": ["b"]}, ["Bag", "Coat"], by="order") == [["a"], ["b"]]
    with pytest.raises(tf.DescriptionsError, match="--match-by order"):
        tf.match_classes({"k1": ["a"], "k2": ["b"]}, ["Bag", "Coat"])
    with pytest.raises(tf.DescriptionsError, match="lacks 1 of 3"):
        tf.match_classes(plain.descriptions, ["Ankle boot", "Bag", "Coat"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"Bag": "not a list"}))
    with pytest.raises(tf.DescriptionsError, match="not a list"):
        tf.load_descriptions(bad)
    assert normalize_name(" Ankle_boot ") == normalize_name("ankle-boot") == "ankle boot"


def test_shipped_fashion_mnist_descriptions() -> None:
    ds = tf.load_descriptions(ASSETS / "fashion-mnist_descriptions.json")
    assert ds.meta["source"] == "hand-written for this project"
    assert list(ds.descriptions) == FM_NAMES
    for texts in ds.descriptions.values():
        assert len(texts) >= 5 and len(set(texts)) == len(texts)


# ----------------------------------------------------------------------------- mock LLM endpoint


class MockLLM:
    """An OpenAI-compatible ``/chat/completions`` server on 127.0.0.1 with canned answers."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.fail_codes: list[int] = []  # statuses to answer with before succeeding
        self.max_choices = 100  # servers that ignore "n" return one choice
        self.lock = threading.Lock()
        mock = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with mock.lock:
                    mock.requests.append(body)
                    mock.headers.append(dict(self.headers))
                    code = mock.fail_codes.pop(0) if mock.fail_codes else 200
                if self.path != "/v1/chat/completions":
                    code = 404
                if code != 200:
                    payload = json.dumps({"error": {"message": f"mock status {code}"}}).encode()
                    self.send_response(code)
                    if code == 429:
                        self.send_header("Retry-After", "0")
                else:
                    question = body["messages"][-1]["content"]
                    n = min(body.get("n", 1), mock.max_choices)
                    choices = [{"index": i, "message": {"role": "assistant", "content": f' "1. {question} answer"'}}
                               for i in range(n)]
                    payload = json.dumps({"object": "chat.completion", "choices": choices}).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def llm() -> Iterator[MockLLM]:
    server = MockLLM()
    yield server
    server.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there any more


QUESTIONS = ["Describe what a {} looks like.", "How can you identify a {}?"]


def test_describe_caches_and_resumes_only_missing_classes(llm: MockLLM, tmp_path: Path) -> None:
    out = tmp_path / "desc.json"
    client = tf.ChatClient(llm.url, "mock-model", "sk-test", backoff=0.0)
    result = tf.describe_classes(client, ["Bag", "Coat", "Ankle boot"], QUESTIONS, out, per_question=2,
                                 dataset="fashion-mnist", progress=False)
    assert len(llm.requests) == 3 * 2  # one request (n=2) per class and question
    assert all(r["model"] == "mock-model" and r["n"] == 2 for r in llm.requests)
    assert llm.headers[0]["Authorization"] == "Bearer sk-test"
    assert result.descriptions["Ankle boot"][0] == "Describe what an Ankle boot looks like. answer"  # cleaned
    assert all(len(v) == 4 for v in result.descriptions.values())
    assert result.meta["llm_model"] == "mock-model" and result.meta["questions"] == QUESTIONS

    # Drop one class, add one: the rerun asks only for those two.
    data = json.loads(out.read_text())
    del data["descriptions"]["Coat"]
    out.write_text(json.dumps(data))
    llm.requests.clear()
    result = tf.describe_classes(client, ["Bag", "Coat", "Ankle boot", "Dress"], QUESTIONS, out,
                                 per_question=2, progress=False)
    asked = {r["messages"][-1]["content"] for r in llm.requests}
    assert len(llm.requests) == 2 * 2 and all(("Coat" in q) or ("Dress" in q) for q in asked)
    assert list(result.descriptions) == ["Bag", "Coat", "Ankle boot", "Dress"]
    llm.requests.clear()
    tf.describe_classes(client, ["Bag", "Coat"], QUESTIONS, out, per_question=2, progress=False)
    assert llm.requests == []  # nothing missing: no request at all


def test_server_without_n_is_asked_again(llm: MockLLM, tmp_path: Path) -> None:
    llm.max_choices = 1
    client = tf.ChatClient(llm.url, "m", backoff=0.0)
    result = tf.describe_classes(client, ["Bag"], QUESTIONS[:1], tmp_path / "d.json", per_question=3, progress=False)
    assert len(result.descriptions["Bag"]) == 3 and len(llm.requests) == 3
    assert "Authorization" not in llm.headers[0]  # no key, no header (local servers)


def test_retries_on_500_and_429_then_succeeds(llm: MockLLM) -> None:
    llm.fail_codes = [500, 429]
    waits: list[float] = []
    client = tf.ChatClient(llm.url, "m", backoff=0.5, sleep=waits.append)
    assert client.complete([{"role": "user", "content": "hi"}]) == [' "1. hi answer"']
    assert client.requests_sent == 3
    assert waits == [0.5, 1.0]  # exponential backoff (Retry-After: 0 does not shorten it)


def test_gives_up_after_max_retries(llm: MockLLM) -> None:
    llm.fail_codes = [503] * 10
    client = tf.ChatClient(llm.url, "m", max_retries=2, sleep=lambda s: None)
    with pytest.raises(tf.LLMError, match="failed 3 times; last error: HTTP 503: mock status 503"):
        client.complete([{"role": "user", "content": "hi"}])


def test_client_errors_are_not_retried(llm: MockLLM) -> None:
    llm.fail_codes = [401]
    client = tf.ChatClient(llm.url, "m", sleep=lambda s: pytest.fail("must not wait"))
    with pytest.raises(tf.LLMError, match="HTTP 401.*OPENAI_API_KEY"):
        client.complete([{"role": "user", "content": "hi"}])
    assert client.requests_sent == 1


def test_rate_limit_spaces_requests(llm: MockLLM) -> None:
    now = [0.0]
    starts = []

    def sleep(seconds: float) -> None:
        now[0] += seconds

    client = tf.ChatClient(llm.url, "m", rate_limit=40.0, sleep=sleep, clock=lambda: now[0])
    for _ in range(5):
        client.complete([{"role": "user", "content": "hi"}])
        starts.append(now[0])
    assert starts == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])


def test_unreachable_endpoint_fails_fast(tmp_path: Path) -> None:
    client = tf.ChatClient(closed_port_url(), "m", sleep=lambda s: pytest.fail("must not retry"))
    with pytest.raises(tf.LLMError, match="cannot reach the chat-completions endpoint"):
        tf.describe_classes(client, ["Bag"], QUESTIONS, tmp_path / "d.json", per_question=1, progress=False)
    assert not (tmp_path / "d.json").exists()


def test_describe_cli(llm: MockLLM, tmp_path: Path, fm_names_file: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", llm.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-cli")
    out = tmp_path / "fm.json"
    argv = ["--class-names", str(fm_names_file), "--out", str(out), "--per-question", "1", "--no-progress",
            "--llm-model", "cli-model", "--rate-limit", "1000", "--temperature", "none", "--max-tokens", "0"]
    assert describe_cli.main(argv) == 0
    assert len(llm.requests) == 10 * len(tf.DEFAULT_QUESTIONS)
    assert llm.requests[0]["model"] == "cli-model" and llm.headers[0]["Authorization"] == "Bearer sk-cli"
    assert "temperature" not in llm.requests[0] and "max_tokens" not in llm.requests[0]
    assert list(tf.load_descriptions(out).descriptions) == FM_NAMES
    assert "10 classes" in capsys.readouterr().out

    monkeypatch.setenv("OPENAI_BASE_URL", closed_port_url())
    assert describe_cli.main(["--class-names", str(fm_names_file), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot reach the chat-completions endpoint")

    monkeypatch.delenv("OPENAI_BASE_URL")
    monkeypatch.delenv("OPENAI_API_KEY")  # OpenAI itself without a key: refused before any request
    assert describe_cli.main(["--class-names", str(fm_names_file), "--out", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.startswith("error: set OPENAI_API_KEY")


# ----------------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def clip_encoder() -> tf.TextEncoder:
    torch.manual_seed(0)
    return tf.build_encoder(f"openclip:{SMALL_CLIP}:none")


def test_openclip_random_weights_match_zero_shot_classifier(clip_encoder: tf.TextEncoder) -> None:
    import open_clip

    assert clip_encoder.embed_dim == 256
    emb = clip_encoder.encode(["a photo of a cat", "a dog", "x"], batch_size=2, progress=False)
    assert emb.shape == (3, 256) and emb.dtype == torch.float32 and not emb.requires_grad
    assert_unit_rows(emb)

    feats, meta = tf.build_text_features(FM_NAMES[:4], "descriptions", encoder=clip_encoder, dataset="fashion-mnist",
                                         progress=False)
    assert feats.shape == (4, 256)
    assert_unit_rows(feats)
    assert meta["descriptions_source"] == "hand-written for this project"
    assert meta["descriptions_sha256"] == sha256_file(ASSETS / "fashion-mnist_descriptions.json")

    templates = ["a photo of a {}", "a drawing of a {}."]
    feats, meta = tf.build_text_features(FM_NAMES, "classname", encoder=clip_encoder, templates=templates,
                                         progress=False)
    tokenizer = open_clip.get_tokenizer(SMALL_CLIP)
    expected = open_clip.build_zero_shot_classifier(clip_encoder.model, tokenizer, FM_NAMES, templates).T
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)
    assert meta["templates"] == templates and meta["encoder"] == f"openclip:{SMALL_CLIP}:none"


def test_openclip_local_checkpoint_file(clip_encoder: tf.TextEncoder, tmp_path: Path) -> None:
    import open_clip

    # The encoder dropped its image tower; a real checkpoint has one: add a random one for the file.
    full = open_clip.create_model(SMALL_CLIP, pretrained=None)
    full.load_state_dict(clip_encoder.model.state_dict(), strict=False)
    weights = tmp_path / "weights.pt"
    torch.save(full.state_dict(), weights)
    encoder = tf.build_encoder(f"openclip:{SMALL_CLIP}:{weights}")
    texts = ["a photo of a bag", "a sandal"]
    torch.testing.assert_close(encoder.encode(texts, progress=False), clip_encoder.encode(texts, progress=False))
    assert encoder.info()["pretrained"] == str(weights)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # making the file needs the deprecated API
def test_openclip_torchscript_file_as_released_by_openai(tmp_path: Path) -> None:
    import open_clip

    # OpenAI's ViT-B-32.pt is a TorchScript archive of a QuickGELU model: make a small one alike.
    scripted = open_clip.create_model(SMALL_CLIP, pretrained=None, force_quick_gelu=True, jit=True)
    weights = tmp_path / "openai_style.pt"
    torch.jit.save(scripted, str(weights))
    encoder = tf.build_encoder(f"openclip:{SMALL_CLIP}:{weights}")
    assert encoder.info()["quick_gelu"] is True
    texts = ["a photo of a coat", "a bag"]
    with torch.no_grad():
        expected = torch.nn.functional.normalize(scripted.encode_text(open_clip.tokenize(texts)), dim=-1)
    torch.testing.assert_close(encoder.encode(texts, progress=False), expected)


def test_build_cli_openclip_full_path(tmp_path: Path, fm_names_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "clip.pth"
    argv = ["--class-names", str(fm_names_file), "--dataset", "fashion-mnist", "--variant", "descriptions",
            "--encoder", f"openclip:{SMALL_CLIP}:none", "--out", str(out), "--device", "cpu", "--no-progress"]
    assert build_cli.main(argv) == 0
    feats, meta = tf.load_text_features(out, num_classes=10)
    assert feats.shape == (10, 256)
    assert_unit_rows(feats)
    assert (meta["dataset"], meta["variant"], meta["class_names"]) == ("fashion-mnist", "descriptions", FM_NAMES)
    assert meta["encoder_info"]["kind"] == "open_clip" and meta["descriptions_sha256"]
    printed = capsys.readouterr().out
    assert "wrote" in printed and "[10, 256]" in printed and "variant: \"descriptions\"" in printed
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing behind


@pytest.mark.parametrize("offline_how", ["HF_HUB_OFFLINE", "unreachable hub"])
def test_openclip_pretrained_without_network_fails_fast(tmp_path: Path, fm_names_file: Path, offline_how: str) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path)}
    env.pop("HF_HUB_CACHE", None)
    if offline_how == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    else:  # what a machine without network sees, without leaving 127.0.0.1
        env.pop("HF_HUB_OFFLINE", None)
        env["HF_ENDPOINT"] = closed_port_url().removesuffix("/v1")
    cmd = [sys.executable, "-m", "text_features.build", "--class-names", str(fm_names_file), "--variant",
           "classname", "--encoder", "openclip:ViT-B-32:openai", "--out", str(tmp_path / "f.pth")]
    # the timeout catches a build that hangs on retries instead of failing (the speed itself is no test)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "error: cannot load open_clip weights 'ViT-B-32:openai' (no network?): download them on a connected "
        "machine into the HF cache, or pass openclip:ViT-B-32:/path/to/weights.pt"
    ]
    assert not (tmp_path / "f.pth").exists()


def test_encoder_spec_errors() -> None:
    with pytest.raises(tf.EncoderError, match="unknown encoder"):
        tf.build_encoder("word2vec")
    with pytest.raises(tf.EncoderError, match="names no weights"):
        tf.build_encoder("openclip:ViT-B-32")
    with pytest.raises(tf.EncoderError, match="unknown open_clip weights 'nope'"):
        tf.build_encoder("openclip:ViT-B-32:nope")
    with pytest.raises(tf.EncoderError, match="checkpoint file not found"):
        tf.build_encoder("openclip:ViT-B-32:/no/such/file.pt")
    with pytest.raises(tf.EncoderError, match="folder not found"):
        tf.build_encoder("st:/no/such/folder")


# -------------------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm() -> tf.TextEncoder:
    return tf.build_encoder("minilm")


def test_minilm_similarities_are_sensible(minilm: tf.TextEncoder) -> None:
    assert minilm.embed_dim == 384
    emb = minilm.encode(["a photo of a sneaker", "a photo of an ankle boot", "a photo of a trouser"], progress=False)
    assert emb.shape == (3, 384)
    assert_unit_rows(emb)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2]  # sneaker closer to ankle boot than to trouser

    feats, _ = tf.load_text_features(ASSETS / "fashion-mnist_minilm.pth")
    idx = {n: i for i, n in enumerate(FM_NAMES)}
    fsim = feats @ feats.T
    assert fsim[idx["Sneaker"], idx["Ankle boot"]] > fsim[idx["Sneaker"], idx["Trouser"]] + 0.1
    assert fsim[idx["Shirt"], idx["T-shirt/top"]] > fsim[idx["Shirt"], idx["Sandal"]] + 0.1
    # "a photo of a <class>" finds its own class row for most classes, even with this small encoder
    queries = minilm.encode([f"a photo of a {n}" for n in FM_NAMES], progress=False)
    hits = (queries @ feats.T).argmax(dim=1) == torch.arange(10)
    assert hits.sum() >= 8


def test_shipped_minilm_features_are_reproducible(minilm: tf.TextEncoder) -> None:
    shipped, meta = tf.load_text_features(ASSETS / "fashion-mnist_minilm.pth")
    assert shipped.shape == (10, 384)
    assert_unit_rows(shipped)
    assert (meta["dataset"], meta["variant"], meta["encoder"]) == ("fashion-mnist", "descriptions", "minilm")
    assert meta["class_names"] == FM_NAMES
    assert meta["descriptions_source"] == "hand-written for this project"
    # the shipped features were built from the shipped descriptions, as they are now
    assert meta["descriptions_sha256"] == sha256_file(ASSETS / "fashion-mnist_descriptions.json")
    rebuilt, _ = tf.build_text_features(FM_NAMES, "descriptions", encoder=minilm, dataset="fashion-mnist",
                                        progress=False)
    torch.testing.assert_close(rebuilt, shipped, atol=1e-4, rtol=0)


def test_build_cli_minilm_variants(tmp_path: Path, fm_names_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--class-names", str(fm_names_file), "--dataset", "fashion-mnist", "--encoder", "minilm",
              "--no-progress"]
    for variant in ("classname", "random"):
        out = tmp_path / f"{variant}.pth"
        assert build_cli.main([*common, "--variant", variant, "--out", str(out)]) == 0
        feats, meta = tf.load_text_features(out)
        assert feats.shape == (10, 384) and meta["variant"] == variant
        assert_unit_rows(feats)
    assert tf.load_text_features(tmp_path / "classname.pth")[1]["templates"] == ["a photo of a {}"]
    random_meta = tf.load_text_features(tmp_path / "random.pth")[1]
    assert random_meta["seed"] == 0 and random_meta["encoder"] is None

    # seeded: same seed, same rows; --embed-dim overrides the encoder's width
    out = tmp_path / "r.pth"
    assert build_cli.main([*common, "--variant", "random", "--embed-dim", "32", "--seed", "3", "--out", str(out)]) == 0
    torch.testing.assert_close(tf.load_text_features(out)[0], tf.random_features(10, 32, seed=3))
    capsys.readouterr()

    assert build_cli.main([*common, "--variant", "descriptions", "--descriptions", str(tmp_path / "none.json"),
                           "--out", str(tmp_path / "d.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: descriptions file not found: {tmp_path / 'none.json'}"]


def test_build_cli_with_dataset_name(tmp_path: Path) -> None:
    data = pytest.importorskip("data", reason="the data package provides the class names")
    assert data.get_class_names("fashion-mnist") == FM_NAMES  # the shipped files' class order
    out = tmp_path / "r.pth"
    assert build_cli.main(["--dataset", "fashion-mnist", "--variant", "random", "--out", str(out)]) == 0
    feats, meta = tf.load_text_features(out)
    assert feats.shape == (10, 512) and meta["class_names"] == FM_NAMES


# ---------------------------------------------------------------------------------- loading files


def test_load_our_files_and_bare_tensors(tmp_path: Path) -> None:
    feats = tf.random_features(5, 8, seed=1)
    path = tmp_path / "f.pth"
    tf.save_text_features(path, feats, {"variant": "random", "seed": 1})
    raw = torch.load(path, weights_only=True)  # plain types only
    assert raw["format"] == "tgr-text-features/1"
    loaded, meta = tf.load_text_features(path)
    torch.testing.assert_close(loaded, feats)
    assert meta["seed"] == 1 and meta["path"] == str(path) and meta["file_sha256"] == sha256_file(path)

    bare = tmp_path / "bare.pth"
    torch.save(torch.randn(3, 4, dtype=torch.float64) * 5, bare)
    loaded, meta = tf.load_text_features(bare)
    assert loaded.dtype == torch.float32 and meta["source"] == "bare tensor" and meta["normalized"] is False
    assert_unit_rows(tf.load_text_features(bare, normalize=True)[0])
    with pytest.raises(tf.TextFeaturesError, match="has 3 class rows, expected 10"):
        tf.load_text_features(bare, num_classes=10)

    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(tf.TextFeaturesError, match="found: weights"):
        tf.load_text_features(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_text("not a tensor")
    with pytest.raises(tf.TextFeaturesError, match="cannot read"):
        tf.load_text_features(tmp_path / "junk.pth")
    with pytest.raises(tf.TextFeaturesError, match="not found"):
        tf.load_text_features(tmp_path / "missing.pth")


def test_load_paper_features() -> None:
    ref = PAPER_FEATURES
    if not (ref / "imagenet_gpt3.pth").is_file():
        pytest.skip(f"paper text features not found under {ref} (set TGR_REFERENCE_DIR)")
    feats, meta = tf.load_text_features(ref / "imagenet_gpt3.pth", num_classes=1000)
    assert feats.shape == (1000, 512) and feats.dtype == torch.float32
    assert meta["source"] == "bare tensor" and meta["normalized"] is True
    assert_unit_rows(feats)
    photo, meta = tf.load_text_features(ref / "imagenet_a-photo-of-a.pth")
    assert photo.shape == (1000, 512) and meta["normalized"] is False
    # CLIP+GPT-3 and CLIP("a photo of a") agree on the class: each row is most similar to its own
    sim = feats @ torch.nn.functional.normalize(photo, dim=1).T
    assert (sim.argmax(dim=1) == torch.arange(1000)).float().mean() > 0.9
