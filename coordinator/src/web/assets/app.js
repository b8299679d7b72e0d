// The Baton dashboard: one page, routed by the URL's fragment
// (#/fleet, #/rollouts, #/rollouts/ID, #/hosts/ID), redrawn from
// /api/state whenever the coordinator sends a `state` event on /api/live.
// Every text is set with textContent: nothing from the fleet becomes HTML.
'use strict';

let state = null; // the body of /api/state
let detail = null; // the body of /api/rollouts/ID on a rollout's page
let source = null; // the EventSource
let filter = ''; // the fleet page's label filter

const TERMINAL = ['succeeded', 'failed', 'rolled_back', 'aborted'];
const ACTIONS = [
  ['pause', 'Pause', (s) => ['pending', 'staging', 'progressing', 'awaiting_promotion'].includes(s)],
  ['resume', 'Resume', (s) => s === 'paused'],
  ['promote', 'Promote', (s) => s === 'awaiting_promotion'],
  ['abort', 'Abort', (s) => !TERMINAL.includes(s)],
  ['rollback', 'Roll back', (s) => !['rolling_back', 'rolled_back'].includes(s)],
];

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const badge = (s) => el('span', { class: 'badge s-' + s, 'data-state': s }, s.replace(/_/g, ' '));
// Widths through the CSSOM: the Content-Security-Policy forbids style
// attributes.
function bar(done, total) {
  const fill = el('span');
  fill.style.width = (total ? Math.round((100 * done) / total) : 0) + '%';
  return el('div', { class: 'bar' }, fill);
}
// Dates with their day, durations as people say them, ages from now.
const when = (t) => (t ? new Date(t).toLocaleString() : '');
function span(ms) {
  if (!(ms >= 0)) return '';
  const s = Math.round(ms / 1000);
  if (s < 60) return s + 's';
  if (s < 3600) return Math.floor(s / 60) + 'm ' + (s % 60) + 's';
  if (s < 86400) return Math.floor(s / 3600) + 'h ' + Math.floor((s % 3600) / 60) + 'm';
  return Math.floor(s / 86400) + 'd ' + Math.floor((s % 86400) / 3600) + 'h';
}
const dur = (a, b) => (a ? span((b ? new Date(b) : new Date()) - new Date(a)) : '');
const ago = (t) => (t ? span(new Date() - new Date(t)) + ' ago' : '');
// A countdown, kept current by the ticker below.
function countdown(deadline, label) {
  return el('span', { class: 'countdown', 'data-deadline': deadline, 'data-label': label }, tick(deadline, label));
}
function tick(deadline, label) {
  const left = new Date(deadline) - new Date();
  return left > 0 ? `${label} ${span(left)} left` : `${label} past its deadline`;
}
setInterval(() => {
  for (const e of document.querySelectorAll('[data-deadline]')) e.textContent = tick(e.dataset.deadline, e.dataset.label);
}, 1000);

function route() {
  const parts = (location.hash || '#/fleet').slice(2).split('/');
  return { page: parts[0] || 'fleet', id: parts.slice(1).join('/') };
}

function flash(text, isError) {
  const f = document.getElementById('flash');
  f.textContent = text;
  f.className = isError ? 'error' : '';
  f.hidden = !text;
}

async function call(method, url, body) {
  const init = { method, headers: {}, credentials: 'same-origin' };
  if (method !== 'GET') init.headers['X-Baton-Action'] = '1';
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const r = await fetch(url, init);
  const json = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(json.error || r.status + ' ' + r.statusText);
  return json;
}

// ---- pages ---------------------------------------------------------------

function fleetPage() {
  const hosts = state.hosts;
  const services = [...new Set(hosts.flatMap((h) => h.services.map((s) => s.name)))].sort();
  const wanted = filter
    .split(/\s+/)
    .filter(Boolean)
    .map((p) => p.split('='));
  const shown = hosts.filter((h) => wanted.every(([k, v]) => (v === undefined ? k in h.labels : h.labels[k] === v)));
  const up = hosts.filter((h) => h.connected).length;
  const input = el('input', {
    id: 'filter',
    placeholder: 'filter by label: role=api zone=b',
    value: filter,
    oninput: (e) => {
      filter = e.target.value;
      render();
    },
  });
  return [
    el('h1', {}, 'Fleet'),
    el('div', { class: 'toolbar' }, input, el('span', { class: 'muted', id: 'fleet-count' },
      `${shown.length} of ${hosts.length} hosts · ${up} connected`)),
    el('table', { id: 'fleet' },
      el('thead', {}, el('tr', {}, el('th', {}, 'Host'), el('th', {}, 'Agent'), el('th', {}, 'Labels'),
        services.map((s) => el('th', {}, s)))),
      el('tbody', {}, shown.map((h) =>
        el('tr', { 'data-host': h.host_id, 'data-connected': h.connected },
          el('td', {}, el('a', { href: '#/hosts/' + h.host_id }, h.host_id), ' ',
            badge(h.connected ? 'connected' : 'disconnected'),
            h.connected ? null : el('div', { class: 'muted', 'data-last-seen': '' }, 'last seen ' + ago(h.last_seen))),
          el('td', { class: 'ver' }, h.agent_version),
          el('td', {}, Object.entries(h.labels).map(([k, v]) => el('span', { class: 'label' }, k + '=' + v))),
          services.map((name) => {
            const s = h.services.find((x) => x.name === name);
            if (!s) return el('td', { class: 'muted' }, '—');
            // A disconnected host's services are not known to run: what it
            // said last is shown as such.
            const shown = !h.connected ? 'unknown' : s.healthy ? s.state : s.state === 'running' ? 'unhealthy' : s.state;
            return el('td', { 'data-service': name, 'data-version': s.version, 'data-healthy': s.healthy, 'data-state': shown },
              el('span', { class: 'ver' + (s.healthy && h.connected ? '' : ' unhealthy') }, s.version), ' ',
              badge(shown));
          })))),
    ),
  ];
}

function rolloutsPage() {
  return [
    el('h1', {}, 'Rollouts'),
    state.rollouts.length === 0
      ? el('p', { class: 'muted' }, 'No rollout yet. Start one with baton rollout start PLAN.')
      : el('table', { id: 'rollouts' },
        el('thead', {}, el('tr', {}, ['Rollout', 'State', 'Services', 'Started', 'Took'].map((t) => el('th', {}, t)))),
        el('tbody', {}, state.rollouts.map((r) =>
          el('tr', { 'data-rollout': r.id, 'data-state': r.state },
            el('td', {}, el('a', { href: '#/rollouts/' + r.id }, r.id)),
            el('td', {}, badge(r.state), r.error ? el('div', { class: 'error-text' }, r.error) : null),
            el('td', {}, r.services.map((s) => el('div', {},
              s.name + ' ', el('span', { class: 'ver' }, s.version), ` · ${s.done}/${s.hosts} `, bar(s.done, s.hosts)))),
            el('td', {}, when(r.created_at)),
            el('td', {}, dur(r.created_at, TERMINAL.includes(r.state) ? r.updated_at : null)))))),
  ];
}

function actionButtons(r) {
  const session = state.session;
  const can = session && session.can_act;
  const row = el('div', { class: 'actions', id: 'actions' });
  for (const [action, label, applies] of ACTIONS) {
    row.append(el('button', {
      type: 'button',
      'data-action': action,
      class: action === 'abort' || action === 'rollback' ? 'danger' : null,
      disabled: !can || !applies(r.state),
      title: can ? null : 'sign in with an operator token to act',
      onclick: () => act(r.id, action, label),
    }, label));
  }
  if (!can) row.append(el('span', { class: 'muted' }, session ? `signed in as ${session.role}: read-only` : 'read-only: sign in to act'));
  return row;
}

async function act(id, action, label) {
  if ((action === 'abort' || action === 'rollback') && !confirm(`${label} rollout ${id}?`)) return;
  try {
    const after = await call('POST', `/api/rollouts/${encodeURIComponent(id)}/${action}`);
    detail = Object.assign({}, detail, after, { events: detail ? detail.events : [] });
    flash(`${label}: rollout ${id} is ${detail.state.replace(/_/g, ' ')}`);
    await loadDetail(id);
  } catch (e) {
    flash(`${label} failed: ${e.message}`, true);
  }
}

// Which hosts a rollout's page shows: a page of them, maybe only those in
// one state (a rollout of 10,000 hosts is drawn as counts and a page).
let hostView = { rollout: null, state: null, from: 0 };
const HOSTS_PAGE = 100;
const ACTIVE = ['staging', 'activating', 'rolling_back'];

function hostQuery() {
  const q = new URLSearchParams({ hosts_from: hostView.from, hosts_limit: HOSTS_PAGE });
  if (hostView.state) q.set('state', hostView.state);
  return q.toString();
}

function showHosts(state, from) {
  hostView = { rollout: hostView.rollout, state, from };
  loadDetail(hostView.rollout, true);
}

function failureCell(h) {
  return el('td', { class: 'error-text', 'data-failure': h.failure || '' },
    h.failure ? el('span', { class: 'failure-kind' }, h.failure.replace(/_/g, ' ') + ': ') : null, h.error,
    h.probe ? el('div', { class: 'probe', 'data-probe': '' }, 'probe: ', h.probe) : null,
    h.log_tail ? el('details', { 'data-log-tail': '' }, el('summary', {}, 'last log lines'), el('pre', { class: 'log' }, h.log_tail)) : null);
}

function hostRow(h) {
  // Only a healthy host is done: a rolled-back or failed one is not
  // drawn as progress.
  const width = h.state === 'healthy' ? 100 : ACTIVE.includes(h.state) ? h.progress_percent : 0;
  const b = bar(width, 100);
  if (['failed', 'rolled_back'].includes(h.state)) b.classList.add('bad');
  return el('tr', { 'data-host': h.host_id, 'data-state': h.state },
    el('td', {}, el('a', { href: '#/hosts/' + h.host_id }, h.host_id),
      h.connected ? '' : el('span', { class: 'error-text' }, ' (disconnected)')),
    el('td', {}, badge(h.state), h.gate_deadline ? el('div', {}, countdown(h.gate_deadline, 'health gate:')) : null),
    el('td', { class: 'ver' }, `${h.from_version || '(none)'} → ${h.to_version}`),
    el('td', {}, ACTIVE.includes(h.state) ? h.progress_percent + '%' : '', b),
    el('td', {}, when(h.started_at)),
    el('td', {}, dur(h.started_at, h.finished_at)),
    failureCell(h));
}

// A check's samples as a small chart: the new version's (red) over the
// baseline's (grey), in the order they were taken. SVG through the DOM
// (no inline styles: the Content-Security-Policy forbids them).
function chart(c) {
  const NS = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(NS, 'svg');
  const [w, h] = [240, 60];
  svg.setAttribute('viewBox', `0 0 ${w} ${h}`);
  svg.setAttribute('class', 'chart');
  svg.setAttribute('data-chart', c.check);
  const all = c.new.concat(c.baseline);
  const top = Math.max(...all, 1e-12);
  const line = (values, cls) => {
    if (!values.length) return;
    const p = document.createElementNS(NS, 'polyline');
    const step = values.length > 1 ? w / (values.length - 1) : 0;
    p.setAttribute('points', values.map((v, i) => `${(i * step).toFixed(1)},${(h - 2 - (v / top) * (h - 4)).toFixed(1)}`).join(' '));
    p.setAttribute('class', cls);
    svg.append(p);
  };
  line(c.baseline, 'base');
  line(c.new, 'new');
  return svg;
}

function analysisBlock(s, charts) {
  if (!s.analysis.length && !s.baking && !s.approval) return null;
  const byCheck = Object.fromEntries((charts || []).map((c) => [c.check, c]));
  return el('div', { class: 'analysis', 'data-analysis': '' },
    s.approval ? el('p', { class: 'muted' }, 'needs approval: promote by an operator other than the one who started it') : null,
    s.baking ? el('p', { 'data-baking': '' }, `analysing step ${s.baking.step} since ${when(s.baking.since)}`) : null,
    s.analysis.length ? el('table', { class: 'verdicts' },
      el('thead', {}, el('tr', {}, ['Check', 'Step', 'Verdict', 'New', 'Baseline', 'Why', 'Samples'].map((t) => el('th', {}, t)))),
      el('tbody', {}, s.analysis.map((v) => el('tr', { 'data-verdict': v.verdict, 'data-check': v.name },
        el('td', {}, v.name, el('div', { class: 'muted' }, v.kind)),
        el('td', {}, v.step),
        el('td', {}, badge(v.verdict)),
        el('td', {}, v.value ?? ''),
        el('td', {}, v.baseline ?? ''),
        el('td', { class: 'reason' }, v.reason),
        el('td', {}, byCheck[v.name] && byCheck[v.name].step === v.step ? chart(byCheck[v.name]) : ''))))) : null);
}

function serviceSection(s) {
  const inFlight = s.hosts.filter((h) => ACTIVE.includes(h.state));
  const chips = el('div', { class: 'counts', 'data-counts': '' },
    el('button', { type: 'button', class: 'chip' + (hostView.state ? '' : ' current'), onclick: () => showHosts(null, 0) },
      `all ${s.hosts_total}`),
    Object.entries(s.counts).map(([state, n]) => el('button', {
      type: 'button', class: 'chip s-' + state + (hostView.state === state ? ' current' : ''), 'data-count': state,
      onclick: () => showHosts(state, 0),
    }, `${state.replace(/_/g, ' ')} ${n}`)));
  const last = Math.min(s.hosts_from + s.hosts.length, s.hosts_matching);
  const pager = s.hosts_matching > s.hosts.length ? el('div', { class: 'pager', 'data-pager': '' },
    el('button', { type: 'button', disabled: s.hosts_from === 0, onclick: () => showHosts(hostView.state, Math.max(0, s.hosts_from - HOSTS_PAGE)) }, '← previous'),
    el('span', { class: 'muted' }, ` hosts ${s.hosts_from + 1}–${last} of ${s.hosts_matching} `),
    el('button', { type: 'button', disabled: last >= s.hosts_matching, onclick: () => showHosts(hostView.state, s.hosts_from + HOSTS_PAGE) }, 'next →')) : null;
  return el('section', { 'data-service': s.name },
    el('h2', {}, `${s.name} → ${s.version} `, badge(s.state)),
    el('div', { class: 'steps' }, s.steps.map((n, i) => el('span', {
      class: 'step' + (i + 1 < s.step ? ' done' : i + 1 === s.step ? ' current' : ''),
    }, `step ${i + 1}: ${n} hosts`)),
    el('span', { class: 'muted' }, ` · at most ${s.max_parallel} at once, ${s.min_healthy} kept healthy, healthy for ${span(s.min_healthy_time_ms)} within ${span(s.healthy_deadline_ms)}`),
    inFlight.length ? el('span', { class: 'muted', 'data-batch': '' }, ' · in flight: ' + inFlight.map((h) => h.host_id).join(', ')) : null),
    analysisBlock(s, s.charts),
    chips,
    el('table', { class: 'hosts' },
      el('thead', {}, el('tr', {}, ['Host', 'State', 'Version', 'Progress', 'Started', 'Took', 'Error'].map((t) => el('th', {}, t)))),
      el('tbody', {}, s.hosts.map(hostRow))),
    pager);
}

async function olderEvents(id) {
  const first = detail.events.length ? detail.events[0].seq : 0;
  try {
    const page = await call('GET', '/api/rollouts/' + encodeURIComponent(id) + '?before=' + first + '&' + hostQuery());
    detail.events = page.events.concat(detail.events);
    await render();
  } catch (e) {
    flash(e.message, true);
  }
}

function rolloutPage(id) {
  if (!detail || detail.id !== id) return [el('h1', {}, 'Rollout ' + id), el('p', { class: 'muted' }, 'Loading…')];
  const r = detail;
  const byName = Object.fromEntries(r.services.map((s) => [s.name, s]));
  const graph = el('div', { class: 'graph', id: 'graph' }, r.waves.map((names, i) =>
    el('div', { class: 'wave' }, el('div', { class: 'wave-title' }, 'wave ' + (i + 1)), names.map((n) => {
      const s = byName[n];
      const done = s.counts.healthy || 0;
      return el('div', { class: 'svc s-' + s.state, 'data-service': s.name },
        el('div', { class: 'name' }, s.name, ' ', el('span', { class: 'ver' }, s.version)),
        el('div', {}, badge(s.state), ` step ${s.step}/${s.steps.length}`),
        el('div', { class: 'muted' }, `${done}/${s.hosts_total} hosts healthy`),
        bar(done, s.hosts_total),
        s.depends_on.length ? el('div', { class: 'muted' }, 'after ' + s.depends_on.join(', ')) : null);
    }))));
  const first = r.events.length ? r.events[0].seq : 0;
  const events = el('table', { id: 'events' },
    el('thead', {}, el('tr', {}, ['#', 'At', 'What', 'Change', 'Who', 'Details'].map((t) => el('th', {}, t)))),
    el('tbody', {}, r.events.map((e) => el('tr', { 'data-seq': e.seq },
      el('td', {}, e.seq),
      el('td', {}, when(e.at)),
      el('td', {}, [e.kind, e.service, e.host].filter(Boolean).join(' ')),
      el('td', {}, e.from ? e.from + ' → ' : '', e.to || ''),
      el('td', {}, e.who || ''),
      el('td', {}, e.message || '',
        e.detail && e.detail.probe ? el('div', { class: 'probe' }, 'probe: ', e.detail.probe) : null)))));
  return [
    el('h1', {}, 'Rollout ', el('span', { class: 'ver' }, r.id), ' ', el('span', { id: 'rollout-state', 'data-state': r.state }, badge(r.state))),
    el('p', { class: 'muted', id: 'rollout-times' }, `started ${when(r.created_at)} · ${TERMINAL.includes(r.state) ? 'took' : 'running for'} ${dur(r.created_at, TERMINAL.includes(r.state) ? r.updated_at : null)}`),
    r.error ? el('p', { class: 'error-text', id: 'rollout-error' }, r.error) : null,
    r.held ? el('p', { class: 'held', id: 'rollout-held' }, 'held: ' + r.held) : null,
    actionButtons(r),
    el('h2', {}, 'Services'),
    graph,
    r.services.map(serviceSection),
    el('h2', {}, 'Events'),
    first > 0 ? el('button', { type: 'button', id: 'older-events', onclick: () => olderEvents(id) }, `older events (before #${first})`) : null,
    events,
  ];
}

async function showLog(hostId, service, target) {
  target.textContent = 'Loading…';
  try {
    const log = await call('GET', `/api/hosts/${encodeURIComponent(hostId)}/logs/${encodeURIComponent(service)}`);
    target.textContent = log.text || '(the log is empty)';
  } catch (e) {
    target.textContent = e.message;
  }
}

async function hostPage(id) {
  const host = state.hosts.find((h) => h.host_id === id);
  const page = [el('h1', {}, 'Host ' + id)];
  if (!host) return page.concat(el('p', { class: 'muted' }, 'No such host.'));
  page.push(el('p', {}, badge(host.connected ? 'connected' : 'disconnected'),
    ` agent ${host.agent_version} · ${host.peer_address} · last seen ${when(host.last_seen)} (${ago(host.last_seen)})`));
  page.push(el('div', { id: 'host-labels' }, Object.entries(host.labels).map(([k, v]) => el('span', { class: 'label' }, k + '=' + v))));
  const canRead = state.session && ['operator', 'admin'].includes(state.session.role);
  page.push(el('h2', {}, 'Services'), el('table', { id: 'host-services' },
    el('thead', {}, el('tr', {}, ['Service', 'Version', 'State', 'Recent log'].map((t) => el('th', {}, t)))),
    el('tbody', {}, host.services.map((s) => {
      const out = el('pre', { class: 'log', 'data-log': s.name });
      const shown = !host.connected ? 'unknown' : s.healthy ? s.state : s.state === 'running' ? 'unhealthy' : s.state;
      return el('tr', { 'data-service': s.name },
        el('td', {}, s.name),
        el('td', { class: 'ver' }, s.version),
        el('td', {}, badge(shown)),
        el('td', {}, canRead
          ? el('button', { type: 'button', 'data-show-log': s.name, onclick: () => showLog(id, s.name, out) }, 'show the last 50 lines')
          : el('span', { class: 'muted' }, 'sign in as an operator to read'), out));
    }))));
  let history = [];
  try {
    history = await call('GET', '/api/hosts/' + encodeURIComponent(id) + '/history');
  } catch (e) {
    flash(e.message, true);
  }
  page.push(el('h2', {}, 'Activations'), el('table', { id: 'history' },
    el('thead', {}, el('tr', {}, ['Rollout', 'Service', 'Version', 'State', 'Started', 'Took', 'Error'].map((t) => el('th', {}, t)))),
    el('tbody', {}, history.map((a) => el('tr', {},
      el('td', {}, el('a', { href: '#/rollouts/' + a.rollout_id }, a.rollout_id)),
      el('td', {}, a.service),
      el('td', { class: 'ver' }, `${a.from_version || '(none)'} → ${a.to_version}`),
      el('td', {}, badge(a.state)),
      el('td', {}, when(a.started_at)),
      el('td', {}, dur(a.started_at, a.finished_at)),
      el('td', { class: 'error-text' }, a.error))))));
  return page;
}

// ---- drawing and data --------------------------------------------------

let drawing = Promise.resolve();
// A redraw between a button's press and its release would lose the click:
// while the mouse is down, redraws wait for it to come up.
let pressed = false;
let deferred = false;

function render() {
  if (pressed) {
    deferred = true;
    return drawing;
  }
  drawing = drawing.then(draw, draw);
  return drawing;
}

async function draw() {
  if (!state) return;
  const { page, id } = route();
  for (const n of ['fleet', 'rollouts']) {
    document.getElementById('nav-' + n).classList.toggle('active', page === n || (n === 'rollouts' && page === 'rollouts' && id));
  }
  const s = state.session;
  document.getElementById('login').hidden = !!s;
  document.getElementById('signed-in').hidden = !s;
  document.getElementById('who').textContent = s ? `${s.who} (${s.role})` : '';
  let content;
  if (page === 'rollouts' && id) content = rolloutPage(id);
  else if (page === 'rollouts') content = rolloutsPage();
  else if (page === 'hosts' && id) content = await hostPage(id);
  else content = fleetPage();
  // Typing in the filter goes on through a redraw.
  const focused = document.activeElement && document.activeElement.id === 'filter'
    ? [document.activeElement.selectionStart, document.activeElement.selectionEnd] : null;
  document.getElementById('page').replaceChildren(...content.flat().filter(Boolean));
  const filterInput = document.getElementById('filter');
  if (focused && filterInput) {
    filterInput.focus();
    filterInput.setSelectionRange(focused[0], focused[1]);
  }
}

// Only the newest request's answer is drawn; a page that has the rollout
// asks only for the events it has not seen.
let detailRequest = 0;

async function loadDetail(id, fresh) {
  const mine = ++detailRequest;
  if (hostView.rollout !== id) hostView = { rollout: id, state: null, from: 0 };
  const have = !fresh && detail && detail.id === id && detail.events.length ? detail.events : null;
  const url = '/api/rollouts/' + encodeURIComponent(id) + '?' + hostQuery()
    + (have ? '&since=' + (have[have.length - 1].seq + 1) : '');
  try {
    const next = await call('GET', url);
    if (mine !== detailRequest) return;
    // The history is kept whole: new events are added, none dropped.
    if (have) next.events = have.concat(next.events);
    else if (fresh && detail && detail.id === id) next.events = detail.events;
    detail = next;
  } catch (e) {
    if (mine !== detailRequest) return;
    detail = null;
    flash(e.message, true);
  }
  await render();
}

function onState(body) {
  state = body;
  const { page, id } = route();
  if (page === 'rollouts' && id) loadDetail(id);
  else render();
}

function connect() {
  if (source) source.close();
  source = new EventSource('/api/live');
  const live = document.getElementById('live');
  source.addEventListener('open', () => {
    live.textContent = 'live';
    live.className = 'live on';
  });
  source.addEventListener('error', () => {
    live.textContent = 'reconnecting…';
    live.className = 'live off';
  });
  source.addEventListener('state', (e) => onState(JSON.parse(e.data)));
}

document.addEventListener('mousedown', () => {
  pressed = true;
});
document.addEventListener('mouseup', () => {
  pressed = false;
  if (deferred) {
    deferred = false;
    // After the click's own handler.
    setTimeout(render, 0);
  }
});

document.addEventListener('DOMContentLoaded', () => {
  document.getElementById('login').addEventListener('submit', async (e) => {
    e.preventDefault();
    const token = document.getElementById('token');
    try {
      await call('POST', '/api/login', { token: token.value });
      token.value = '';
      flash('Signed in.');
      connect();
    } catch (err) {
      flash('Sign-in failed: ' + err.message, true);
    }
  });
  document.getElementById('sign-out').addEventListener('click', async () => {
    await call('POST', '/api/logout').catch(() => {});
    flash('Signed out.');
    connect();
  });
  window.addEventListener('hashchange', () => {
    flash('');
    const { page, id } = route();
    if (page === 'rollouts' && id) loadDetail(id);
    else render();
  });
  connect();
});
