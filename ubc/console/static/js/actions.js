// actions.js: the console's signing pages (/key, /register, /me/..., /operator/act/...).
// Builds each payload from its form, signs it with the key this browser holds and posts
// the envelope to the ledger's API; shows the receipt, or the API's error next to the
// field it concerns. No inline script anywhere (the console's CSP forbids it).

import * as ubc from "./ubc.js";

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// --- showing keys, errors and receipts --------------------------------------------------

function describeHeld(role, held) {
  if (!held) return null;
  const who = role === "operator" ? "the operator" : held.handle ? `member:${held.handle}` : "no handle yet";
  return `${who} — key id ${held.keyid}, public key ${held.publicKey}`;
}

// Who the page says is signed in (the session cookie): "member:<handle>", "operator" or "".
function sessionOf(node) {
  return node.dataset.session || "";
}

async function showSigner() {
  const node = $("#signer");
  if (!node) return;
  const role = node.dataset.role;
  const session = sessionOf(node);
  const signedInHandle = session.startsWith("member:") ? session.slice("member:".length) : "";
  const held = await ubc.loadKey(role);
  node.replaceChildren();
  node.classList.remove("mismatch");
  delete node.dataset.mismatch;
  const keysLink = (text) =>
    el("a", { href: signedInHandle ? `/key?handle=${encodeURIComponent(signedInHandle)}` : "/key" }, text);
  if (held) {
    node.append(`Signing as ${describeHeld(role, held)}. `, keysLink("Keys"));
    node.dataset.loaded = "yes";
    if (role === "member" && signedInHandle && held.handle !== signedInHandle) {
      // Signed in (to read) as one member, holding another's key (to sign): say so.
      node.classList.add("mismatch");
      node.dataset.mismatch = "yes";
      node.append(
        el(
          "strong",
          { class: "warning", role: "alert" },
          ` You are signed in as member:${signedInHandle}, but the key in this browser is ` +
            `${held.handle ? `member:${held.handle}` : "one with no handle"}'s: what you sign here is signed as that member. `,
        ),
        keysLink(`Load member:${signedInHandle}'s key`),
      );
    }
  } else if (role === "member" && $("#register-form")) {
    node.append("No member key in this browser yet: one will be made when you register.");
    node.dataset.loaded = "no";
  } else {
    const whose = role === "member" && signedInHandle ? ` (member:${signedInHandle}'s)` : "";
    node.append(
      `No ${role} key in this browser: signing needs it. `,
      keysLink(role === "member" ? "Load your key" : "Load the operator key"),
      `${whose} first.`,
    );
    node.dataset.loaded = "no";
  }
}

function clearErrors(form) {
  for (const p of form.querySelectorAll(".error")) {
    p.hidden = true;
    p.textContent = "";
  }
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

function fieldOfError(error, form, aliases) {
  const names = new Set(Array.from(form.elements, (e) => e.name).filter(Boolean));
  const pick = (name) => {
    const mapped = aliases[name] || name;
    return names.has(mapped) ? mapped : null;
  };
  const match = /field '([a-z_]+)'/.exec(error.message || "");
  if (match && pick(match[1])) return pick(match[1]);
  if (error.type === "insufficient_funds") {
    return pick("amount") || pick("sell_amount");
  }
  for (const key of Object.keys(error.detail || {})) {
    if (pick(key)) return pick(key);
  }
  for (const name of Object.keys(aliases).concat(Array.from(names))) {
    if (new RegExp(`\\b${name}\\b`).test(error.message || "") && pick(name)) return pick(name);
  }
  return null;
}

function explain(error) {
  if (!(error instanceof ubc.ApiError)) return error.message || String(error);
  const words = {
    400: "The ledger refused this as malformed",
    401: "The ledger does not know this key (is it registered?)",
    403: "The ledger says this signer may not do this",
    404: "Not found",
    409: "The ledger refused this",
    413: "Too large",
  };
  const special = {
    insufficient_funds: "Not enough funds",
    idempotency_conflict: "Already used",
    state_conflict: "Not possible now",
    unauthenticated: words[401],
  };
  const lead = special[error.type] || words[error.status] || `Error ${error.status}`;
  let text = `${lead}: ${error.message}`;
  if (error.type === "insufficient_funds" && error.detail && error.detail.shortfall !== undefined) {
    text += ` (short by ${error.detail.shortfall})`;
  }
  return text;
}

function showError(form, error, aliases = {}) {
  const field = error instanceof ubc.ApiError ? fieldOfError(error, form, aliases) : error.field || null;
  const target = (field && $(`#f-${field}-error`, form)) || $("#form-error", form);
  target.textContent = explain(error);
  target.hidden = false;
  if (field) {
    const input = form.elements[field];
    if (input && input.setAttribute) input.setAttribute("aria-invalid", "true");
  }
}

function showResult(title, rows, extra) {
  const section = $("#result");
  section.replaceChildren(el("h2", {}, title));
  const dl = el("dl");
  for (const [k, v] of rows) dl.append(el("dt", {}, k), el("dd", {}, v));
  section.append(dl);
  if (extra) section.append(extra);
  section.hidden = false;
  section.dataset.done = "yes";
}

function receiptRows(receipt) {
  const rows = [
    ["entry", String(receipt.seq)],
    ["id", receipt.id],
    ["type", receipt.type],
  ];
  for (const e of receipt.effects || []) {
    rows.push([e.kind, `${e.debit} → ${e.credit}: ${e.amount} ${e.asset} (${e.phase})`]);
  }
  return rows;
}

class FieldError extends Error {
  constructor(field, message) {
    super(message);
    this.field = field;
  }
}

// --- reading forms --------------------------------------------------------------------

function text(values, name) {
  const v = (values.get(name) || "").trim();
  return v === "" ? null : v;
}

function integer(values, name, { required = true } = {}) {
  const v = text(values, name);
  if (v === null) {
    if (required) throw new FieldError(name, "Enter a whole number.");
    return null;
  }
  if (!/^-?\d+$/.test(v)) throw new FieldError(name, "Enter a whole number.");
  const n = Number(v);
  if (!Number.isSafeInteger(n)) throw new FieldError(name, "This number is too large.");
  return n;
}

function moment(values, name) {
  const v = text(values, name);
  if (v === null) return null;
  const d = new Date(v); // datetime-local: local time
  if (Number.isNaN(d.getTime())) throw new FieldError(name, "Enter a date and time.");
  return d.toISOString();
}

const address = (v) => (v.includes(":") ? v : `member:${v}`);
const list = (v) => (v || "").split(/[\s,]+/).filter(Boolean);

// Each action: what its payload holds, from the form's values. ``aliases`` maps payload
// field names to the form's where they differ (to point the API's errors at the field).
const ACTIONS = {
  send: {
    build: (v, me) => ({
      type: "transfer",
      fields: {
        from: text(v, "from") ? address(text(v, "from")) : me,
        to: address(text(v, "to") || ""),
        asset: text(v, "asset"),
        amount: integer(v, "amount"),
        memo: text(v, "memo"),
      },
    }),
  },
  donate: {
    aliases: { to: "cause" },
    build: (v, me) => {
      const cause = text(v, "cause") || "";
      return {
        type: "transfer",
        fields: {
          from: me,
          to: cause.startsWith("cause:") ? cause : `cause:${cause}`,
          asset: text(v, "asset"),
          amount: integer(v, "amount"),
          memo: text(v, "memo"),
        },
      };
    },
  },
  sell: {
    build: (v) => ({
      type: "offer.create",
      fields: {
        sell_asset: text(v, "sell_asset"),
        sell_amount: integer(v, "sell_amount"),
        price_asset: text(v, "price_asset"),
        price_amount: integer(v, "price_amount"),
        expires_at: moment(v, "expires_at"),
      },
    }),
    done: (receipt) => [["offer id", receipt.id]],
  },
  buy: {
    build: (v) => ({
      type: "offer.fill",
      fields: { offer_id: text(v, "offer_id"), amount: integer(v, "amount") },
    }),
  },
  cancel: {
    build: (v) => ({ type: "offer.cancel", fields: { offer_id: text(v, "offer_id") } }),
  },
  grant: {
    async build(v, me) {
      const scopes = v.getAll("scopes");
      if (!scopes.length) throw new FieldError("scopes", "Choose at least one scope.");
      const secret = ubc.newApiKeySecret();
      const models = list(text(v, "models"));
      return {
        type: "apikey.grant",
        secret,
        fields: {
          account: me,
          key_hash: await ubc.apiKeyHash(secret),
          label: text(v, "label"),
          scopes,
          spend_cap_per_epoch: integer(v, "spend_cap_per_epoch", { required: false }),
          models: models.length ? models : null,
          expires_at: moment(v, "expires_at"),
          rpm: integer(v, "rpm", { required: false }),
          tpm: integer(v, "tpm", { required: false }),
        },
      };
    },
    done: (receipt, built) => [["key hash", built.fields.key_hash]],
    extra: (built) =>
      el(
        "div",
        { class: "secret" },
        el("p", {}, "Your new API key. Copy it now: it is shown only this once and the ledger does not know it."),
        el("pre", { id: "api-key-secret" }, built.secret),
      ),
  },
  revoke: {
    aliases: { key_hash: "key_hash" },
    async build(v, me) {
      let hash = text(v, "key_hash") || "";
      if (hash.startsWith("ubc_sk_")) hash = await ubc.apiKeyHash(hash);
      else hash = hash.toLowerCase();
      if (!/^[0-9a-f]{64}$/.test(hash)) throw new FieldError("key_hash", "Enter the key's 64-hex hash or its secret.");
      return { type: "apikey.revoke", fields: { account: me, key_hash: hash } };
    },
  },
  rotate: {
    async build(v, me, held) {
      if (!v.getAll("confirm").includes("yes")) {
        throw new FieldError("confirm", "Tick the box to replace your key.");
      }
      const next = await ubc.generateKey({ handle: held.handle });
      // Kept before the ledger hears of it: were the answer lost, the key would not be.
      await ubc.saveKey("member-next", next);
      return {
        type: "key.rotate",
        next,
        extraSigners: [next],
        fields: { handle: held.handle, new_public_key: next.publicKey },
      };
    },
    after: async (built) => {
      await ubc.saveKey("member", built.next);
      await ubc.forgetKey("member-next");
      await showSigner();
    },
    done: (receipt, built) => [["new key id", built.next.keyid]],
  },
  withdraw: {
    endpoint: "/api/withdrawals",
    build: (v, me) => ({
      type: "withdrawal",
      fields: {
        from: me,
        asset: text(v, "asset"),
        amount: integer(v, "amount"),
        external_ref: text(v, "external_ref"),
      },
    }),
    show: (item) =>
      showResult("Asked: waiting for the operator", [
        ["withdrawal id", item.id],
        ["amount", `${item.amount} ${item.asset}`],
        ["reference", item.external_ref],
        ["status", item.status],
      ]),
  },
  admit: {
    build: (v) => ({ type: "member.admit", fields: { handle: text(v, "handle"), tier: text(v, "tier") } }),
  },
  suspend: {
    build: (v) => ({
      type: "member.update",
      fields: { handle: text(v, "handle"), status: "suspended", reason: text(v, "reason") },
    }),
  },
  reinstate: {
    build: (v) => ({
      type: "member.update",
      fields: { handle: text(v, "handle"), status: "active", reason: text(v, "reason") },
    }),
  },
  tier: {
    build: (v) => ({
      type: "member.update",
      fields: { handle: text(v, "handle"), tier: text(v, "tier"), reason: text(v, "reason") },
    }),
  },
  "epoch-open": {
    build: (v) => {
      const allocations = {};
      for (const line of (v.get("allocations") || "").split(/[\n,]+/)) {
        if (!line.trim()) continue;
        const m = /^\s*([^=\s]+)\s*=\s*(\d+)\s*$/.exec(line);
        if (!m) throw new FieldError("allocations", `Write TIER=AMOUNT, not "${line.trim()}".`);
        if (m[1] in allocations) throw new FieldError("allocations", `Tier ${m[1]} is listed twice.`);
        allocations[m[1]] = Number(m[2]);
      }
      if (!Object.keys(allocations).length) throw new FieldError("allocations", "List at least one tier.");
      const start = moment(v, "starts_at") || ubc.now();
      const end = moment(v, "ends_at") || new Date(Date.parse(start) + 30 * 86400000).toISOString();
      return {
        type: "epoch.open",
        fields: {
          epoch: integer(v, "epoch"),
          asset: text(v, "asset"),
          allocations,
          carryover_cap: integer(v, "carryover_cap", { required: false }),
          starts_at: start,
          ends_at: end,
        },
      };
    },
    done: (receipt) => {
      const tiers = (receipt.summary && receipt.summary.tiers) || {};
      return Object.entries(tiers).map(([tier, row]) => [
        `tier ${tier}`,
        `${row.members} members × ${row.amount} = ${row.total}`,
      ]);
    },
  },
  "epoch-close": {
    build: (v) => ({ type: "epoch.close", fields: { epoch: integer(v, "epoch") } }),
  },
  "cause-register": {
    build: (v) => causeFields("cause.register", v),
  },
  "cause-update": {
    build: (v) => causeFields("cause.update", v),
  },
  deposit: {
    build: (v) => {
      const to = text(v, "to") || "";
      return {
        type: "deposit",
        fields: { to: address(to), asset: text(v, "asset"), amount: integer(v, "amount"), external_ref: text(v, "external_ref") },
      };
    },
  },
};

function causeFields(type, v) {
  return {
    type,
    fields: {
      slug: text(v, "slug"),
      name: text(v, "name"),
      description: v.get("description") || "",
      stewards: list(text(v, "stewards")).map((h) => h.replace(/^member:/, "")),
    },
  };
}

// --- the generic action form ----------------------------------------------------------

async function submitAction(form) {
  const name = form.dataset.action;
  const role = form.dataset.role;
  const spec = ACTIONS[name];
  const held = await ubc.loadKey(role);
  if (!held) throw new Error(`No ${role} key in this browser: load it on the Keys page first.`);
  if (role === "member" && !held.handle) throw new Error("This key has no handle: set it on the Keys page.");
  const me = role === "member" ? `member:${held.handle}` : "operator";
  const values = new FormData(form);
  const built = await spec.build(values, me, held);
  const info = await ubc.ledger();
  const envelope = await ubc.envelope(built.type, built.fields, {
    origin: info.origin,
    actor: me,
    signers: [held].concat(built.extraSigners || []),
  });
  const answer = await ubc.api("POST", spec.endpoint || "/api/envelopes", envelope);
  if (spec.after) await spec.after(built);
  if (spec.show) return spec.show(answer);
  const rows = receiptRows(answer).concat(spec.done ? spec.done(answer, built) : []);
  showResult("Done: the ledger's receipt", rows, spec.extra ? spec.extra(built) : null);
}

// The countersign page lists the pending withdrawals (read on the server through the
// operator's session cookie: no token is typed into the page), each row with the envelope
// the member signed; this adds the operator key's signature to the chosen one.
function pendingRow(id) {
  for (const row of document.querySelectorAll("#pending tr[data-id]")) {
    if (row.dataset.id === id) return row;
  }
  return null;
}

async function submitCountersign(form) {
  const held = await ubc.loadKey("operator");
  if (!held) throw new Error("No operator key in this browser: load it on the Keys page first.");
  const id = text(new FormData(form), "id");
  if (!id) throw new FieldError("id", "Choose a pending withdrawal (or paste its id).");
  const row = pendingRow(id);
  if (!row) throw new FieldError("id", "No pending withdrawal has this id (paid out already? reload the page).");
  const envelope = JSON.parse(row.dataset.envelope);
  const cells = row.querySelectorAll("td");
  const signed = await ubc.addSignature(envelope, held);
  const receipt = await ubc.api("POST", "/api/envelopes", signed);
  const rows = [
    ["account", cells[1].textContent],
    ["amount", cells[2].textContent],
    ["reference", cells[3].textContent],
  ];
  row.remove();
  showResult("Countersigned: the value has left the account", rows.concat(receiptRows(receipt)));
}

function wirePending(form) {
  for (const button of document.querySelectorAll("#pending button.use")) {
    button.addEventListener("click", () => {
      form.elements.id.value = button.dataset.id;
      form.elements.id.focus();
    });
  }
}

function wireForm(form, handler, aliases = () => ({})) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    $("#result") && ($("#result").hidden = true);
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    form.setAttribute("aria-busy", "true");
    try {
      await handler(form);
    } catch (error) {
      showError(form, error, aliases());
    } finally {
      button.disabled = false;
      form.removeAttribute("aria-busy");
    }
  });
}

// --- /register -------------------------------------------------------------------------

async function submitRegister(form) {
  const values = new FormData(form);
  const handle = text(values, "handle");
  if (!handle || !/^[a-z0-9_-]{3,32}$/.test(handle)) {
    throw new FieldError("handle", "3 to 32 of a–z, 0–9, _ and -.");
  }
  let held = await ubc.loadKey("member");
  let made = false;
  if (held && held.handle && held.handle !== handle) {
    // Never replace a key silently: a key made here cannot be recovered once forgotten.
    throw new FieldError(
      "handle",
      `This browser holds the key of member:${held.handle}. Forget it on the Keys page first, or register from another browser profile.`,
    );
  }
  if (!held) {
    held = await ubc.generateKey({ handle });
    made = true;
  }
  const info = await ubc.ledger();
  const envelope = await ubc.envelope(
    "member.register",
    { handle, public_key: held.publicKey, display_name: text(values, "display_name") },
    { origin: info.origin, actor: `member:${handle}`, signers: [held] },
  );
  const receipt = await ubc.api("POST", "/api/envelopes", envelope);
  held.handle = handle;
  await ubc.saveKey("member", held);
  await showSigner();
  const waiting =
    info.enrollment === "invite"
      ? el("p", { id: "waiting" }, "This ledger admits members by invitation: you are registered and now wait for the operator to admit you. Nothing to do meanwhile; your key stays in this browser.")
      : el("p", { id: "waiting" }, "You are registered.");
  const rows = receiptRows(receipt).concat([
    ["address", `member:${handle}`],
    ["key id", held.keyid],
    ["key", made ? "made in this browser" : "the one this browser held"],
  ]);
  showResult("Registered", rows, waiting);
}

// --- /key ------------------------------------------------------------------------------

async function showHeld() {
  for (const role of ["member", "operator"]) {
    const node = $(`#held-${role}`);
    if (!node) continue;
    const held = await ubc.loadKey(role);
    node.textContent = held ? `Holding ${describeHeld(role, held)}.` : `No ${role} key in this browser.`;
    node.dataset.loaded = held ? "yes" : "no";
    if (held) node.dataset.keyid = held.keyid;
    const forget = $(`.forget[data-role=${role}]`);
    if (forget) forget.hidden = !held;
  }
}

async function submitImport(form) {
  const role = form.dataset.role;
  const fileInput = form.elements.file;
  const textInput = form.elements.text;
  let keyText = textInput.value;
  if (fileInput.files && fileInput.files.length) keyText = await fileInput.files[0].text();
  const errorField = role === "member" ? "member-file" : "operator-file";
  const extra = {};
  if (role === "member") {
    const handle = (form.elements.handle.value || "").trim();
    if (!/^[a-z0-9_-]{3,32}$/.test(handle)) throw new KeyFormError("member-handle", "Enter your handle (3 to 32 of a–z, 0–9, _ and -).");
    extra.handle = handle;
  }
  if (!keyText.trim()) throw new KeyFormError(errorField, "Choose the key file or paste its line.");
  let held;
  try {
    held = await ubc.importKeyFile(keyText, extra);
  } catch (error) {
    throw new KeyFormError(errorField, error.message);
  } finally {
    keyText = "";
    textInput.value = "";
    fileInput.value = "";
  }
  if (role === "operator") {
    const info = await ubc.ledger();
    if (!info.operator_public_keys.includes(held.publicKey)) {
      throw new KeyFormError(errorField, "This is not one of this ledger's operator keys.");
    }
  }
  await ubc.saveKey(role, held);
  await showHeld();
}

class KeyFormError extends Error {
  constructor(id, message) {
    super(message);
    this.id = id;
  }
}

function wireKeyPage() {
  for (const form of document.querySelectorAll("form.key-import")) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clearErrors(form);
      try {
        await submitImport(form);
      } catch (error) {
        const id = error instanceof KeyFormError ? error.id : `${form.dataset.role}-file`;
        const p = $(`#${id}-error`);
        p.textContent = error.message;
        p.hidden = false;
      }
    });
  }
  for (const button of document.querySelectorAll("button.generate")) {
    button.addEventListener("click", async () => {
      const form = button.closest("form");
      clearErrors(form);
      const handle = (form.elements.handle.value || "").trim();
      if (!/^[a-z0-9_-]{3,32}$/.test(handle)) {
        const p = $("#member-handle-error");
        p.textContent = "Enter the handle this key is for.";
        p.hidden = false;
        return;
      }
      await ubc.saveKey("member", await ubc.generateKey({ handle }));
      await showHeld();
    });
  }
  for (const button of document.querySelectorAll("button.forget")) {
    button.addEventListener("click", async () => {
      await ubc.forgetKey(button.dataset.role);
      await showHeld();
    });
  }
}

// --- start ---------------------------------------------------------------------------

async function start() {
  const actionForm = $("#action-form");
  if (actionForm) {
    const name = actionForm.dataset.action;
    const handler = name === "countersign" ? submitCountersign : submitAction;
    wireForm(actionForm, handler, () => (ACTIONS[name] && ACTIONS[name].aliases) || {});
    if (name === "countersign") wirePending(actionForm);
  }
  const registerForm = $("#register-form");
  if (registerForm) wireForm(registerForm, submitRegister);
  if ($(".key-panel")) {
    wireKeyPage();
    await showHeld();
  }
  await showSigner();
  document.body.dataset.ready = "yes";
}

start().catch((error) => {
  document.body.dataset.ready = "error";
  console.error(error);
});
