"""Pure signing primitives for ubc: keys, canonical JSON, DSSE envelopes, signed notes.

No database and no HTTP here: everything is a function of its arguments (plus the OS random
source and the key files it is asked to read or write), so the server, the CLI and the
auditor share exactly the same code for what is signed and how it is checked.
"""

from ubc.signing.canonical import (
    MAX_DEPTH,
    PayloadError,
    canonical_json,
    is_canonical,
    parse_payload,
)
from ubc.signing.dsse import (
    MAX_SIGNATURES,
    PAYLOAD_TYPE_PREFIX,
    Envelope,
    EnvelopeFormatError,
    Signature,
    add_signature,
    pae,
    payload_type_for,
    sign_envelope,
    type_name,
    verified_keyids,
)
from ubc.signing.keys import (
    PUBLIC_KEY_SIZE,
    SEED_SIZE,
    TOKEN_PREFIX,
    decode_public_key,
    encode_public_key,
    generate_signing_key,
    generate_token,
    key_id,
    load_signing_key,
    public_key_bytes,
    seed_b64,
    signing_key_from_seed_b64,
    write_signing_key,
    write_token,
)
from ubc.signing.note import (
    ED25519_KEY_TYPE,
    MAX_SIGNATURE_LINES,
    NoteError,
    NoteSigner,
    NoteVerifier,
    key_hash,
    vkey,
)

__all__ = [
    "ED25519_KEY_TYPE",
    "MAX_DEPTH",
    "MAX_SIGNATURES",
    "MAX_SIGNATURE_LINES",
    "PAYLOAD_TYPE_PREFIX",
    "PUBLIC_KEY_SIZE",
    "SEED_SIZE",
    "TOKEN_PREFIX",
    "Envelope",
    "EnvelopeFormatError",
    "NoteError",
    "NoteSigner",
    "NoteVerifier",
    "PayloadError",
    "Signature",
    "add_signature",
    "canonical_json",
    "decode_public_key",
    "encode_public_key",
    "generate_signing_key",
    "generate_token",
    "is_canonical",
    "key_hash",
    "key_id",
    "load_signing_key",
    "pae",
    "parse_payload",
    "payload_type_for",
    "public_key_bytes",
    "seed_b64",
    "sign_envelope",
    "signing_key_from_seed_b64",
    "type_name",
    "verified_keyids",
    "vkey",
    "write_signing_key",
    "write_token",
]
