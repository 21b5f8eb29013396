"""Load images from request URLs safely: data: URLs, local files under an allowed root, and
http(s) only when remote fetching is enabled.

Every failure is a MediaError (a ValueError) whose message can go back to the client as a 400.
Remote fetches refuse hosts that resolve to private, loopback, link-local or otherwise non-global
addresses (checked after DNS resolution, and the connection goes to the checked address, so a
second lookup cannot swap it), follow a bounded number of redirects (each re-checked), and stop at
a byte and time limit. Decoding only accepts the listed formats and refuses images whose pixel
count exceeds the limit before any pixel is decoded.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import socket
import ssl
import stat
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urljoin, urlsplit

from PIL import Image, UnidentifiedImageError

DEFAULT_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})
_REDIRECTS = (301, 302, 303, 307, 308)


class MediaError(ValueError):
    """A media URL or payload that cannot be used (bad URL, refused source, too big, corrupt)."""


@dataclass
class MediaConnector:
    """Where images may come from and how big they may be.

    allowed_local_media_path: root folder for file:// URLs (None: local files refused).
    allow_remote: fetch http(s) URLs at all. allow_private_network: also from non-global addresses
    (an intranet image store); off by default because it opens the server to SSRF.
    """
    allowed_local_media_path: str | None = None
    allow_remote: bool = False
    allow_private_network: bool = False
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    timeout: float = 10.0
    max_redirects: int = 3
    allowed_formats: frozenset[str] = field(default_factory=lambda: DEFAULT_FORMATS)

    # -- public ------------------------------------------------------------------------------
    def load_image(self, url: str) -> Image.Image:
        """Fetch and decode one image URL (data:, file:// or http(s)://)."""
        return decode_image(self.load_bytes(url), self.max_image_pixels, self.allowed_formats)

    def load_bytes(self, url: str) -> bytes:
        if not isinstance(url, str) or not url:
            raise MediaError("the image URL must be a non-empty string")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return parse_data_url(url, self.max_image_bytes)
        if scheme == "file":
            return self.read_local_file(url)
        if scheme in ("http", "https"):
            return self.fetch_http(url)
        raise MediaError(f"unsupported image URL {_short(url)!r}: use a data:, file:// or http(s):// URL")

    # -- local files -------------------------------------------------------------------------
    def read_local_file(self, url: str) -> bytes:
        if self.allowed_local_media_path is None:
            raise MediaError("local image files are disabled (no allowed local media path is configured)")
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaError(f"file URLs must name a local path, got host {parts.netloc!r}")
        root = os.path.realpath(self.allowed_local_media_path)
        path = os.path.realpath(unquote(parts.path))
        if os.path.commonpath([root, path]) != root:
            raise MediaError("the image file is outside the allowed local media path")
        # O_NOFOLLOW: the checked path must still not be a link when opened; O_NONBLOCK: a FIFO
        # must not hang the open (it is refused just below as not a regular file)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise MediaError("the image file does not exist") from None
        except OSError as e:
            raise MediaError(f"cannot open the image file: {e.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise MediaError("the image path is not a regular file")
        with os.fdopen(fd, "rb") as f:
            data = f.read(self.max_image_bytes + 1)
        if len(data) > self.max_image_bytes:
            raise MediaError(f"the image file is larger than {self.max_image_bytes} bytes")
        return data

    # -- http(s) -----------------------------------------------------------------------------
    def fetch_http(self, url: str) -> bytes:
        if not self.allow_remote:
            raise MediaError("fetching images from http(s) URLs is disabled; send the image as a "
                             "data: URL (or enable remote media fetching)")
        deadline = time.monotonic() + self.timeout
        for _ in range(self.max_redirects + 1):
            status, location, body = self._get_once(url, deadline)
            if status in _REDIRECTS:
                if not location:
                    raise MediaError(f"redirect without a Location from {_short(url)}")
                url = urljoin(url, location)
                if urlsplit(url).scheme not in ("http", "https"):
                    raise MediaError("image URL redirected to a non-http(s) URL")
                continue
            if status != 200:
                raise MediaError(f"fetching the image failed: HTTP {status} from {_short(url)}")
            return body
        raise MediaError(f"too many redirects (more than {self.max_redirects}) fetching the image")

    def _get_once(self, url: str, deadline: float) -> tuple[int, str | None, bytes]:
        parts = urlsplit(url)
        host = parts.hostname
        if not host:
            raise MediaError(f"image URL {_short(url)!r} has no host")
        https = parts.scheme == "https"
        port = parts.port or (443 if https else 80)
        ip = self._resolve(host, port)
        remaining = max(deadline - time.monotonic(), 0.001)
        conn = (_PinnedHTTPSConnection(host, ip, port, remaining) if https
                else _PinnedHTTPConnection(host, ip, port, remaining))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("GET", target, headers={"Accept": "image/*", "User-Agent": "herd-media/1"})
            resp = conn.getresponse()
            if resp.status in _REDIRECTS:
                return resp.status, resp.getheader("Location"), b""
            if resp.status != 200:
                return resp.status, None, b""
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > self.max_image_bytes:
                raise MediaError(f"the image is larger than {self.max_image_bytes} bytes")
            chunks, total = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise MediaError(f"timed out after {self.timeout:g}s fetching the image")
                chunk = resp.read1(65536)  # what has arrived, so the deadline is checked often
                if not chunk:
                    break
                total += len(chunk)
                if total > self.max_image_bytes:
                    raise MediaError(f"the image is larger than {self.max_image_bytes} bytes")
                chunks.append(chunk)
            return 200, None, b"".join(chunks)
        except socket.timeout:
            raise MediaError(f"timed out after {self.timeout:g}s fetching the image") from None
        except (OSError, http.client.HTTPException) as e:
            raise MediaError(f"could not fetch the image from {_short(url)}: {e}") from None
        finally:
            conn.close()

    def _resolve(self, host: str, port: int) -> str:
        """One address of host to connect to; every address must be public unless allowed."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise MediaError(f"cannot resolve image host {host!r}: {e}") from None
        addrs = [info[4][0] for info in infos]
        if not addrs:
            raise MediaError(f"image host {host!r} has no address")
        if not self.allow_private_network:
            for a in addrs:
                if not is_public_address(a):
                    raise MediaError(f"image host {host!r} resolves to a non-public address ({a}); "
                                     "fetching from private networks is not allowed")
        return addrs[0]


def is_public_address(addr: str) -> bool:
    """True for globally routable unicast addresses (IPv4-mapped IPv6 judged as IPv4)."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an already checked IP while sending the original Host header."""

    def __init__(self, host, ip, port, timeout):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self):
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """TLS to an already checked IP; the certificate is verified against the URL's host name."""

    def __init__(self, host, ip, port, timeout):
        self._ssl = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self._ssl)
        self._ip = ip

    def connect(self):
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._ssl.wrap_socket(sock, server_hostname=self.host)


def parse_data_url(url: str, max_bytes: int) -> bytes:
    """`data:image/<type>;base64,<payload>` -> bytes."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise MediaError("malformed data URL: no ',' before the payload")
    params = header.split(";")
    media_type = params[0].strip().lower()
    if media_type and not media_type.startswith("image/"):
        raise MediaError(f"data URL media type {media_type!r} is not an image")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise MediaError("only base64 data URLs are supported for images")
    payload = "".join(payload.split())
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise MediaError(f"the image is larger than {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the data URL payload is not valid base64") from None
    if len(data) > max_bytes:
        raise MediaError(f"the image is larger than {max_bytes} bytes")
    return data


def decode_image(data: bytes, max_pixels: int = 40_000_000,
                 allowed_formats: frozenset[str] = DEFAULT_FORMATS) -> Image.Image:
    """Decode the first frame of an image file, refusing other formats and oversized images."""
    if not data:
        raise MediaError("the image is empty")
    try:
        im = Image.open(io.BytesIO(data), formats=sorted(allowed_formats))
    except UnidentifiedImageError:
        raise MediaError(f"the data is not an image in an accepted format "
                         f"({', '.join(sorted(allowed_formats))})") from None
    except Image.DecompressionBombError:
        raise MediaError(f"the image has more than {max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"the image is corrupt: {e}") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise MediaError(f"the image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise MediaError(f"the image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
    try:
        im.load()
    except Image.DecompressionBombError:
        raise MediaError(f"the image has more than {max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise MediaError(f"the image is corrupt or truncated: {e}") from None
    return im


def _short(url: str, n: int = 80) -> str:
    return url if len(url) <= n else url[:n] + "..."
