// The emulator dashboard: renders /_emulator/state and follows /_emulator/stream.
// Every piece of data is written with textContent, never parsed as markup: customer ids, feature
// codes and paths come from API requests and must not be able to inject markup.
"use strict";

const MAX_ROWS = 100;
let lastSeq = 0;
let refreshing = false;
let refreshAgain = false;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function clockTime(iso) {
  const moment = new Date(iso);
  return Number.isNaN(moment.getTime()) ? "" : moment.toLocaleTimeString([], { hour12: false });
}

function setConnection(text, kind) {
  const pill = document.getElementById("connection");
  pill.textContent = text;
  pill.className = "pill pill-" + kind;
}

// customers, usage and quotas

function quotaBar(quota) {
  const row = el("div", "quota");
  row.dataset.feature = quota.featureCode;
  const label = el("div", "quota-label");
  label.append(el("span", "code", quota.featureCode));
  let figures;
  if (quota.unlimited) {
    figures = quota.current + " used · unlimited";
  } else {
    figures = quota.current + " / " + quota.included + " included";
    if (quota.overage > 0) figures += " · " + quota.overage + " over";
  }
  label.append(el("span", "figures", figures));
  row.append(label);

  const bar = el("div", "bar");
  bar.setAttribute("role", "meter");
  bar.setAttribute("aria-label", quota.featureCode);
  bar.setAttribute("aria-valuenow", String(quota.current));
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", String(quota.unlimited ? quota.current : quota.included));
  const scale = Math.max(quota.current, quota.included, 1);
  const within = el("div", "fill");
  const over = el("div", "fill over");
  if (quota.unlimited) {
    within.classList.add("unlimited");
    within.style.width = quota.current > 0 ? "100%" : "0%";
  } else {
    within.style.width = (100 * Math.min(quota.current, quota.included)) / scale + "%";
    over.style.width = (100 * quota.overage) / scale + "%";
  }
  bar.append(within, over);
  row.append(bar);
  return row;
}

function customerCard(customer) {
  const card = el("article", "customer");
  card.dataset.customer = customer.id;
  const head = el("div", "customer-head");
  head.append(el("h3", "", customer.id));
  head.append(el("span", customer.subscribed ? "badge ok" : "badge off",
    customer.subscribed ? "subscribed" : "no subscription"));
  card.append(head);
  card.append(el("div", "muted small", customer.commetId));

  const usage = Object.entries(customer.usage);
  if (usage.length > 0) {
    const table = el("table", "usage");
    for (const [feature, total] of usage) {
      const tr = el("tr");
      tr.dataset.feature = feature;
      tr.append(el("td", "code", feature), el("td", "num", total));
      table.append(tr);
    }
    card.append(table);
  }
  for (const quota of customer.quotas) card.append(quotaBar(quota));
  if (usage.length === 0 && customer.quotas.length === 0) {
    card.append(el("p", "muted", "No features on the plan."));
  }
  return card;
}

// faults

function renderFaults(faults) {
  const armed = [];
  if (faults.error_rate > 0) {
    armed.push("error rate " + Math.round(faults.error_rate * 100) + "% → " + faults.error_rate_status);
  }
  if (faults.latency > 0) armed.push("latency " + Math.round(faults.latency * 1000) + " ms");
  if (faults.fail_next.length > 0) {
    armed.push("fail next " + faults.fail_next.length + " (" + faults.fail_next.join(", ") + ")");
  }
  if (faults.rate_limit_next > 0) armed.push("rate limit next " + faults.rate_limit_next);
  if (faults.drop_next > 0) armed.push("drop next " + faults.drop_next);
  if (faults.fail_after_write_next.length > 0) {
    armed.push("fail after write next " + faults.fail_after_write_next.length);
  }
  if (faults.drop_after_write_next > 0) {
    armed.push("drop after write next " + faults.drop_after_write_next);
  }
  if (faults.hold_next > 0) armed.push("hold next " + faults.hold_next);
  // Answers that are not Commet's (an HTML page, a truncated body, 401, 403, a bare 404).
  for (const kind of ["html_next", "truncated_next", "unauthorized_next", "forbidden_next",
                      "bare_not_found_next"]) {
    if (faults[kind] > 0) armed.push(kind.replaceAll("_", " ") + " " + faults[kind]);
  }
  fillList("faults-armed", armed, "none");
  const injected = Object.entries(faults.injected).map(([kind, n]) => kind + ": " + n);
  fillList("faults-injected", injected, "none");
}

function fillList(id, items, empty) {
  const list = document.getElementById(id);
  list.replaceChildren();
  if (items.length === 0) list.append(el("li", "muted", empty));
  for (const item of items) list.append(el("li", "", item));
}

// live feed and request log

function feedItem(change) {
  const li = el("li", "feed-" + change.kind);
  li.dataset.seq = String(change.seq);
  li.append(el("time", "muted", clockTime(change.at)));
  if (change.kind === "usage") {
    li.append(el("span", "tag", "usage"));
    li.append(el("span", "who", change.customerId));
    li.append(el("span", "code", change.featureCode));
    li.append(el("span", "num", "+" + change.value));
  } else if (change.kind === "quota") {
    li.append(el("span", "tag quota", "quota " + change.action));
    li.append(el("span", "who", change.customerId));
    li.append(el("span", "code", change.featureCode));
    li.append(el("span", "num", change.previousBalance + " → " + change.newBalance));
  } else {
    li.append(el("span", "tag", "reset"), el("span", "muted", "the ledger was reset"));
  }
  return li;
}

function requestRow(change) {
  const tr = el("tr");
  tr.dataset.seq = String(change.seq);
  let statusClass = "status dropped";
  if (change.status !== null) {
    statusClass = "status " + (change.status < 300 ? "ok" : change.status < 500 ? "warn" : "err");
  }
  const note = change.fault || (change.replayed ? "replayed" : "");
  tr.append(
    el("td", "muted", clockTime(change.at)),
    el("td", "", change.method),
    el("td", "code", change.path),
    el("td", statusClass, change.status === null ? "dropped" : change.status),
    el("td", "muted", note),
  );
  return tr;
}

function prepend(container, node) {
  container.prepend(node);
  while (container.children.length > MAX_ROWS) container.lastElementChild.remove();
}

function showChange(change) {
  if (change.kind === "request") {
    prepend(document.getElementById("requests"), requestRow(change));
  } else {
    prepend(document.getElementById("feed"), feedItem(change));
  }
}

function renderState(state) {
  const customers = document.getElementById("customers");
  customers.replaceChildren(...state.customers.map(customerCard));
  renderFaults(state.faults);
  // A snapshot older than what the stream already showed would hide newer lines: keep them;
  // the refresh those lines scheduled brings the panels up to date.
  if (state.seq >= lastSeq) {
    lastSeq = state.seq;
    document.getElementById("feed").replaceChildren();
    document.getElementById("requests").replaceChildren();
    for (const change of state.changes) showChange(change);
  }
  document.body.dataset.seq = String(lastSeq);
}

async function refresh() {
  if (refreshing) {
    refreshAgain = true;
    return;
  }
  refreshing = true;
  try {
    const response = await fetch("/_emulator/state", { cache: "no-store" });
    if (response.ok) renderState(await response.json());
  } catch (error) {
    setConnection("offline", "down");
  } finally {
    refreshing = false;
    if (refreshAgain) {
      refreshAgain = false;
      setTimeout(refresh, 150);
    }
  }
}

let refreshTimer = null;
function scheduleRefresh() {
  if (refreshTimer !== null) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    refresh();
  }, 150);
}

function follow() {
  const stream = new EventSource("/_emulator/stream");
  stream.onopen = () => {
    setConnection("live", "live");
    refresh();
  };
  stream.onerror = () => setConnection("reconnecting…", "wait");
  stream.onmessage = (message) => {
    const change = JSON.parse(message.data);
    if (change.seq <= lastSeq) return;
    lastSeq = change.seq;
    document.body.dataset.seq = String(lastSeq);
    showChange(change);
    scheduleRefresh();
  };
  stream.addEventListener("resync", () => refresh());
}

// fault controls

async function control(name, body) {
  const message = document.getElementById("fault-message");
  message.textContent = "";
  try {
    const response = await fetch("/_emulator/faults/" + name, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    const answer = await response.json();
    if (!response.ok) {
      message.textContent = answer.error;
      return;
    }
    renderFaults(answer.faults);
    message.textContent = "applied";
  } catch (error) {
    message.textContent = "the emulator did not answer";
  }
}

function numberField(form, name) {
  return Number(form.elements.namedItem(name).value);
}

function wireControls() {
  document.getElementById("fault-error-rate").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    control("error-rate", { rate: numberField(form, "rate") / 100, status: numberField(form, "status") });
  });
  document.getElementById("fault-latency").addEventListener("submit", (event) => {
    event.preventDefault();
    control("latency", { seconds: numberField(event.currentTarget, "ms") / 1000 });
  });
  document.getElementById("fault-fail-next").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = event.currentTarget;
    control("fail-next", { n: numberField(form, "n"), status: numberField(form, "status") });
  });
  for (const button of document.querySelectorAll("[data-stop]")) {
    const stops = { "error-rate": { rate: 0 }, latency: { seconds: 0 } };
    button.addEventListener("click", () => control(button.dataset.stop, stops[button.dataset.stop]));
  }
  document.getElementById("fault-clear").addEventListener("click", () => control("clear", {}));
}

document.addEventListener("DOMContentLoaded", () => {
  wireControls();
  refresh();
  follow();
});
