"""Image loading for requests: data URLs, local files under an allowed root, remote fetches
(off by default, public addresses only, size/time limits) and decoding limits."""
import base64
import http.server
import io
import threading
import time

import pytest
from PIL import Image

from herd.multimodal.media import MediaConnector, MediaError, decode_image, is_public_address


def png_bytes(w=20, h=10, fmt="PNG", mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (w, h), (10, 200, 30) if mode == "RGB" else 7).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data, media_type="image/png"):
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def test_data_urls():
    m = MediaConnector()
    img = m.load_image(data_url(png_bytes()))
    assert img.size == (20, 10) and img.getpixel((3, 3)) == (10, 200, 30)
    with pytest.raises(MediaError, match="not an image"):
        m.load_image(data_url(b"hello", "text/plain"))
    with pytest.raises(MediaError, match="only base64"):
        m.load_image("data:image/png," + "abc")
    with pytest.raises(MediaError, match="not valid base64"):
        m.load_image("data:image/png;base64,@@@@")
    with pytest.raises(MediaError, match="not an image in an accepted format"):
        m.load_image(data_url(b"\x00garbage" * 20))
    with pytest.raises(MediaError, match="corrupt or truncated"):
        m.load_image(data_url(png_bytes(200, 200)[:300]))
    with pytest.raises(MediaError, match="larger than 100 bytes"):
        MediaConnector(max_image_bytes=100).load_image(data_url(png_bytes(200, 200)))
    with pytest.raises(MediaError, match="more than the limit of 5000"):
        MediaConnector(max_image_pixels=5000).load_image(data_url(png_bytes(100, 100)))
    with pytest.raises(MediaError, match="accepted format"):
        m.load_image(data_url(png_bytes(fmt="TIFF"), "image/tiff"))  # TIFF is not in the default list
    assert MediaConnector(allowed_formats=frozenset({"TIFF"})).load_image(
        data_url(png_bytes(fmt="TIFF"), "image/tiff")).size == (20, 10)
    with pytest.raises(MediaError, match="unsupported image URL"):
        m.load_image("ftp://example.com/a.png")
    with pytest.raises(MediaError, match="unsupported image URL"):
        m.load_image("/etc/passwd")


def test_decode_reads_only_the_header_of_oversized_images():
    big = png_bytes(3000, 3000, mode="L")
    with pytest.raises(MediaError, match="9000000 pixels"):
        decode_image(big, max_pixels=1_000_000)


def test_local_files_stay_under_the_allowed_root(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(png_bytes())
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    (root / "link.png").symlink_to(outside)
    with pytest.raises(MediaError, match="local image files are disabled"):
        MediaConnector().load_image(f"file://{root}/sub/ok.png")
    m = MediaConnector(allowed_local_media_path=str(root))
    assert m.load_image(f"file://{root}/sub/ok.png").size == (20, 10)
    assert m.load_image(f"file://{root}/sub/%6Fk.png").size == (20, 10)  # percent-encoded
    for bad in (f"file://{root}/../secret.png", f"file://{root}/sub/../../secret.png",
                f"file://{root}/link.png", f"file://{root}/%2E%2E/secret.png", "file:///etc/passwd"):
        with pytest.raises(MediaError, match="outside the allowed local media path"):
            m.load_image(bad)
    with pytest.raises(MediaError, match="not a regular file"):
        m.load_image(f"file://{root}/sub")
    with pytest.raises(MediaError, match="does not exist"):
        m.load_image(f"file://{root}/missing.png")
    with pytest.raises(MediaError, match="must name a local path"):
        m.load_image(f"file://example.com{root}/sub/ok.png")
    # a root that is itself a prefix of a sibling folder does not let the sibling in
    sibling = tmp_path / "media2"
    sibling.mkdir()
    (sibling / "x.png").write_bytes(png_bytes())
    with pytest.raises(MediaError, match="outside"):
        m.load_image(f"file://{sibling}/x.png")


def test_public_address_check():
    for addr in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert is_public_address(addr)
    for addr in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0",
                 "100.64.0.1", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
                 "224.0.0.1", "not-an-ip"):
        assert not is_public_address(addr), addr


def test_remote_fetch_is_off_by_default_and_refuses_private_hosts():
    with pytest.raises(MediaError, match="disabled"):
        MediaConnector().load_image("http://example.com/a.png")
    m = MediaConnector(allow_remote=True, timeout=2)
    for url in ("http://127.0.0.1/a.png", "http://localhost:8080/a.png", "https://10.0.0.7/x",
                "http://169.254.169.254/latest/meta-data", "http://[::1]/a.png", "http://0.0.0.0/",
                "http://[::ffff:127.0.0.1]/a.png"):
        with pytest.raises(MediaError, match="non-public address"):
            m.load_image(url)


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        routes = {"/ok.png": png_bytes(), "/big.png": png_bytes(400, 400) + b"\0" * 50_000,
                  "/junk": b"not an image"}
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/ok.png")
            self.end_headers()
        elif self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif self.path == "/slow":
            self.send_response(200)
            self.end_headers()
            for _ in range(30):
                self.wfile.write(b"x" * 10)
                self.wfile.flush()
                time.sleep(0.1)
        elif self.path in routes:
            body = routes[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_remote_fetch_limits(server):
    # the test server is on loopback, which only an explicit allow_private_network admits
    with pytest.raises(MediaError, match="non-public"):
        MediaConnector(allow_remote=True).load_image(f"{server}/ok.png")
    m = MediaConnector(allow_remote=True, allow_private_network=True, timeout=1.0,
                       max_image_bytes=20_000, max_redirects=2)
    assert m.load_image(f"{server}/ok.png").size == (20, 10)
    assert m.load_image(f"{server}/redirect").size == (20, 10)
    with pytest.raises(MediaError, match="too many redirects"):
        m.load_image(f"{server}/loop")
    with pytest.raises(MediaError, match="larger than 20000 bytes"):
        m.load_image(f"{server}/big.png")
    with pytest.raises(MediaError, match="HTTP 404"):
        m.load_image(f"{server}/missing")
    with pytest.raises(MediaError, match="not an image"):
        m.load_image(f"{server}/junk")
    t0 = time.monotonic()
    with pytest.raises(MediaError, match="timed out"):
        m.load_image(f"{server}/slow")
    assert time.monotonic() - t0 < 2.5
