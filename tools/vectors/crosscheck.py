#!/usr/bin/env python3
"""Independent cross-check of Allium's crypto known-answer vectors.

Recomputes, with Python's `cryptography` package (OpenSSL) and nothing from the Rust code, the
ntor-v3-shaped handshake vector (crypto/src/handshake/tests.rs) and the 3-hop relay-cell vectors
(crypto/src/relaycell/kat.rs + kat_vectors.rs) from the same fixed inputs, and asserts that every
byte equals the hex stored in the Rust tests. Not run in CI.

    pip install cryptography   # once
    python3 tools/vectors/crosscheck.py

The derivations follow docs/protocol/20-handshake.md and docs/protocol/30-relay-crypto.md.
"""

import re
import struct
import sys
from pathlib import Path

from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ROOT = Path(__file__).resolve().parents[2]
RAW = serialization.Encoding.Raw
PUB = serialization.PublicFormat.Raw

# ---------------------------------------------------------------- primitives


def chacha20_stream(key: bytes, nonce: bytes, offset: int, length: int) -> bytes:
    """Raw ChaCha20 (RFC 8439, 32-bit counter from 0) bytes offset..offset+length."""
    block = offset // 64
    skip = offset % 64
    # cryptography's ChaCha20 nonce is counter (u32 little-endian) || 96-bit nonce.
    c = Cipher(algorithms.ChaCha20(key, struct.pack("<I", block) + nonce), mode=None).encryptor()
    return c.update(bytes(skip + length))[skip:]


def xor(a: bytes, b: bytes) -> bytes:
    assert len(a) == len(b)
    return bytes(x ^ y for x, y in zip(a, b))


def ae(key: bytes, nonce: bytes, ad: bytes, msg: bytes):
    """ChaCha20-Poly1305; returns (ciphertext, tag)."""
    out = ChaCha20Poly1305(key).encrypt(nonce, msg, ad)
    return out[:-16], out[-16:]


def h(t: bytes, m: bytes) -> bytes:
    mac = hmac.HMAC(t, hashes.SHA256())
    mac.update(m)
    return mac.finalize()


def kdf(t: bytes, s: bytes, n: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=t, info=t).derive(s)


def x25519(secret: bytes, public: bytes) -> bytes:
    out = X25519PrivateKey.from_private_bytes(secret).exchange(X25519PublicKey.from_public_bytes(public))
    assert out != bytes(32), "non-contributory DH"
    return out


def x25519_pub(secret: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes(RAW, PUB)


# ---------------------------------------------------------------- parsing the Rust tests


def rust_str_consts(text: str) -> dict:
    """`const NAME: &str = "hex";` and `const NAME: &str = concat!("..", "..");`."""
    out = {}
    for m in re.finditer(r'const (\w+): &str = (concat!\((.*?)\)|"([^"]*)");', text, re.S):
        name, _, parts, single = m.groups()
        out[name] = "".join(re.findall(r'"([^"]*)"', parts)) if parts is not None else single
    return out


def rust_slice_consts(text: str) -> dict:
    """`const NAME: &[&str] = &["..", ".."];`."""
    return {
        m.group(1): "".join(re.findall(r'"([^"]*)"', m.group(2)))
        for m in re.finditer(r"const (\w+): &\[&str\] = &\[(.*?)\];", text, re.S)
    }


# ---------------------------------------------------------------- handshake (design §2)

PROTO = b"allium-ntor3-x25519-sha256-1"
VER = b"circuit extend"


def encap(s: bytes) -> bytes:
    return struct.pack(">Q", len(s)) + s


def check_handshake() -> None:
    c = rust_str_consts((ROOT / "crypto/src/handshake/tests.rs").read_text())
    seed = bytes.fromhex(c["KAT_ID_SEED"])
    ID = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(RAW, PUB)
    assert ID.hex() == c["KAT_ID"], "ID"
    b = bytes.fromhex(c["KAT_B_SECRET"])
    x = bytes.fromhex(c["KAT_X_SECRET"])
    y = bytes.fromhex(c["KAT_Y_SECRET"])
    CM = bytes.fromhex(c["KAT_CM"])
    SM = bytes.fromhex(c["KAT_SM"])
    B, X, Y = x25519_pub(b), x25519_pub(x), x25519_pub(y)

    # Client phase 1.
    Bx = x25519(x, B)
    K1 = kdf(PROTO + b":kdf_phase1", Bx + ID + X + B + PROTO + encap(VER), 32)
    CMc, CMt = ae(K1, bytes(12), ID + B + X, CM)
    onionskin = ID + B + X + struct.pack(">H", len(CMc)) + CMc + CMt
    assert onionskin.hex() == c["KAT_ONIONSKIN"], "onionskin"

    # Relay.
    Xb = x25519(b, X)
    assert Xb == Bx
    Xy = x25519(y, X)
    si = Xy + Xb + ID + B + X + Y + PROTO + encap(VER)
    seed_ = h(PROTO + b":key_seed", si)
    verify = h(PROTO + b":verify", si)
    ks = kdf(PROTO + b":kdf_final", seed_, 128)
    K_sm, CK_f, CK_b, KH = ks[0:32], ks[32:64], ks[64:96], ks[96:128]
    SMc, SMt = ae(K_sm, bytes(12), Y, SM)
    AUTH = h(PROTO + b":auth_final", verify + ID + B + Y + X + CMt + encap(SMc + SMt) + PROTO + b"Server")
    reply = Y + AUTH + struct.pack(">H", len(SMc)) + SMc + SMt
    assert reply.hex() == c["KAT_REPLY"], "reply"
    assert x25519(x, Y) == Xy
    assert CK_f.hex() == c["KAT_KEY_FORWARD"], "CK_f"
    assert CK_b.hex() == c["KAT_KEY_BACKWARD"], "CK_b"
    assert KH.hex() == c["KAT_KEY_BINDING"], "KH"
    print("handshake vector: OK (onionskin, reply, CK_f, CK_b, KH)")


# ---------------------------------------------------------------- relay cells (design §3)

BODY, T, N, FILLER, MARKER = 1019, 16, 1003, 16, 16
CELLS_PER_STEP = 3
RELAY = 3


class Dir:
    """One direction of one hop: the ratchet of docs/protocol/30-relay-crypto.md."""

    def __init__(self, ck: bytes):
        self.ck0 = ck
        self.ctr = 0

    def keys(self):
        ck = self.ck0
        for _ in range(self.ctr // CELLS_PER_STEP):
            ck = chacha20_stream(ck, bytes(12), 0, 32)
        step = chacha20_stream(ck, bytes(12), 0, 32 + 64 * CELLS_PER_STEP)
        r = self.ctr % CELLS_PER_STEP
        k_aead = step[32 + 64 * r : 64 + 64 * r]
        k_aux = step[64 + 64 * r : 96 + 64 * r]
        nonce = bytes(4) + struct.pack(">Q", self.ctr)
        return k_aead, k_aux, nonce


def pad(n: int) -> bytes:
    """The fixed test padding: byte i of a padding region is (7i + 0x5a) mod 256."""
    return bytes((7 * i + 0x5A) & 0xFF for i in range(n))


def client_forward(fwd, dest: int, cmd: int, msg: bytes) -> bytes:
    keys = [d.keys() for d in fwd[: dest + 1]]
    R = b""
    for k_aead, k_aux, nonce in keys[:-1]:
        R = xor(R, chacha20_stream(k_aead, nonce, 64 + N - len(R), len(R))) + k_aux[:FILLER]
    k_aead, _, nonce = keys[-1]
    head = bytes(MARKER) + msg
    P = head + pad(N - len(R) - len(head)) + xor(R, chacha20_stream(k_aead, nonce, 64 + N - len(R), len(R)))
    assert len(P) == N
    C, Tg = ae(k_aead, nonce, bytes([cmd]), P)
    assert C.endswith(R)
    body = Tg + C
    for k_aead, _, nonce in reversed(keys[:-1]):
        C, Tg = ae(k_aead, nonce, bytes([cmd]), body[:N])
        body = Tg + C
    for d in fwd[: dest + 1]:
        d.ctr += 1
    return body


def relay_backward(bwd, origin: int, cmd: int, msg: bytes) -> bytes:
    k_aead, _, nonce = bwd[origin].keys()
    C, Tg = ae(k_aead, nonce, bytes([cmd]), msg + pad(N - len(msg)))
    body = Tg + C
    bwd[origin].ctr += 1
    for j in reversed(range(origin)):
        _, k_aux, nonce = bwd[j].keys()
        body = xor(body, chacha20_stream(k_aux, nonce, 0, BODY))
        bwd[j].ctr += 1
    return body


def check_cells() -> None:
    v = rust_slice_consts((ROOT / "crypto/src/relaycell/kat_vectors.rs").read_text())
    fwd = [Dir(bytes([0xF0 + j]) * 32) for j in (1, 2, 3)]
    bwd = [Dir(bytes([0xB0 + j]) * 32) for j in (1, 2, 3)]
    big = bytes.fromhex("02000303a6") + bytes(i & 0xFF for i in range(934))
    forward = [
        (2, 3, bytes.fromhex("020001000568656c6c6f")),
        (0, 3, bytes.fromhex("0200020003616263")),
        (1, 3, big),
        (2, 4, bytes.fromhex("0e00000000")),
    ]
    backward = [
        (2, bytes.fromhex("0200010005776f726c64")),
        (0, bytes.fromhex("02000200026f6b")),
        (1, bytes.fromhex("0300010001ff")),
        (2, bytes.fromhex("0200010000")),
    ]
    for i, (dest, cmd, msg) in enumerate(forward, 1):
        got = client_forward(fwd, dest, cmd, msg)
        assert got.hex() == v[f"KAT_F{i}"], f"forward F{i}"
    for i, (origin, msg) in enumerate(backward, 1):
        got = relay_backward(bwd, origin, RELAY, msg)
        assert got.hex() == v[f"KAT_B{i}"], f"backward B{i}"
    print("relay-cell vectors: OK (F1-F4 forward, B1-B4 backward, 3 hops)")


def check_rfc8439() -> None:
    # §2.3.2 block function and §2.8.2 AEAD: pins the library conventions used above.
    key = bytes(range(32))
    blk = chacha20_stream(key, bytes.fromhex("000000090000004a00000000"), 64, 64)
    assert blk.hex().startswith("10f1e7e4d13b5915500fdd1fa32071c4"), "RFC 8439 2.3.2"
    key = bytes(range(0x80, 0xA0))
    ct, tag = ae(key, bytes.fromhex("070000004041424344454647"), bytes.fromhex("50515253c0c1c2c3c4c5c6c7"),
                 b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.")
    assert tag.hex() == "1ae10b594f09e26a7e902ecbd0600691", "RFC 8439 2.8.2"


if __name__ == "__main__":
    check_rfc8439()
    check_handshake()
    check_cells()
    print("crosscheck passed")
    sys.exit(0)
