"""Options: URL schemes, credentials from the environment (never echoed), TLS, and their errors."""

from __future__ import annotations

import logging
import subprocess

import pytest
import torch
from kvstacks.config import build_options, parse_stack
from kvstacks.errors import ConfigError
from kvstacks.testing import assert_same_obj, free_port, random_key, random_kv, raw_obj, require_executable
from kvstacks_redis import RedisBackend, RedisUnavailable

SECRET = "pw-Zq81-never-print-me"


def backend(**options) -> RedisBackend:
    return RedisBackend(RedisBackend.Options(**options))


@pytest.mark.parametrize(
    "options, path, words",
    [
        ({"url": "http://127.0.0.1:6379"}, "url", "redis://, rediss:// or unix://"),
        ({"url": f"redis://:{SECRET}@127.0.0.1:6379/0"}, "url", "password_env"),
        ({"url": f"redis://127.0.0.1:6379/0?password={SECRET}"}, "url", "password_env"),
        ({"url": "unix:///tmp/x.sock", "mode": "cluster"}, "mode", "TCP"),
        ({"url": "redis://127.0.0.1:6379", "tls_ca": "/etc/hosts"}, "tls_ca", "rediss://"),
        ({"url": "rediss://127.0.0.1:6379", "tls_ca": "/nonexistent/ca.pem"}, "tls_ca", "not a readable file"),
        ({"url": "rediss://127.0.0.1:6379", "tls_cert": "/etc/hosts"}, "tls_cert", "tls_key"),
        ({"prefix": ""}, "prefix", "clear()"),
        ({"ttl": 0}, "ttl", "positive"),
        ({"pool_size": 0}, "pool_size", "at least 1"),
        ({"part_bytes": "1KiB"}, "part_bytes", "between 64KiB and 512MiB"),
        ({"part_bytes": "1GiB"}, "part_bytes", "between 64KiB and 512MiB"),
        ({"mode": "sentinel", "sentinels": ["nohostport"]}, "sentinels", "host:port"),
        ({"password_env": "KVSTACKS_TEST_UNSET_VAR"}, "password_env", "KVSTACKS_TEST_UNSET_VAR"),
    ],
)
async def test_bad_options_raise_config_errors_naming_the_option(options, path, words, monkeypatch):
    monkeypatch.delenv("KVSTACKS_TEST_UNSET_VAR", raising=False)

    with pytest.raises(ConfigError) as info:
        b = RedisBackend(build_options(RedisBackend.Options, options, ""))
        await b.start()
    assert info.value.path == path
    assert words in info.value.message
    assert SECRET not in str(info.value)


def test_yaml_options_are_validated_by_path():
    with pytest.raises(ConfigError, match=r"stack\[1\]\.pool_size: expected an integer"):
        parse_stack({"stack": [{"backend": "redis"}, {"backend": "redis", "name": "r2", "pool_size": "many"}]})
    with pytest.raises(ConfigError, match=r"stack\[0\]\.mode: 'galaxy' is not allowed"):
        parse_stack({"stack": [{"backend": "redis", "mode": "galaxy"}]})
    cfg = parse_stack({"stack": [{"backend": "redis", "url": "redis://10.0.0.1:7000/2", "ttl": 3600,
                                  "pipeline_bytes": "16MiB", "compressor": "none"}]})
    opts = cfg.stack[0].backend_options
    assert (opts.url, opts.ttl, opts.pipeline_bytes) == ("redis://10.0.0.1:7000/2", 3600.0, 16 << 20)


async def test_password_from_environment(own_redis, monkeypatch, caplog):
    server = own_redis("--requirepass", SECRET)
    monkeypatch.setenv("KVS_REDIS_PASSWORD", SECRET)
    good = backend(url=server.url, password_env="KVS_REDIS_PASSWORD")
    await good.start()
    key = random_key()
    obj = raw_obj(key, random_kv(seed=1))
    await good.put(key, obj)
    assert_same_obj(await good.get(key), obj, "with a password")
    await good.close()

    monkeypatch.setenv("KVS_REDIS_PASSWORD", SECRET + "-wrong")
    caplog.set_level(logging.DEBUG)
    bad = backend(url=server.url, password_env="KVS_REDIS_PASSWORD")
    await bad.start()  # an auth failure is logged, not raised: the stack still comes up
    with pytest.raises(RedisUnavailable) as info:
        await bad.get(key)
    await bad.close()
    assert "authentication" in caplog.text.lower()
    for text in (caplog.text, str(info.value), repr(info.value)):
        assert SECRET not in text

    nobody = backend(url=server.url)  # no password at all
    await nobody.start()
    with pytest.raises(RedisUnavailable):
        await nobody.contains(key)
    await nobody.close()


async def test_acl_username_and_password(own_redis, monkeypatch):
    server = own_redis()
    server.cli("ACL", "SETUSER", "kvuser", "on", f">{SECRET}", "~kvacl:*", "+@all")
    monkeypatch.setenv("KVS_USER", "kvuser")
    monkeypatch.setenv("KVS_PASS", SECRET)
    b = backend(url=server.url, username_env="KVS_USER", password_env="KVS_PASS", prefix="kvacl:")
    await b.start()
    key = random_key()
    obj = raw_obj(key, random_kv(seed=2))
    await b.put(key, obj)
    assert_same_obj(await b.get(key), obj, "as an ACL user")
    assert [k async for k, _ in b.keys()] == [key]
    await b.close()


def _make_certs(d):
    openssl = require_executable("openssl", "apt-get install -y openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=kvstacks-test-ca")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=kvstacks-test-{name}")
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")


async def test_tls_with_client_certificate(own_redis, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    _make_certs(certs)
    port = free_port()
    own_redis("--tls-port", str(port), "--port", "0", "--tls-cert-file", str(certs / "server.pem"),
              "--tls-key-file", str(certs / "server.key"), "--tls-ca-cert-file", str(certs / "ca.pem"),
              "--tls-auth-clients", "yes", port=port)
    url = f"rediss://127.0.0.1:{port}/0"
    b = backend(url=url, tls_ca=certs / "ca.pem", tls_cert=certs / "client.pem", tls_key=certs / "client.key")
    await b.start()
    key = random_key()
    obj = raw_obj(key, random_kv(2, 64, 256, torch.bfloat16, seed=3))
    await b.batch_put([(key, obj)])
    assert_same_obj((await b.batch_get([key]))[0], obj, "over TLS")
    assert b.breaker.state == "closed"
    await b.close()

    # without the client certificate the server refuses us: a clear failure, not a hang
    anonymous = backend(url=url, tls_ca=certs / "ca.pem", connect_timeout=2.0, timeout=2.0)
    await anonymous.start()
    with pytest.raises(RedisUnavailable):
        await anonymous.get(key)
    await anonymous.close()


async def test_ttl_and_prefix_are_applied(redis_server):
    with_ttl = backend(url=redis_server.url, prefix="ttl-test:", ttl=30)
    plain = backend(url=redis_server.url, prefix="ttl-test-none:")
    for b in (with_ttl, plain):
        await b.start()
    k1, k2 = random_key(), random_key()
    await with_ttl.batch_put([(k1, raw_obj(k1, random_kv(seed=4))), (k2, raw_obj(k2, random_kv(seed=5)))])
    await plain.put(k1, raw_obj(k1, random_kv(seed=6)))
    for key in (k1, k2):
        ttl_ms = int(redis_server.cli("PTTL", f"ttl-test:{key.to_string()}"))
        assert 0 < ttl_ms <= 30_000
    assert int(redis_server.cli("PTTL", f"ttl-test-none:{k1.to_string()}")) == -1  # no expiry
    # prefixes keep the two apart: each lists and clears only its own
    assert {k async for k, _ in with_ttl.keys()} == {k1, k2}
    assert {k async for k, _ in plain.keys()} == {k1}
    await plain.clear()
    assert await with_ttl.batch_contains([k1, k2]) == [True, True]
    for b in (with_ttl, plain):
        await b.close()


async def test_prefix_with_glob_characters_lists_only_its_own(redis_server):
    star = backend(url=redis_server.url, prefix="glob*[x]?:")
    other = backend(url=redis_server.url, prefix="globZxQ:")
    for b in (star, other):
        await b.start()
    k1, k2 = random_key(), random_key()
    await star.put(k1, raw_obj(k1, random_kv(seed=7)))
    await other.put(k2, raw_obj(k2, random_kv(seed=8)))
    assert {k async for k, _ in star.keys()} == {k1}
    await star.clear()
    assert await other.contains(k2)
    for b in (star, other):
        await b.close()


async def test_foreign_value_under_the_prefix_is_a_miss_and_is_left_alone(redis_server):
    b = backend(url=redis_server.url, prefix="foreign:")
    await b.start()
    key = random_key()
    name = f"foreign:{key.to_string()}"
    redis_server.cli("SET", name, "someone else's value")
    assert await b.get(key) is None
    assert redis_server.cli("GET", name).strip() == "someone else's value"
    # a valid frame of another key stored under this key's name is not served either
    other = random_key()
    await b.put(other, raw_obj(other, random_kv(seed=9)))
    redis_server.cli("COPY", f"foreign:{other.to_string()}", name, "REPLACE")
    assert await b.get(key) is None
    assert b.corrupt_count == 2
    await b.close()
