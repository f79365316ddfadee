// ubc.js: self-custody signing for the ubc console, in the browser, with no dependency.
//
// What this module does, byte for byte as ubc/signing does in Python (docs/envelopes.md):
//   - canonicalJson(value): RFC 8785 (JCS) canonical JSON as UTF-8 bytes. Only the values
//     payloads use: objects, arrays, strings, safe integers, booleans and null.
//   - pae(type, body): DSSE's pre-authentication encoding, the exact bytes that are signed.
//   - keys: WebCrypto Ed25519. A private key is a non-extractable CryptoKey, generated here
//     or imported once from the one-line key file the CLI writes (base64 of the 32-byte
//     seed), and kept in IndexedDB. Its bytes never leave this module and are wiped after
//     the import; only the public key, the key id and signatures are ever sent.
//   - envelope(...): the DSSE envelope {payloadType, payload, signatures} the server takes.

const encoder = new TextEncoder();

export const PAYLOAD_TYPE_PREFIX = "application/vnd.ubc.";
const MAX_SAFE = Number.MAX_SAFE_INTEGER; // 2^53 - 1, the JCS range of exact integers

// --- RFC 8785 canonical JSON --------------------------------------------------------------

/** The JCS text of a JSON value (a string; canonicalJson gives its UTF-8 bytes). */
export function canonicalText(value, depth = 1) {
  if (depth > 32) throw new Error("cannot canonicalize: nesting deeper than 32");
  if (value === null) return "null";
  if (value === true) return "true";
  if (value === false) return "false";
  if (typeof value === "number") {
    if (!Number.isInteger(value)) throw new Error(`floats are not allowed (${value})`);
    if (Math.abs(value) > MAX_SAFE) throw new Error(`integer out of range (${value})`);
    return String(value); // ECMAScript Number-to-String: what JCS prescribes
  }
  if (typeof value === "string") {
    if (/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/.test(value)) {
      throw new Error("cannot canonicalize: unpaired surrogate");
    }
    // JSON.stringify escapes exactly what JCS escapes: " \ and U+0000..U+001F, with
    // \b \t \n \f \r short forms and \u00xx (lowercase hex) for the rest.
    return JSON.stringify(value);
  }
  if (Array.isArray(value)) {
    return "[" + value.map((v) => canonicalText(v, depth + 1)).join(",") + "]";
  }
  if (typeof value === "object") {
    // Default sort compares UTF-16 code units, which is JCS's order.
    const keys = Object.keys(value).filter((k) => value[k] !== undefined).sort();
    const parts = keys.map((k) => canonicalText(k, depth) + ":" + canonicalText(value[k], depth + 1));
    return "{" + parts.join(",") + "}";
  }
  throw new Error(`cannot canonicalize a ${typeof value}`);
}

/** RFC 8785 canonical JSON of ``value`` as UTF-8 bytes (a Uint8Array). */
export function canonicalJson(value) {
  return encoder.encode(canonicalText(value));
}

// --- DSSE ---------------------------------------------------------------------------------

/** "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body, LEN in bytes, ASCII decimal. */
export function pae(payloadType, body) {
  const type = encoder.encode(payloadType);
  const head = encoder.encode(`DSSEv1 ${type.length} `);
  const middle = encoder.encode(` ${body.length} `);
  const out = new Uint8Array(head.length + type.length + middle.length + body.length);
  out.set(head, 0);
  out.set(type, head.length);
  out.set(middle, head.length + type.length);
  out.set(body, head.length + type.length + middle.length);
  return out;
}

export function payloadTypeFor(name) {
  return `${PAYLOAD_TYPE_PREFIX}${name}+json`;
}

// --- encodings ----------------------------------------------------------------------------

export function b64encode(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i++) s += String.fromCharCode(bytes[i]);
  return btoa(s);
}

export function b64decode(text) {
  const s = text.trim();
  if (!/^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/.test(s)) {
    throw new Error("not standard base64");
  }
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  if (b64encode(out) !== s) throw new Error("not canonical standard base64");
  return out;
}

export function hex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

/** The key id: lowercase hex of the first 8 bytes of SHA-256 of the 32-byte public key. */
export async function keyId(publicKey) {
  return hex((await sha256(publicKey)).slice(0, 8));
}

// --- Ed25519 keys (WebCrypto) --------------------------------------------------------------

// PKCS#8 wrapping of an Ed25519 seed (RFC 8410): this prefix then the 32 bytes.
const PKCS8_PREFIX = new Uint8Array([
  0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
]);

/** A held key: the non-extractable private CryptoKey, its public key, key id and who it is. */
async function describe(privateKey, publicRaw, extra) {
  return {
    privateKey,
    publicKey: b64encode(publicRaw),
    keyid: await keyId(publicRaw),
    ...extra,
  };
}

/** A new Ed25519 key made in this browser; the private half can never be exported. */
export async function generateKey(extra = {}) {
  const pair = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
  const publicRaw = new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey));
  return describe(pair.privateKey, publicRaw, extra);
}

/**
 * Import the text of a key file the CLI keeps (one line: standard base64 of the 32-byte
 * seed). The private key is imported non-extractable; every copy of the seed this module
 * made is overwritten with zeros before it returns. WebCrypto cannot give the public half
 * of a non-extractable key, so the seed is imported a second time, extractable, only long
 * enough to read the public half ("x" of its JWK); that object is dropped, never stored.
 */
export async function importKeyFile(text, extra = {}) {
  let seed;
  try {
    seed = b64decode(text);
  } catch (e) {
    throw new Error("this is not a ubc key file (one line of base64)");
  }
  if (seed.length !== 32) {
    seed.fill(0);
    throw new Error(`a key file holds 32 bytes, this one ${seed.length}`);
  }
  const pkcs8 = new Uint8Array(PKCS8_PREFIX.length + 32);
  pkcs8.set(PKCS8_PREFIX, 0);
  pkcs8.set(seed, PKCS8_PREFIX.length);
  try {
    const privateKey = await crypto.subtle.importKey("pkcs8", pkcs8, { name: "Ed25519" }, false, [
      "sign",
    ]);
    const temporary = await crypto.subtle.importKey("pkcs8", pkcs8, { name: "Ed25519" }, true, [
      "sign",
    ]);
    const jwk = await crypto.subtle.exportKey("jwk", temporary);
    const publicRaw = b64decode(jwk.x.replace(/-/g, "+").replace(/_/g, "/") + "=");
    jwk.d = "";
    return await describe(privateKey, publicRaw, extra);
  } finally {
    seed.fill(0);
    pkcs8.fill(0);
  }
}

export async function signBytes(held, bytes) {
  return new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, held.privateKey, bytes));
}

// --- the key store (IndexedDB) -------------------------------------------------------------

const DB_NAME = "ubc-console";
const STORE = "keys";

function openDb() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE);
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

async function withStore(mode, fn) {
  const db = await openDb();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction(STORE, mode);
      const request = fn(tx.objectStore(STORE));
      tx.oncomplete = () => resolve(request ? request.result : undefined);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  } finally {
    db.close();
  }
}

/** Keep a held key under its role ("member" or "operator"); CryptoKeys are storable. */
export function saveKey(role, held) {
  return withStore("readwrite", (store) => store.put(held, role));
}

/** The key held for a role, or null. */
export async function loadKey(role) {
  return (await withStore("readonly", (store) => store.get(role))) || null;
}

export function forgetKey(role) {
  return withStore("readwrite", (store) => store.delete(role));
}

// --- envelopes ----------------------------------------------------------------------------

export function newId() {
  return crypto.randomUUID();
}

export function now() {
  return new Date().toISOString(); // RFC 3339 UTC with milliseconds, e.g. ...T12:00:00.123Z
}

/**
 * A signed envelope of payload type ``type`` (e.g. "transfer"): ``fields`` plus ledger, id,
 * created_at and actor (unless given), null/undefined fields left out, canonicalized,
 * signed by each of ``signers`` over the PAE.
 */
export async function envelope(type, fields, { origin, actor, signers }) {
  const payload = { ledger: origin, id: newId(), created_at: now(), actor };
  for (const [name, value] of Object.entries(fields)) {
    if (value !== null && value !== undefined) payload[name] = value;
  }
  const body = canonicalJson(payload);
  return signEnvelope(payloadTypeFor(type), body, signers);
}

export async function signEnvelope(payloadType, body, signers) {
  const message = pae(payloadType, body);
  const signatures = [];
  for (const held of signers) {
    signatures.push({ keyid: held.keyid, sig: b64encode(await signBytes(held, message)) });
  }
  return { payloadType, payload: b64encode(body), signatures };
}

/** ``env`` with one more signature by ``held`` over the same PAE (e.g. the operator's). */
export async function addSignature(env, held) {
  const message = pae(env.payloadType, b64decode(env.payload));
  if (env.signatures.some((s) => s.keyid === held.keyid)) return env;
  const sig = b64encode(await signBytes(held, message));
  return { ...env, signatures: [...env.signatures, { keyid: held.keyid, sig }] };
}

// --- talking to the ledger ----------------------------------------------------------------

/** An answer that is not 2xx: its status and the ledger's {type, message, detail}. */
export class ApiError extends Error {
  constructor(status, type, message, detail) {
    super(message);
    this.status = status;
    this.type = type;
    this.detail = detail || {};
  }
}

export async function api(method, path, body, headers = {}) {
  const init = { method, headers: { ...headers }, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let answer = null;
  try {
    answer = await response.json();
  } catch (e) {
    answer = null;
  }
  if (!response.ok) {
    const error = answer && answer.error;
    if (error) throw new ApiError(response.status, error.type, error.message, error.detail);
    const text = answer && answer.detail ? JSON.stringify(answer.detail) : response.statusText;
    throw new ApiError(response.status, "http_error", text, {});
  }
  rememberJournalSize(response.headers.get("UBC-Journal-Size"));
  return answer;
}

/** Read-your-writes where a read replica serves reads: a write answers the journal size
 * that holds it, and the pages loaded next ask for at least that size through this cookie
 * (not a secret: a number the ledger publishes anyway). It only ever grows. */
export function rememberJournalSize(value) {
  if (!value || !/^[0-9]{1,19}$/.test(value)) return;
  const now = document.cookie.match(/(?:^|; )ubc_journal_size=([0-9]+)/);
  if (now && BigInt(now[1]) >= BigInt(value)) return;
  document.cookie = `ubc_journal_size=${value}; path=/; max-age=600; SameSite=Strict`;
}

let ledgerInfo = null;

/** GET /api/ledger, once per page: origin, keys, assets, enrollment, current epoch. */
export async function ledger() {
  if (!ledgerInfo) ledgerInfo = await api("GET", "/api/ledger");
  return ledgerInfo;
}

// --- API key secrets (made here; the ledger only ever sees the hash) ----------------------

export function newApiKeySecret() {
  const bytes = crypto.getRandomValues(new Uint8Array(32));
  const body = b64encode(bytes).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  return "ubc_sk_" + body;
}

export async function apiKeyHash(secret) {
  return hex(await sha256(encoder.encode(secret)));
}
