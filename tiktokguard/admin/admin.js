// The IT support page: a client of the daemon's own API (/api/v1), nothing more.
// The token lives in sessionStorage (this tab only) and goes out as a bearer header: no cookie,
// so no cross-site request can use it. Every value from the API is set as text, never as HTML.
"use strict";

const API = "/api/v1";
const DAY = 24 * 60 * 60 * 1000;
const state = { token: sessionStorage.getItem("tiktokguard-token"), role: null, devices: [],
                selected: null };

function $(id) { return document.getElementById(id); }

function say(text) { $("status").textContent = text; }

async function call(method, path, body) {
  const headers = { "Authorization": "Bearer " + state.token };
  if (body !== undefined) { headers["Content-Type"] = "application/json"; }
  const response = await fetch(API + path, { method, headers,
    body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await response.json(); } catch (e) { data = { error: response.statusText }; }
  return { status: response.status, data };
}

function text(value) {
  if (value === null || value === undefined || value === "") { return "-"; }
  return Array.isArray(value) ? (value.join(", ") || "-") : String(value);
}

function cell(row, value) {
  const td = document.createElement("td");
  td.textContent = text(value);
  row.appendChild(td);
  return td;
}

// -- sign in ---------------------------------------------------------------------------------

async function signIn(token) {
  state.token = token;
  const devices = await call("GET", "/devices");
  if (devices.status === 401) {
    state.token = null;
    sessionStorage.removeItem("tiktokguard-token");
    return "This token is not known: check it, or ask IT support for a personal one.";
  }
  if (devices.status !== 200) { return "The API answered " + devices.status + "."; }
  sessionStorage.setItem("tiktokguard-token", token);
  const tokens = await call("GET", "/tokens");  // admin only: tells the role apart
  state.role = tokens.status === 200 ? "admin" : "viewer";
  document.body.classList.toggle("viewer", state.role !== "admin");
  $("who").textContent = "Signed in (" + state.role + ")";
  $("sign-in").hidden = true;
  $("nav").hidden = false;
  state.devices = devices.data.devices;
  showDevices();
  return null;
}

function signOut() {
  sessionStorage.removeItem("tiktokguard-token");
  state.token = null;
  state.role = null;
  document.body.classList.remove("viewer");
  for (const id of ["devices", "incidents", "nav"]) { $(id).hidden = true; }
  $("sign-in").hidden = false;
  $("token").value = "";
  $("token").focus();
  say("Signed out.");
}

// -- devices ---------------------------------------------------------------------------------

function matches(device, filter, search) {
  const now = Date.now();
  const expires = device.expires_at ? Date.parse(device.expires_at) : null;
  if (filter === "active" && (!device.active || device.expired)) { return false; }
  if (filter === "inactive" && device.active) { return false; }
  if (filter === "expired" && !device.expired) { return false; }
  if (filter === "expiring" && !(device.active && expires !== null && expires > now &&
                                 expires - now <= 30 * DAY)) { return false; }
  if (!search) { return true; }
  const haystack = [device.name, device.custodian, device.supervisor, device.ticket,
                    device.location, ...device.addresses, ...device.macs].join(" ").toLowerCase();
  return haystack.includes(search.toLowerCase());
}

async function loadDevices() {
  const result = await call("GET", "/devices");
  if (result.status === 200) { state.devices = result.data.devices; }
  renderDevices();
}

function renderDevices() {
  const body = $("device-table").tBodies[0];
  body.replaceChildren();
  const filter = $("filter").value;
  const search = $("search").value.trim();
  const shown = state.devices.filter((d) => matches(d, filter, search));
  for (const device of shown) {
    const row = document.createElement("tr");
    cell(row, device.name);
    cell(row, [...device.addresses, ...device.macs]);
    cell(row, device.custodian);
    cell(row, device.supervisor);
    cell(row, device.ticket);
    cell(row, device.expires_at || "never");
    cell(row, !device.active ? "deactivated" : device.expired ? "expired" : "active");
    const td = document.createElement("td");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "secondary";
    button.textContent = "Details";
    button.setAttribute("aria-label", "Details of " + device.name);
    button.addEventListener("click", () => showDetails(device.id));
    td.appendChild(button);
    row.appendChild(td);
    body.appendChild(row);
  }
  say(shown.length + " of " + state.devices.length + " devices shown.");
}

function showDevices() {
  $("incidents").hidden = true;
  $("devices").hidden = false;
  loadDevices();
}

function describeChange(entry) {
  const before = entry.before || {};
  const after = entry.after || {};
  const keys = ["name", "addresses", "macs", "custodian", "supervisor", "ticket", "location",
                "expires_at", "active"];
  return keys.filter((k) => entry.before && JSON.stringify(before[k]) !== JSON.stringify(after[k]))
    .map((k) => k + ": " + text(before[k]) + " → " + text(after[k]));
}

async function showDetails(id) {
  const result = await call("GET", "/devices/" + encodeURIComponent(id));
  if (result.status !== 200) { say("Could not read the device: " + result.data.error); return; }
  const device = result.data;
  state.selected = device;
  $("details").hidden = false;
  $("details-title").textContent = device.name;
  const fields = $("details-fields");
  fields.replaceChildren();
  for (const [label, value] of [["Addresses", device.addresses], ["MACs", device.macs],
      ["Custodian", device.custodian], ["Supervisor", device.supervisor],
      ["Ticket", device.ticket], ["Location", device.location],
      ["Expires", device.expires_at || "never"],
      ["State", !device.active ? "deactivated" : device.expired ? "expired" : "active"]]) {
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    dd.textContent = text(value);
    fields.append(dt, dd);
  }
  $("deactivate").hidden = !device.active;
  $("custodian-form").hidden = !device.active;
  const audit = await call("GET", "/audit?device_id=" + encodeURIComponent(id) + "&limit=1000");
  const history = $("history");
  history.replaceChildren();
  for (const entry of (audit.status === 200 ? audit.data.entries : [])) {
    const item = document.createElement("li");
    const changes = describeChange(entry);
    item.textContent = entry.at + " — " + entry.actor + " — " + entry.action +
      (changes.length ? ": " + changes.join("; ") : "") +
      (entry.instance ? " (on " + entry.instance + ")" : "");
    history.appendChild(item);
  }
  const list = $("device-incidents");
  list.replaceChildren();
  for (const address of device.addresses.filter((a) => !a.includes("/"))) {
    const found = await call("GET", "/incidents?client=" + encodeURIComponent(address) +
                             "&limit=20");
    for (const incident of (found.status === 200 ? found.data.incidents : [])) {
      const item = document.createElement("li");
      item.textContent = incident.first_seen + " — " + incident.name + " (" + incident.rule +
        "), " + incident.count + " queries";
      list.appendChild(item);
    }
  }
  if (!list.children.length) {
    const item = document.createElement("li");
    item.textContent = "none";
    list.appendChild(item);
  }
  $("details-title").scrollIntoView();
}

function splitList(value) {
  return value.split(/[\s,]+/).map((v) => v.trim()).filter((v) => v);
}

function clearErrors(form) {
  for (const error of form.querySelectorAll(".error")) { error.textContent = ""; }
  for (const input of form.querySelectorAll("input")) { input.removeAttribute("aria-invalid"); }
}

function showError(prefix, field, message) {
  const target = field && $(prefix + field + "-error");
  if (target) {
    target.textContent = message;
    const input = $(prefix + field);
    input.setAttribute("aria-invalid", "true");
    input.focus();
  } else {
    $(prefix + "form-error").textContent = message;
  }
}

async function addDevice(event) {
  event.preventDefault();
  const form = $("add-form");
  clearErrors(form);
  const body = {};
  for (const name of ["name", "custodian", "supervisor", "ticket", "location"]) {
    body[name] = $("f-" + name).value;
  }
  body.addresses = splitList($("f-addresses").value);
  body.macs = splitList($("f-macs").value);
  const expires = $("f-expires_at").value;
  if (expires) {
    const moment = new Date(expires);
    if (isNaN(moment)) { showError("f-", "expires_at", "not a date and time"); return; }
    body.expires_at = moment.toISOString();
  }
  const result = await call("POST", "/devices", body);
  if (result.status !== 201) {
    showError("f-", result.data.field, result.data.error);
    say("Not allowlisted: " + result.data.error);
    return;
  }
  form.reset();
  say("Allowlisted " + result.data.name + ".");
  await loadDevices();
  await showDetails(result.data.id);
}

async function changeCustodian(event) {
  event.preventDefault();
  const device = state.selected;
  clearErrors($("custodian-form"));
  const result = await call("PATCH", "/devices/" + encodeURIComponent(device.id),
                            { custodian: $("new-custodian").value });
  if (result.status !== 200) { showError("new-", "custodian", result.data.error); return; }
  $("new-custodian").value = "";
  say("Custodian of " + device.name + " changed.");
  await loadDevices();
  await showDetails(device.id);
}

async function deactivate() {
  const device = state.selected;
  if (!window.confirm("Deactivate " + device.name + "? It is filtered again from its next " +
                      "query; its record and history stay.")) { return; }
  const result = await call("DELETE", "/devices/" + encodeURIComponent(device.id));
  if (result.status !== 200) { say("Not deactivated: " + result.data.error); return; }
  say(device.name + " deactivated.");
  await loadDevices();
  await showDetails(device.id);
}

// -- incidents -------------------------------------------------------------------------------

async function showIncidents() {
  $("devices").hidden = true;
  $("incidents").hidden = false;
  const result = await call("GET", "/incidents?limit=100");
  const body = $("incident-table").tBodies[0];
  body.replaceChildren();
  const incidents = result.status === 200 ? result.data.incidents : [];
  for (const incident of incidents) {
    const row = document.createElement("tr");
    for (const key of ["first_seen", "client_ip", "client_mac", "rule", "name", "count",
                       "instance"]) {
      cell(row, incident[key]);
    }
    body.appendChild(row);
  }
  say(incidents.length + " recent incidents.");
}

// -- wiring ----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("token-error").textContent = "";
    const problem = await signIn($("token").value.trim());
    if (problem) {
      $("token-error").textContent = problem;
      $("token").setAttribute("aria-invalid", "true");
      $("token").focus();
    }
  });
  $("sign-out").addEventListener("click", signOut);
  $("show-devices").addEventListener("click", showDevices);
  $("show-incidents").addEventListener("click", showIncidents);
  $("search").addEventListener("input", renderDevices);
  $("filter").addEventListener("change", renderDevices);
  $("add-form").addEventListener("submit", addDevice);
  $("custodian-form").addEventListener("submit", changeCustodian);
  $("deactivate").addEventListener("click", deactivate);
  if (state.token) { signIn(state.token); }
});
