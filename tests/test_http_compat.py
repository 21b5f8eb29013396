"""HTTP compatibility of `herd serve` with vLLM: CORS, --root-path, TLS, lower-case `bearer`, the
`suffix` refusal, echo with max_tokens 0 (prompt scoring), monotone text_offset, ignored-field
logging, and markdown images sent to a model without a vision tower. Real server processes."""
from __future__ import annotations

import base64
import importlib.util
import io
import shutil
import ssl
import subprocess
import time

import httpx
import openai
import pytest

from tests.server_utils import RemoteServer

API_KEY = "sk-http-compat"
MODEL = "tiny"
PROMPT = "The quick brown fox jumps over"
ORIGIN = "http://ui.example"
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(scout_dir):
    srv = RemoteServer(scout_dir, [
        "--dtype", "float32", "--block-size", "4", "--num-kv-blocks", "128", "--max-model-len", "128",
        "--served-model-name", MODEL, "--device", "cpu", "--disable-log-stats", "--disable-uvicorn-access-log",
        "--root-path", "/api", "--allowed-origins", f'["{ORIGIN}"]', "--allow-credentials",
        "--allowed-methods", '["GET", "POST"]'], api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


# -- CORS --------------------------------------------------------------------------------------

def test_cors_preflight_and_headers(server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    r = httpx.options(server.url + "/v1/chat/completions", headers=preflight)
    assert r.status_code == 200  # a browser preflight (405 before CORS support)
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert r.headers["access-control-allow-credentials"] == "true"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "PUT" not in r.headers["access-control-allow-methods"]  # --allowed-methods
    r = httpx.options(server.url + "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    # actual requests carry the header, refusals (401) included, so the browser shows the real error
    r = httpx.get(server.url + "/v1/models", headers={"Origin": ORIGIN, **server.headers})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(server.url + "/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN


# -- auth, --root-path -------------------------------------------------------------------------

def test_bearer_scheme_is_case_insensitive(server):
    for header in (f"Bearer {API_KEY}", f"bearer {API_KEY}", f"BEARER {API_KEY}"):
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": header}).status_code == 200
    for header in ("bearer wrong", f"Basic {API_KEY}", API_KEY, f"bearer{API_KEY}"):
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": header}).status_code == 401


def test_root_path(server):
    # a proxy that strips the prefix and one that does not: both reach the routes, behind the key
    for path in ("/v1/models", "/api/v1/models"):
        r = httpx.get(server.url + path, headers=server.headers)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == MODEL
        assert httpx.get(server.url + path).status_code == 401
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"url": "/api"} in spec["servers"]


# -- completions: suffix, echo, text_offset, ignored fields, images ------------------------------

def test_suffix_is_refused_as_in_vllm(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, suffix="after", max_tokens=4)
    assert e.value.body["message"] == "suffix is not currently supported"


def test_echo_with_max_tokens_0_scores_the_prompt(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=0, logprobs=2)
    choice, lp = r.choices[0], r.choices[0].logprobs
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and len(lp.tokens) == r.usage.prompt_tokens
    assert lp.token_logprobs[0] is None and all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(top) >= 1 for top in lp.top_logprobs[1:])
    # the same numbers as the prompt part of an echo that also generates
    longer = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=2, logprobs=2, **GREEDY)
    n = r.usage.prompt_tokens
    assert longer.choices[0].logprobs.tokens[:n] == lp.tokens
    assert longer.choices[0].logprobs.token_logprobs[1:n] == pytest.approx(lp.token_logprobs[1:])
    plain = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=0)
    assert plain.choices[0].text == PROMPT and plain.choices[0].logprobs is None
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=0, logprobs=1,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == PROMPT
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices[0].logprobs) == n
    with pytest.raises(openai.BadRequestError) as e:  # without echo, 0 stays invalid
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"


def _check_offsets(text: str, tokens: list[str], offsets: list[int], n_prompt: int):
    assert offsets == sorted(offsets) and offsets[-1] <= len(text)
    assert offsets[0] == 0 and offsets[1] == 0  # the BOS the server added is not in the text
    assert offsets[n_prompt] == len(PROMPT)  # the completion starts right after the echoed prompt
    for token, off in zip(tokens[1:], offsets[1:]):
        if "\ufffd" not in token:
            assert text[off:off + len(token)] == token


def test_echo_text_offset_is_monotone(client):
    kw = dict(model=MODEL, prompt=PROMPT, echo=True, max_tokens=6, logprobs=1, **GREEDY)
    r = client.completions.create(**kw)
    lp, n = r.choices[0].logprobs, r.usage.prompt_tokens
    _check_offsets(r.choices[0].text, lp.tokens, lp.text_offset, n)
    chunks = list(client.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].text for c in chunks)
    offsets = [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.text_offset]
    assert text == r.choices[0].text and offsets == sorted(offsets) and offsets[:n + 1] == lp.text_offset[:n + 1]


def test_ignored_fields_are_logged_once(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "frobnicate": 1, "best_of_n": 3}
    for _ in range(2):
        r = httpx.post(server.url + "/v1/completions", json=body, headers=server.headers, timeout=60)
        assert r.status_code == 200  # still accepted
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "frobnicate": 1,
            "wobble": True}
    assert httpx.post(server.url + "/v1/chat/completions", json=chat, headers=server.headers,
                      timeout=60).status_code == 200
    deadline = time.time() + 10
    while "wobble" not in server.read_log() and time.time() < deadline:
        time.sleep(0.1)
    lines = [x for x in server.read_log().splitlines() if "present in the request but ignored" in x]
    assert len(lines) == 2, lines  # once per field name, per server
    assert "best_of_n" in lines[0] and "frobnicate" in lines[0]
    assert "wobble" in lines[1] and "frobnicate" not in lines[1]


def test_markdown_image_on_a_text_model_is_refused(server, client):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    data = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=f"Describe ![]({data}) please", max_tokens=2)
    assert "does not accept image input" in e.value.body["message"] and e.value.body["param"] == "prompt"
    r = httpx.post(server.url + "/v1/responses", headers=server.headers, json={
        "model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": data}]}]})
    assert r.status_code == 400 and "image input" in r.json()["error"]["message"]


# -- flags (in-process) ------------------------------------------------------------------------

def test_http_flag_parsing(scout_dir, tmp_path, capsys):
    from herd.cli import build_parser
    from herd.server.cli import resolve_args

    def parse(*extra):
        argv = ["serve", scout_dir, *extra]
        return build_parser(argv).parse_args(argv)

    args = parse()
    assert (args.allowed_origins, args.allowed_methods, args.allowed_headers) == (["*"], ["*"], ["*"])
    assert args.allow_credentials is False and args.root_path is None and args.ssl_cert_reqs == 0
    args = parse("--allowed-origins", '["https://a", "https://b"]', "--allowed_headers", '["x-key"]')
    assert args.allowed_origins == ["https://a", "https://b"] and args.allowed_headers == ["x-key"]
    for bad in ("https://a", '"*"', '[1]'):
        with pytest.raises(SystemExit):
            parse("--allowed-origins", bad)
        assert "JSON list" in capsys.readouterr().err
    key = tmp_path / "key.pem"
    key.write_text("x")
    with pytest.raises(ValueError, match="needs --ssl-certfile"):
        resolve_args(parse("--ssl-keyfile", str(key)))
    with pytest.raises(FileNotFoundError, match="ssl-certfile"):
        resolve_args(parse("--ssl-certfile", str(tmp_path / "missing.pem")))


# -- TLS ---------------------------------------------------------------------------------------

def _self_signed(folder) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key: with the cryptography package, else openssl."""
    key, cert = str(folder / "key.pem"), str(folder / "cert.pem")
    if importlib.util.find_spec("cryptography") is not None:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        pk = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        now = datetime.datetime.now(datetime.timezone.utc)
        crt = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pk.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                              critical=False)
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(pk, hashes.SHA256()))
        with open(key, "wb") as f:
            f.write(pk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
        with open(cert, "wb") as f:
            f.write(crt.public_bytes(serialization.Encoding.PEM))
        return key, cert
    if shutil.which("openssl") is None:
        pytest.skip("neither the cryptography package nor openssl is available to make a test certificate")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return key, cert


class TLSServer(RemoteServer):
    def __init__(self, model, args, ca: ssl.SSLContext):
        self.ca = ca
        super().__init__(model, args)

    def _wait(self, timeout: float):
        self.url = self.url.replace("http://", "https://")
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0, verify=self.ca).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        log = self.read_log()  # (stop() removes the log file)
        self.stop()
        raise TimeoutError(f"TLS server did not become healthy in {timeout}s:\n{log}")


def test_tls(scout_dir, tmp_path):
    key, cert = _self_signed(tmp_path)
    ca = ssl.create_default_context(cafile=cert)
    srv = TLSServer(scout_dir, ["--dtype", "float32", "--block-size", "4", "--num-kv-blocks", "64",
                                "--max-model-len", "64", "--device", "cpu", "--disable-log-stats",
                                "--ssl-keyfile", key, "--ssl-certfile", cert], ca)
    try:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3}, verify=ca, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        with pytest.raises(httpx.ConnectError):  # it is our certificate, not a public one
            httpx.get(srv.url + "/health", verify=ssl.create_default_context(), timeout=5)
        # default CORS (["*"]): any origin may call
        r = httpx.options(srv.url + "/v1/completions", verify=ca,
                          headers={"Origin": "http://any.example", "Access-Control-Request-Method": "POST"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    finally:
        srv.stop()
