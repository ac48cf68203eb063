"""CDI's importer-pod environment (importer/cli.py) and the termination message: IMPORTER_* variables come from
the DataVolume a user writes. Any values give a request or a ConfigError-type importer error before anything is
fetched; the termination message is always JSON kubelet keeps whole, carrying the message it was given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fuzzkit import fuzz
from hypothesis import event, example, given
from hypothesis import strategies as st

from importer import cli
from importer.errors import ImporterError
from importer.progress import Progress, termination_message

TERMINATION_LIMIT = 4096  # bytes kubelet keeps of a termination message

URLS = ["http://127.0.0.1:1/disk.img", "https://127.0.0.1/x", "file:///nonexistent/disk.img", "/nonexistent/x",
        "http://[", "http://[::1", "http://127.0.0.1:99999/", "http://", "ftp://127.0.0.1/x", "file:", "http://a b/"]
plausible = {
    "IMPORTER_SOURCE": st.sampled_from(["http", "file", "none", "blank", "registry", "HTTP ", "s3", ""]),
    "IMPORTER_ENDPOINT": st.sampled_from(URLS),
    "IMPORTER_CONTENTTYPE": st.sampled_from(["kubevirt", "archive", "Archive", "iso"]),
    "IMPORTER_IMAGE_SIZE": st.sampled_from(["10Gi", "1e400", "-1", "0", "5000000000000000000000"]),
    "FILESYSTEM_OVERHEAD": st.sampled_from(["0.055", "1", "-0.1", "nan", "inf", "1e-400"]),
    "IMPORTER_CHECKSUM": st.sampled_from(["sha256:" + "a" * 64, "md5:xyz", "sha1", ":", "SHA512:" + "F" * 128]),
    "PREALLOCATION": st.sampled_from(["true", "1", "no"]),
    "INSECURE_TLS": st.sampled_from(["true", "false"]),
    "IMPORTER_CERT_DIR": st.sampled_from(["/nonexistent", ""]),
    "IMPORTER_ACCESS_KEY_ID": st.sampled_from(["user", ""]),
    "IMPORTER_SECRET_KEY": st.sampled_from(["pass", ""]),
    "IMPORTER_EXTRA_HEADER_0": st.sampled_from(["X-A: b", "bad", "A B: c", "X: a\nb", ": v"]),
    "IMPORTER_EXTRA_HEADER_12": st.sampled_from(["X-B: c"]),
    "IMPORTER_STALL_TIMEOUT": st.sampled_from(["30", "0", "-1", "nan", "inf", "1e999"]),
    "IMPORTER_MIN_RATE": st.sampled_from(["1Ki", "0", "-5", "x", "1e9999999"]),
    "IMPORTER_MIN_RATE_WINDOW": st.sampled_from(["60", "0", "nan", "-inf"]),
}
environments = st.fixed_dictionaries({}, optional={
    name: st.one_of(strategy, strategy, st.text(max_size=30)) for name, strategy in plausible.items()
})


@pytest.fixture(scope="module")
def dest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dest")


@fuzz(400)
@given(environments)
@example({"IMPORTER_SOURCE": "http", "IMPORTER_ENDPOINT": "http://["})  # urlsplit: Invalid IPv6 URL
@example({"IMPORTER_SOURCE": "http", "IMPORTER_ENDPOINT": "http://127.0.0.1/", "IMPORTER_MIN_RATE": "1e9999999"})
def test_any_environment_is_a_request_or_an_importer_error(dest: Path, env: dict[str, str]) -> None:
    args = cli.build_parser().parse_args(["import", "--dest", str(dest), "--no-progress"])
    try:
        request = cli.build_request(args, env, Progress(None, None))
    except ImporterError as err:
        assert str(err)
        event(type(err).__name__)
        return
    event("request built")
    assert request.content_type in ("kubevirt", "archive")
    assert 0 <= request.filesystem_overhead < 1
    assert list(dest.iterdir()) == []  # building a request writes nothing


@fuzz(200)
@given(st.dictionaries(st.one_of(st.text(max_size=24), st.from_regex(r"\A[0-9]{1,3}\Z")).map(
    lambda s: cli.EXTRA_HEADER_PREFIX + s), st.text(max_size=20), max_size=6))
@example({cli.EXTRA_HEADER_PREFIX + "\u00b2": "x"})  # "²".isdigit() is true; int() refuses it
def test_extra_headers_come_in_numeric_order(env: dict[str, str]) -> None:
    headers = cli.extra_headers_from_env(env)
    suffixes = {k: k[len(cli.EXTRA_HEADER_PREFIX):] for k in env}
    numbered = sorted((int(n), env[k]) for k, n in suffixes.items() if n and all(c in "0123456789" for c in n))
    assert headers == [v for _, v in numbered]


@fuzz(300)
@given(st.text(max_size=6000), st.sampled_from([None, True, False]), st.sampled_from([None, True, False]))
def test_termination_message_is_json_kubelet_keeps(message: str, scratch: bool | None, prealloc: bool | None) -> None:
    text = termination_message(message, scratch_space_required=scratch, preallocation_applied=prealloc)
    assert len(text.encode()) <= TERMINATION_LIMIT or len(message) <= 16
    body = json.loads(text)
    assert body.get("scratchSpaceRequired") == scratch and body.get("preallocationApplied") == prealloc
    if len(json.dumps(message).encode()) < TERMINATION_LIMIT - 64:
        assert body["message"] == message
    else:
        assert body["message"].endswith("...") and message.startswith(body["message"][:-3].rstrip("."))
