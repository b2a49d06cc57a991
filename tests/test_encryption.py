"""Encryption at rest: the cipher, EncryptedStorage on every backend, migrate, and the CLI.

Every store is real (Redis and PostgreSQL included); "raw" below means the
same store read without the wrapper, i.e. what an attacker with the disk or
the database would see.
"""

from __future__ import annotations

import json
import stat
import subprocess

import orjson
import pytest
from click.testing import CliRunner

from fusion_cli import crypto
from fusion_cli.cli import cli
from fusion_cli.crypto import PREFIX, Cipher, TokenError, is_token, new_key
from fusion_cli.errors import DecryptionError, StorageError, UsageError
from fusion_cli.messages import ChatMessage
from fusion_cli.migrate import migrate, migrate_encryption
from fusion_cli.session import Session
from fusion_cli.storage import open_storage
from fusion_cli.storage.encrypted import EncryptedStorage
from tests.conftest import PERSISTENT, PYTHON

S, U, A = ChatMessage.system, ChatMessage.user, ChatMessage.assistant
SECRET = "the launch code is 0000 ✓"
HISTORY = [S("be brief"), U(SECRET), A('{"final_answer": "noted: launch code"}'), U("")]
# (checks for leaks look for text with a space: a token, base64 and hex never hold one)
KEY_A, KEY_B = new_key(), new_key()


def raw_text(store, sid: str) -> str:
    return "".join(m.content for m in store.load(sid))


# ---- the cipher ----------------------------------------------------------------

def test_keys_are_fresh_32_byte_url_safe_base64():
    keys = {new_key() for _ in range(20)}
    assert len(keys) == 20
    for k in keys:
        assert len(k) == 44 and len(crypto.parse_key(k, "k")) == 32
        assert Cipher(k).key_id == Cipher(k).key_id != Cipher(KEY_A if k != KEY_A else KEY_B).key_id


@pytest.mark.parametrize("content", ["", "hi there", SECRET, "line\nline\r\n\t\0", "€" * 10_000])
def test_a_token_round_trips_and_hides_the_plaintext(content):
    c = Cipher(KEY_A)
    token, again = c.encrypt("user", content), c.encrypt("user", content)
    assert token != again  # a fresh nonce each time: equal messages do not look equal
    assert is_token(token) and token.startswith(f"{PREFIX}{c.key_id}:") and token.isascii()
    assert content == "" or content not in token  # each has a character base64 never uses
    assert c.decrypt("user", token) == c.decrypt("user", again) == content


def test_a_token_is_bound_to_its_role_its_key_and_every_byte():
    a, b = Cipher(KEY_A), Cipher(KEY_B)
    token = a.encrypt("user", SECRET)
    with pytest.raises(TokenError) as role:
        a.decrypt("system", token)  # a role changed on disk does not pass
    with pytest.raises(TokenError) as other:
        b.decrypt("user", token)
    head, body = token[: len(PREFIX) + 9], token[len(PREFIX) + 9:]
    altered = head + body[:5] + ("A" if body[5] != "A" else "B") + body[6:]  # one nonce byte changed
    with pytest.raises(TokenError) as damaged:
        a.decrypt("user", altered)
    assert (role.value.kind, other.value.kind, damaged.value.kind) == ("damaged", "other-key", "damaged")
    assert other.value.key_id == a.key_id


@pytest.mark.parametrize("bad", ["", "short", "a" * 44, new_key()[:-4], "00" * 32, new_key() * 2, "é" * 44])
def test_a_malformed_key_is_refused_without_showing_it(bad):
    with pytest.raises(UsageError) as err:
        Cipher(bad)
    assert "32 bytes" in str(err.value) and (len(bad) < 5 or bad not in str(err.value))


def test_only_a_whole_token_counts_as_encrypted():
    token = Cipher(KEY_A).encrypt("user", "hi")
    assert is_token(token)
    for plain in (PREFIX, PREFIX + "hello there", token + " ", " " + token, token[:-30], "fusion:enc:v2:" + token[14:]):
        assert not is_token(plain), plain


# ---- EncryptedStorage on every backend -------------------------------------------

def test_contents_are_encrypted_at_rest(store):
    enc = EncryptedStorage(store, Cipher(KEY_A))
    enc.save("alice", HISTORY[:2])
    enc.append("alice", HISTORY[2:])
    assert enc.load("alice") == HISTORY
    raw = store.load("alice")
    assert [m.role for m in raw] == [m.role for m in HISTORY]  # roles stay plain
    assert all(is_token(m.content) for m in raw) and "launch code" not in raw_text(store, "alice")
    # ids, counts and times are the inner store's
    assert (enc.count("alice"), enc.exists("alice"), enc.list_sessions()) == (4, True, ["alice"])
    assert enc.info("alice").messages == 4 and [i.id for i in enc.list_info()] == ["alice"]
    with enc.lock("alice", timeout=5):
        enc.append("alice", [U("under the lock")])  # re-entrant through the inner store's lock
    assert enc.load("alice")[-1].content == "under the lock"
    enc.delete("alice")
    assert (enc.exists("alice"), store.exists("alice")) == (False, False)


def test_another_key_or_no_key_refuses_to_read_and_never_writes(store):
    EncryptedStorage(store, Cipher(KEY_A)).save("alice", HISTORY)
    before = store.load("alice")
    for cipher, reason, words in ((Cipher(KEY_B), "other-key", "another key"),
                                  (None, "no-key", "no encryption key is set")):
        enc = EncryptedStorage(store, cipher)
        with pytest.raises(DecryptionError) as err:
            enc.load("alice")
        text = f"{err.value} {err.value.__cause__ or ''}"
        assert (err.value.reason, err.value.session, err.value.exit_code) == (reason, "alice", 3)
        assert words in text and "'alice'" in text and PREFIX not in text and "launch code" not in text
        with pytest.raises(DecryptionError):
            EncryptedStorage(store, cipher).append("alice", [U("lost?")])  # a fresh object reads first
        with pytest.raises(DecryptionError):
            Session("alice", enc, provider="echo").send_message("a turn with the wrong key")
        assert store.load("alice") == before  # nothing appended, nothing rewritten
    assert EncryptedStorage(store, None).count("alice") == 4  # counting needs no key


def test_the_library_applies_the_configured_key_to_a_storage_url(tmp_path, monkeypatch):
    from fusion_cli import create_session

    monkeypatch.setenv("FUSION_ENCRYPTION_KEY", KEY_A)
    url = f"file:{tmp_path}"
    with create_session("lib", url, provider="echo") as sess:
        sess.send_message(SECRET)
    assert SECRET not in (tmp_path / "lib.json").read_text()
    stored = EncryptedStorage(open_storage(url), Cipher(KEY_A)).load("lib")
    assert [m.role for m in stored] == ["system", "user", "assistant"] and stored[1].content == SECRET
    monkeypatch.delenv("FUSION_ENCRYPTION_KEY")
    with pytest.raises(DecryptionError), create_session("lib", url, provider="echo") as sess:
        sess.send_message("more")
    assert EncryptedStorage(open_storage(url), Cipher(KEY_A)).load("lib") == stored


def test_plain_sessions_stay_readable_and_new_messages_are_encrypted(store):
    store.save("mixed", HISTORY[:2])  # written before encryption was turned on
    enc = EncryptedStorage(store, Cipher(KEY_A))
    assert enc.load("mixed") == HISTORY[:2]
    enc.append("mixed", HISTORY[2:])
    raw = store.load("mixed")
    assert raw[:2] == HISTORY[:2] and all(is_token(m.content) for m in raw[2:])
    assert enc.load("mixed") == HISTORY
    with pytest.raises(DecryptionError):
        EncryptedStorage(store, None).load("mixed")  # part encrypted: no key, no reading


def test_an_altered_token_is_reported_with_its_message_number(store):
    EncryptedStorage(store, Cipher(KEY_A)).save("t", HISTORY)
    raw = store.load("t")
    token = raw[1].content
    raw[1] = U(token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB"))
    store.save("t", raw)
    with pytest.raises(DecryptionError) as err:
        EncryptedStorage(store, Cipher(KEY_A)).load("t")
    assert err.value.reason == "damaged" and "message 2 of session 't'" in str(err.value)
    assert store.load("t") == raw


def test_the_file_backend_keeps_the_seed_format(tmp_path):
    store = open_storage(f"file:{tmp_path}")
    EncryptedStorage(store, Cipher(KEY_A)).save("seed", HISTORY)
    data = (tmp_path / "seed.json").read_bytes()
    value = json.loads(data)
    assert isinstance(value, list) and all(set(m) == {"role", "content"} for m in value)
    assert [m["role"] for m in value] == ["system", "user", "assistant", "user"]
    assert all(m["content"].startswith(PREFIX) for m in value)
    assert data.startswith(b'[\n  {\n    "role": "system",\n    "content": "fusion:enc:v1:')


def test_verification_notices_contents_not_stored_as_promised(store):
    store.save("p", HISTORY)
    with pytest.raises(StorageError, match="verification failed"):
        EncryptedStorage(store, Cipher(KEY_A)).verify_stored("p")  # plain, where encrypted was due
    EncryptedStorage(store, Cipher(KEY_A)).save("p", HISTORY)
    with pytest.raises(StorageError, match="verification failed"):
        EncryptedStorage(store, Cipher(KEY_A), encrypt_writes=False).verify_stored("p")


# ---- migrate -----------------------------------------------------------------------

def _plain_source(make_url) -> tuple:
    src = open_storage(make_url("file"))
    src.save("a", HISTORY)
    src.save("b", [U("b's secret 0000")])
    return src, {"a": HISTORY, "b": [U("b's secret 0000")]}


@pytest.mark.parametrize("kind", PERSISTENT)
def test_migrate_encrypts_into_and_decrypts_out_of_each_backend(kind, make_url):
    src, expected = _plain_source(make_url)
    dst = open_storage(make_url(kind))
    report = migrate_encryption(src, dst, "encrypt", Cipher(KEY_A))
    assert (report.copied, report.messages, report.key_id) == (["a", "b"], 5, Cipher(KEY_A).key_id)
    for sid, history in expected.items():
        assert all(is_token(m.content) for m in dst.load(sid))
        assert EncryptedStorage(dst, Cipher(KEY_A)).load(sid) == history
    back = open_storage("memory:")
    report = migrate_encryption(dst, back, "decrypt", Cipher(KEY_A))
    assert report.copied == ["a", "b"] and {sid: back.load(sid) for sid in expected} == expected
    dst.close()


@pytest.mark.parametrize("kind", PERSISTENT)
def test_migrate_in_place_encrypts_rekeys_decrypts_and_resumes(kind, make_url):
    url = make_url(kind)
    first, second = open_storage(url), open_storage(url)
    first.save("a", HISTORY)
    EncryptedStorage(first, Cipher(KEY_A)).save("b", [U("already encrypted")])  # a run that stopped half-way
    report = migrate_encryption(first, second, "encrypt", Cipher(KEY_A))
    assert (report.in_place, report.copied, report.skipped) == (True, ["a"], ["b"])
    assert all(is_token(m.content) for sid in "ab" for m in first.load(sid))
    assert migrate_encryption(first, second, "encrypt", Cipher(KEY_A)).copied == []  # a rerun: nothing to do
    report = migrate_encryption(first, second, "encrypt", Cipher(KEY_A), Cipher(KEY_B))  # re-key
    assert report.copied == ["a", "b"]
    assert EncryptedStorage(first, Cipher(KEY_B)).load("a") == HISTORY
    migrate_encryption(first, second, "decrypt", Cipher(KEY_B))
    assert first.load("a") == HISTORY and first.load("b") == [U("already encrypted")]
    first.close()
    second.close()


def test_migrate_with_the_wrong_key_stops_and_changes_nothing(make_url):
    src = open_storage(make_url("sqlite"))
    EncryptedStorage(src, Cipher(KEY_A)).save("a", HISTORY)
    before = src.load("a")
    dst = open_storage(make_url("file"))
    with pytest.raises(DecryptionError, match="stopped at session 'a'"):
        migrate_encryption(src, dst, "decrypt", Cipher(KEY_B))
    assert dst.list_sessions() == []
    with pytest.raises(DecryptionError, match="in place stopped at session 'a'"):
        migrate_encryption(src, open_storage(src.url), "encrypt", Cipher(KEY_B))
    assert src.load("a") == before
    with pytest.raises(UsageError, match="needs an encryption key"):
        migrate_encryption(src, dst, "decrypt", None)


def test_plain_migrate_copies_ciphertext_as_stored_without_a_key(make_url):
    src = open_storage(make_url("file"))
    EncryptedStorage(src, Cipher(KEY_A)).save("a", HISTORY)
    dst = open_storage(make_url("sqlite"))
    migrate(src, dst)
    assert dst.load("a") == src.load("a")  # the same tokens, byte for byte
    assert EncryptedStorage(dst, Cipher(KEY_A)).load("a") == HISTORY


# ---- the CLI -------------------------------------------------------------------------

def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env)


def test_keygen_prints_a_key_and_writes_a_private_file_once(tmp_path):
    result = invoke("keygen")
    key = result.stdout.strip()
    assert result.exit_code == 0 and len(crypto.parse_key(key, "k")) == 32
    assert f"id {Cipher(key).key_id}" in result.stderr and key not in result.stderr
    target = tmp_path / "keys" / "key"
    assert invoke("keygen", "-o", str(target)).exit_code == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    written = target.read_bytes()
    again = invoke("keygen", "-o", str(target))
    assert again.exit_code == 2 and "not replaced" in again.stderr and target.read_bytes() == written


def test_send_and_show_with_a_key_and_refusals_without_it_or_with_another(tmp_path):
    url = f"file:{tmp_path / 's'}"
    path = tmp_path / "s" / "alice.json"
    base = {"FUSION_STORAGE": url, "FUSION_PROVIDER": "echo"}
    good, wrong = {**base, "FUSION_ENCRYPTION_KEY": KEY_A}, {**base, "FUSION_ENCRYPTION_KEY": KEY_B}
    assert invoke("send", "-s", "alice", SECRET, env=good).exit_code == 0
    assert SECRET.encode() not in path.read_bytes() and b"launch code" not in path.read_bytes()
    shown = invoke("show", "-s", "alice", env=good)
    assert shown.exit_code == 0 and SECRET in shown.stdout
    stored = path.read_bytes()
    for env, words in ((base, "no encryption key is set"), (wrong, "another key")):
        for args in (["show", "-s", "alice"], ["-v", "show", "-s", "alice", "--json"],
                     ["export", "-s", "alice"], ["send", "-s", "alice", "more"]):
            r = invoke(*args, env=env)
            out = r.stdout + r.stderr
            assert r.exit_code == 3, (args, out)
            assert words in r.stderr and "'alice'" in r.stderr and "FUSION_ENCRYPTION_KEY" in r.stderr
            assert PREFIX not in out and "launch code" not in out and KEY_A not in out and KEY_B not in out
            assert path.read_bytes() == stored, args  # a failed decrypt never writes
    # what is not content still works without the key
    assert invoke("count", "-s", "alice", env=base).stdout == "3\n"
    assert invoke("list", env=base).stdout == "alice\n"


def test_key_files_env_and_config_and_their_checks(tmp_path):
    url = f"file:{tmp_path / 's'}"
    key_file = tmp_path / "key"
    key_file.write_text(KEY_A + "\n")
    key_file.chmod(0o600)
    base = {"FUSION_STORAGE": url, "FUSION_PROVIDER": "echo"}
    assert invoke("send", "-s", "k", "hi", env={**base, "FUSION_ENCRYPTION_KEY_FILE": str(key_file)}).exit_code == 0
    assert EncryptedStorage(open_storage(url), Cipher(KEY_A)).load("k")[1].content == "hi"
    config = tmp_path / "config.toml"
    config.write_text(f'encryption_key_file = "{key_file}"\n')
    assert "hi" in invoke("--config", str(config), "show", "-s", "k", env=base).stdout
    # FUSION_ENCRYPTION_KEY beats the config file's key file
    r = invoke("--config", str(config), "show", "-s", "k", env={**base, "FUSION_ENCRYPTION_KEY": KEY_B})
    assert r.exit_code == 3 and "another key" in r.stderr
    key_file.chmod(0o640)
    r = invoke("show", "-s", "k", env={**base, "FUSION_ENCRYPTION_KEY_FILE": str(key_file)})
    assert r.exit_code == 2 and "chmod 600" in r.stderr and KEY_A not in r.stderr
    both = {**base, "FUSION_ENCRYPTION_KEY_FILE": str(key_file), "FUSION_ENCRYPTION_KEY": KEY_A}
    r = invoke("count", "-s", "k", env=both)
    assert r.exit_code == 2 and "both" in r.stderr
    bad = "not-a-key-" + KEY_A[:20]
    r = invoke("-v", "list", env={**base, "FUSION_ENCRYPTION_KEY": bad})
    assert r.exit_code == 2 and "fusion keygen" in r.stderr and bad not in r.stderr + r.stdout
    r = invoke("list", env={**base, "FUSION_ENCRYPTION_KEY_FILE": str(tmp_path / "nope")})
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_export_writes_plain_text_and_import_encrypts(tmp_path):
    src, dst = f"file:{tmp_path / 'src'}", f"sqlite:{tmp_path / 'dst.db'}"
    EncryptedStorage(open_storage(src), Cipher(KEY_A)).save("a", HISTORY)
    exported = invoke("--storage", src, "export", "-s", "a", env={"FUSION_ENCRYPTION_KEY": KEY_A})
    assert exported.exit_code == 0 and SECRET in exported.stdout and PREFIX not in exported.stdout
    backup = tmp_path / "backup.json"
    backup.write_text(exported.stdout)
    r = invoke("--storage", dst, "import", str(backup), env={"FUSION_ENCRYPTION_KEY": KEY_B})
    assert r.exit_code == 0, r.stderr
    assert all(is_token(m.content) for m in open_storage(dst).load("a"))
    assert EncryptedStorage(open_storage(dst), Cipher(KEY_B)).load("a") == HISTORY


def test_the_migrate_command_in_place_and_into_another_store(tmp_path):
    url, plain_url = f"sqlite:{tmp_path / 's.db'}", f"file:{tmp_path / 'plain'}"
    open_storage(url).save("a", HISTORY)
    keyed = {"FUSION_ENCRYPTION_KEY": KEY_A}
    r = invoke("migrate", "--encrypt", "--from", url, "--to", url, "--json", env=keyed)
    assert r.exit_code == 0, r.stderr
    assert orjson.loads(r.stdout) == {"encrypted": ["a"], "skipped": [], "messages": 4, "dry_run": False,
                                      "encryption": "encrypt", "key_id": Cipher(KEY_A).key_id, "in_place": True}
    assert all(is_token(m.content) for m in open_storage(url).load("a"))
    r = invoke("migrate", "--decrypt", "--from", url, "--to", plain_url, env=keyed)
    assert r.exit_code == 0 and "contents decrypted" in r.stdout
    assert open_storage(plain_url).load("a") == HISTORY
    r = invoke("migrate", "--encrypt", "--decrypt", "--from", url, "--to", plain_url, env=keyed)
    assert r.exit_code == 2
    r = invoke("migrate", "--decrypt", "--from", url, "--to", f"file:{tmp_path / 'other'}")
    assert r.exit_code == 2 and "needs an encryption key" in r.stderr


# ---- real processes -----------------------------------------------------------------

PROBE = """
import sys
if sys.argv[1] == "no-cryptography":
    sys.modules["cryptography"] = None  # as if it were not installed
from fusion_cli.cli import main
code = None
try:
    main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code
import json
print(json.dumps({"code": code, "crypto": any(m.startswith("cryptography") for m in sys.modules)}),
      file=sys.stderr)
"""


def probe(fusion_env: dict, *args: str, env: dict | None = None, mode: str = "-"):
    proc = subprocess.run([PYTHON, "-c", PROBE, mode, *args], capture_output=True, text=True,
                          env={**fusion_env, **(env or {})}, timeout=60)
    return proc, json.loads(proc.stderr.strip().splitlines()[-1])


def test_a_real_process_round_trip_and_lazy_imports(tmp_path, fusion_env):
    url = f"sqlite:{tmp_path / 's.db'}"
    run = lambda *a, env=None: subprocess.run([PYTHON, "-m", "fusion_cli", "--storage", url, *a],  # noqa: E731
                                              capture_output=True, text=True, timeout=60,
                                              env={**fusion_env, **(env or {})})
    key = run("keygen").stdout.strip()
    keyed = {"FUSION_ENCRYPTION_KEY": key, "FUSION_PROVIDER": "echo"}
    assert run("send", "-s", "x", SECRET, env=keyed).returncode == 0
    assert run("send", "-s", "plain", "hello", env={"FUSION_PROVIDER": "echo"}).returncode == 0
    assert SECRET in run("show", "-s", "x", env=keyed).stdout
    refused = run("show", "-s", "x")
    assert refused.returncode == 3 and refused.stdout == "" and PREFIX not in refused.stderr
    # without a key, cryptography is never imported; with one, a read of encrypted data needs it
    _, plain = probe(fusion_env, "--storage", url, "show", "-s", "plain")
    _, counted = probe(fusion_env, "--storage", url, "count", "-s", "x", env=keyed)
    _, shown = probe(fusion_env, "--storage", url, "show", "-s", "x", env=keyed)
    assert (plain, counted, shown) == ({"code": 0, "crypto": False}, {"code": 0, "crypto": False},
                                       {"code": 0, "crypto": True})


def test_without_the_cryptography_package_an_install_hint(tmp_path, fusion_env):
    url = f"file:{tmp_path / 's'}"
    EncryptedStorage(open_storage(url), Cipher(KEY_A)).save("x", HISTORY)
    proc, report = probe(fusion_env, "--storage", url, "show", "-s", "x",
                         env={"FUSION_ENCRYPTION_KEY": KEY_A}, mode="no-cryptography")
    assert report["code"] == 3, proc.stderr
    assert "'cryptography'" in proc.stderr and "pip install 'fusion_cli[encryption]'" in proc.stderr
    assert proc.stdout == ""
