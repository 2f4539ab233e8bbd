// chunkvault console: a client of the JSON admin API (the same routes the
// CLI's `chunkvault admin` uses). No framework and no build step: the
// server builds this file into its binary. The DOM is made with
// createElement and textContent only (never HTML from strings), which the
// page's Content-Security-Policy would refuse to run anyway.
'use strict';

(() => {
  const TOKEN_KEY = 'chunkvault.console.adminToken';
  const USERS_PER_REQUEST = 1000;
  const AUDIT_PAGE = 200;
  const DAYS = 30;

  const state = { token: null, who: null, navigated: false };

  // ---------------------------------------------------------------- DOM

  /** An element: h('a', {href: '#', class: 'x', on: {click: f}}, 'text', child). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'on') {
        for (const [ev, f] of Object.entries(v)) el.addEventListener(ev, f);
      } else if (k === 'text') {
        el.textContent = v;
      } else if (k === 'dataset') {
        Object.assign(el.dataset, v);
      } else if (k === 'value') {
        el.value = v;
      } else if (k === 'checked') {
        el.checked = Boolean(v);
      } else {
        el.setAttribute(k === 'class' ? 'class' : k, v === true ? '' : String(v));
      }
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  const SVG = 'http://www.w3.org/2000/svg';
  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    for (const c of children.flat()) {
      if (c === undefined || c === null) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  const $ = (id) => document.getElementById(id);
  let uid = 0;
  const nextId = (p) => `${p}-${++uid}`;

  /** A labelled form field: the input gets an id and its label points at it. */
  function field(labelText, input, hint, wide) {
    if (!input.id) input.id = nextId('f');
    const parts = [h('label', { for: input.id, text: labelText }), input];
    if (hint) {
      const hintEl = h('p', { class: 'hint', id: `${input.id}-hint`, text: hint });
      input.setAttribute('aria-describedby', hintEl.id);
      parts.push(hintEl);
    }
    return h('div', { class: wide ? 'field wide' : 'field' }, parts);
  }

  function checkbox(labelText, name, checked) {
    const input = h('input', { type: 'checkbox', name, checked, id: nextId('c') });
    return { input, el: h('label', { class: 'check', for: input.id }, input, labelText) };
  }

  /** A table that stacks into cards on narrow screens. */
  function table(columns, rows, caption) {
    const thead = h('thead', null, h('tr', null, columns.map((c) => h('th', { scope: 'col', class: c.num ? 'num' : null, text: c.label }))));
    const tbody = h('tbody');
    for (const row of rows) {
      tbody.append(
        h(
          'tr',
          null,
          columns.map((c) => {
            const v = c.cell(row);
            const cls = [c.num ? 'num' : '', c.actions ? 'actions-cell' : '', c.id ? 'id' : ''].filter(Boolean).join(' ');
            return h('td', { 'data-label': c.label, class: cls || null }, v);
          })
        )
      );
    }
    return h('div', { class: 'table-wrap' }, h('table', { class: 'stack' }, caption ? h('caption', { class: 'offscreen', text: caption }) : null, thead, tbody));
  }

  function badge(text, kind) {
    return h('span', { class: `badge ${kind || text}`, text });
  }

  // ---------------------------------------------------------- formatting

  function bytes(n) {
    if (n === null || n === undefined) return '—';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
    let v = Number(n);
    let i = 0;
    while (v >= 1024 && i < units.length - 1) {
      v /= 1024;
      i += 1;
    }
    return `${i === 0 ? v : v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
  }

  function when(iso) {
    if (!iso) return h('span', { class: 'muted', text: 'never' });
    const d = new Date(iso);
    return h('time', { datetime: iso, title: d.toISOString() }, `${d.toLocaleString()} (${ago(d)})`);
  }

  function ago(d) {
    const secs = Math.round((Date.now() - d.getTime()) / 1000);
    const abs = Math.abs(secs);
    const [n, unit] =
      abs < 60 ? [abs, 's'] : abs < 3600 ? [Math.round(abs / 60), 'min'] : abs < 86400 ? [Math.round(abs / 3600), 'h'] : [Math.round(abs / 86400), 'd'];
    return secs >= 0 ? `${n} ${unit} ago` : `in ${n} ${unit}`;
  }

  function ratio(logical, stored) {
    if (!logical || !stored) return '—';
    return `${(logical / stored).toFixed(2)}×`;
  }

  function policiesText(p) {
    if (!p) return '';
    return [
      p.allow_restore_to_other_device ? 'restore to other devices' : 'no restore to other devices',
      p.allow_open_in ? 'open in other apps' : 'no open in other apps',
    ].join(', ');
  }

  // ------------------------------------------------------ notices, progress

  function setStatus(text) {
    $('status').textContent = text || '';
  }

  function showError(text) {
    $('error-text').textContent = text;
    $('error').hidden = false;
  }

  function clearError() {
    $('error').hidden = true;
    $('error-text').textContent = '';
  }

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function describe(e) {
    if (e instanceof ApiError) return `${e.message} (${e.code}${e.status ? `, HTTP ${e.status}` : ''})`;
    return String(e && e.message ? e.message : e);
  }

  /**
   * Runs an action with visible progress: the button is disabled and says
   * what is happening, the status line too; a failure shows the API's
   * error message. Returns the action's result, or undefined if it failed.
   */
  async function run(label, button, fn) {
    clearError();
    setStatus(`${label}…`);
    const before = button ? button.textContent : null;
    if (button) {
      button.disabled = true;
      button.setAttribute('aria-busy', 'true');
      button.textContent = `${label}…`;
    }
    try {
      const result = await fn();
      setStatus(`${label}: done.`);
      return result;
    } catch (e) {
      setStatus('');
      showError(`${label} failed: ${describe(e)}`);
      return undefined;
    } finally {
      if (button) {
        button.disabled = false;
        button.removeAttribute('aria-busy');
        button.textContent = before;
      }
    }
  }

  // ---------------------------------------------------------------- API

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${state.token}`, Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let resp;
    try {
      resp = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
        credentials: 'omit',
        referrerPolicy: 'no-referrer',
      });
    } catch (e) {
      throw new ApiError(0, 'unreachable', `the server could not be reached (${e.message})`);
    }
    const text = await resp.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = null;
    }
    if (!resp.ok) {
      const code = (data && data.error) || `http_${resp.status}`;
      const message = (data && data.message) || resp.statusText || 'the request failed';
      if (resp.status === 401 && state.who) {
        // The token was revoked (or the server's changed): sign in again.
        signOut(`Signed out: ${message} (${code})`);
      }
      throw new ApiError(resp.status, code, message);
    }
    return data;
  }

  const enc = encodeURIComponent;

  // ------------------------------------------------------------- roles

  const can = {
    write: () => state.who && state.who.role !== 'read-only',
    setQuota: () => state.who && state.who.role === 'admin' && !state.who.tenant,
    everyTenant: () => state.who && !state.who.tenant,
  };

  // ------------------------------------------------------------- dialog

  /** Asks for confirmation; resolves true only on an explicit confirm. */
  function confirmAction(title, text, okLabel) {
    const dialog = $('confirm');
    const opener = document.activeElement;
    $('confirm-title').textContent = title;
    $('confirm-text').textContent = text;
    $('confirm-ok').textContent = okLabel;
    return new Promise((resolve) => {
      const done = (answer) => {
        $('confirm-ok').removeEventListener('click', ok);
        $('confirm-cancel').removeEventListener('click', cancel);
        dialog.removeEventListener('cancel', cancel);
        if (dialog.open) dialog.close();
        if (opener && opener.isConnected) opener.focus();
        resolve(answer);
      };
      const ok = () => done(true);
      const cancel = (e) => {
        if (e) e.preventDefault();
        done(false);
      };
      $('confirm-ok').addEventListener('click', ok);
      $('confirm-cancel').addEventListener('click', cancel);
      dialog.addEventListener('cancel', cancel);
      dialog.showModal();
      $('confirm-cancel').focus();
    });
  }

  // --------------------------------------------------------------- copy

  async function copyText(text, button) {
    let ok = false;
    try {
      await navigator.clipboard.writeText(text);
      ok = true;
    } catch (_) {
      const area = h('textarea', { class: 'offscreen', readonly: true, 'aria-hidden': 'true', value: text });
      document.body.append(area);
      area.select();
      try {
        ok = document.execCommand('copy');
      } catch (_) {
        ok = false;
      }
      area.remove();
      button.focus();
    }
    const label = button.dataset.label || button.textContent;
    button.dataset.label = label;
    button.textContent = ok ? 'Copied' : 'Copy failed: select the text';
    setStatus(ok ? `${label}: copied to the clipboard.` : 'The browser refused to copy: select the text and copy it.');
    setTimeout(() => {
      button.textContent = label;
    }, 2500);
  }

  function copyButton(label, getText, name) {
    const b = h('button', { type: 'button', class: 'secondary small', dataset: { copy: name } }, label);
    b.addEventListener('click', () => copyText(getText(), b));
    return b;
  }

  // ------------------------------------------------------------ sign-in

  function showSignIn(message) {
    $('nav').hidden = true;
    $('who').hidden = true;
    document.title = 'Sign in · chunkvault console';
    const input = h('input', { type: 'password', id: 'token', name: 'token', autocomplete: 'off', spellcheck: 'false', required: true });
    const button = h('button', { type: 'submit', id: 'sign-in-button' }, 'Sign in');
    const form = h(
      'form',
      { id: 'sign-in', novalidate: true },
      field('Admin token', input, 'The server’s admin token (CHUNKVAULT_ADMIN_TOKEN) or a cvad_… token from “chunkvault admin token create”. It stays in this browser tab only.'),
      h('div', null, button)
    );
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const token = input.value.trim();
      if (!token) {
        showError('Enter an admin token.');
        input.focus();
        return;
      }
      state.token = token;
      const who = await run('Signing in', button, () => api('GET', '/v1/admin/whoami'));
      if (!who) {
        state.token = null;
        input.focus();
        return;
      }
      sessionStorage.setItem(TOKEN_KEY, token);
      input.value = '';
      signedIn(who);
      if (!location.hash.startsWith('#/')) location.hash = '#/tenants';
      else route();
    });
    $('main').replaceChildren(h('section', { class: 'card signin', 'aria-labelledby': 'signin-title' }, h('h1', { id: 'signin-title', text: 'Sign in' }), form));
    if (message) setStatus(message);
    input.focus();
  }

  function signedIn(who) {
    state.who = who;
    const scope = who.tenant ? `tenant ${who.tenant}` : 'every tenant';
    $('who-text').replaceChildren(h('span', { class: 'role', id: 'who-role', text: who.role }), ` ${scope} · token ${who.id}`);
    $('who').hidden = false;
    $('nav').hidden = false;
    $('nav-nodes').hidden = !can.everyTenant();
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    state.who = null;
    clearError();
    setStatus('');
    if (location.hash) history.replaceState(null, '', location.pathname);
    showSignIn(message || 'Signed out.');
  }

  // ------------------------------------------------------------- router

  const pages = {
    tenants: { title: 'Tenants', render: tenantsPage },
    tenant: { title: 'Tenant', render: tenantPage, nav: 'tenants' },
    tokens: { title: 'Deployment tokens', render: tokensPage },
    users: { title: 'Users', render: usersPage },
    devices: { title: 'Devices', render: devicesPage },
    device: { title: 'Device', render: devicePage, nav: 'devices' },
    nodes: { title: 'Storage nodes', render: nodesPage },
    audit: { title: 'Audit log', render: auditPage },
  };

  function parseHash() {
    const m = /^#\/([a-z]+)(?:\/([^?]*))?(?:\?(.*))?$/.exec(location.hash);
    if (!m) return { page: 'tenants', arg: null, query: new URLSearchParams() };
    return { page: m[1], arg: m[2] ? decodeURIComponent(m[2]) : null, query: new URLSearchParams(m[3] || '') };
  }

  /** Replaces the current page's query (filters) without a new history entry. */
  function setQuery(page, arg, params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v) q.set(k, v);
    const qs = q.toString();
    history.replaceState(null, '', `#/${page}${arg ? `/${enc(arg)}` : ''}${qs ? `?${qs}` : ''}`);
  }

  function route() {
    if (!state.token || !state.who) return;
    if (location.hash && !location.hash.startsWith('#/')) return;
    const { page, arg, query } = parseHash();
    const p = pages[page] || pages.tenants;
    const navName = p.nav || page;
    for (const a of document.querySelectorAll('nav a')) {
      if (a.dataset.page === navName) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    clearError();
    setStatus('');
    document.title = `${p.title}${arg ? ` ${arg}` : ''} · chunkvault console`;
    const section = h('section', { 'aria-labelledby': 'page-title', class: 'page', dataset: { page } });
    $('main').replaceChildren(section);
    p.render(section, arg, query);
    const title = $('page-title');
    if (title && state.navigated) {
      title.tabIndex = -1;
      title.focus();
    }
    state.navigated = true;
  }

  function heading(section, text) {
    const el = h('h1', { id: 'page-title', text });
    section.append(el);
    return el;
  }

  /** Loads data for a page with progress shown, into a placeholder. */
  async function load(section, label, fn) {
    const placeholder = h('p', { class: 'muted', 'aria-busy': 'true', text: `${label}…` });
    section.append(placeholder);
    const data = await run(label, null, fn);
    placeholder.remove();
    if (data !== undefined && $('status').textContent === `${label}: done.`) setStatus('');
    if (data === undefined) {
      section.append(h('p', { class: 'muted', text: 'Could not load this page; see the message above.' }), h('button', { type: 'button', class: 'secondary', on: { click: route } }, 'Try again'));
    }
    return data;
  }

  async function tenantNames() {
    if (state.who.tenant) return [state.who.tenant];
    const list = await api('GET', '/v1/admin/tenants');
    return list.map((t) => t.tenant);
  }

  function tenantSelect(names, selected, anyLabel) {
    const sel = h('select', { name: 'tenant' });
    if (anyLabel) sel.append(h('option', { value: '', text: anyLabel }));
    for (const n of names) sel.append(h('option', { value: n, text: n }));
    sel.value = selected || (anyLabel ? '' : names[0] || '');
    return sel;
  }

  // ------------------------------------------------------------ tenants

  async function tenantsPage(section) {
    heading(section, 'Tenants');
    const list = await load(section, 'Loading tenants', () => api('GET', '/v1/admin/tenants'));
    if (!list) return;
    if (list.length === 0) {
      section.append(h('p', { text: 'No tenants yet: a tenant appears with its first deployment token.' }), h('a', { href: '#/tokens' }, 'Create a deployment token'));
      return;
    }
    section.append(
      table(
        [
          { label: 'Tenant', cell: (t) => h('a', { href: `#/tenant/${enc(t.tenant)}`, text: t.tenant }) },
          { label: 'Devices', num: true, cell: (t) => h('a', { href: `#/devices?tenant=${enc(t.tenant)}`, text: String(t.devices) }) },
          { label: 'Snapshots', num: true, cell: (t) => (t.snapshots ?? '—').toString() },
          { label: 'Stored', cell: (t) => usage(t) },
          { label: 'Dedup ratio', num: true, cell: (t) => ratio(t.logical_bytes, t.stored_bytes) },
          { label: 'Reported', cell: (t) => when(t.reported_at) },
        ],
        list,
        'Tenants'
      ),
      h('p', { class: 'hint', text: 'Stored bytes are the tenant’s packs (compressed, encrypted, deduplicated) as the storage nodes last reported them; the dedup ratio is the file content of its snapshots over that.' })
    );
  }

  function usage(t) {
    const stored = t.stored_bytes;
    if (!t.quota_bytes) return h('span', null, bytes(stored), h('span', { class: 'muted', text: ' · no quota' }));
    const pct = stored ? Math.round((stored / t.quota_bytes) * 1000) / 10 : 0;
    const id = nextId('m');
    return h(
      'div',
      { class: 'usage' },
      h('span', { id, text: `${bytes(stored)} of ${bytes(t.quota_bytes)} (${pct}%)` }),
      h('meter', { min: 0, max: t.quota_bytes, low: t.quota_bytes * 0.8, high: t.quota_bytes * 0.95, optimum: 0, value: stored || 0, 'aria-labelledby': id })
    );
  }

  async function tenantPage(section, tenant) {
    heading(section, `Tenant ${tenant}`);
    const data = await load(section, `Loading tenant ${tenant}`, async () => {
      const [list, history] = await Promise.all([api('GET', '/v1/admin/tenants'), api('GET', `/v1/admin/tenants/${enc(tenant)}/history?days=${DAYS}`)]);
      return { t: list.find((x) => x.tenant === tenant), history };
    });
    if (!data) return;
    const t = data.t || { tenant, devices: 0, snapshots: null, stored_bytes: null, quota_bytes: 0, reported_at: null };
    section.append(
      h(
        'div',
        { class: 'card' },
        h(
          'dl',
          { class: 'facts' },
          h('dt', { text: 'Devices' }),
          h('dd', null, h('a', { href: `#/devices?tenant=${enc(tenant)}`, text: String(t.devices) })),
          h('dt', { text: 'Snapshots' }),
          h('dd', { text: (t.snapshots ?? '—').toString() }),
          h('dt', { text: 'Stored' }),
          h('dd', null, usage(t)),
          h('dt', { text: 'Dedup ratio' }),
          h('dd', { text: ratio(t.logical_bytes, t.stored_bytes) }),
          h('dt', { text: 'Reported' }),
          h('dd', null, when(t.reported_at))
        )
      )
    );
    const days = data.history.map((d) => d.day);
    section.append(
      h('h2', { text: `The last ${DAYS} days` }),
      h(
        'div',
        { class: 'charts' },
        chart({ kind: 'line', title: 'Stored bytes', days, values: data.history.map((d) => d.stored_bytes), format: bytes }),
        chart({ kind: 'bar', title: 'Backups per day', days, values: data.history.map((d) => d.backups), format: (n) => `${n} backup${n === 1 ? '' : 's'}` })
      )
    );
    if (can.setQuota()) section.append(quotaForm(t));
  }

  function quotaForm(t) {
    const gib = h('input', { type: 'number', min: '0', step: 'any', name: 'quota', value: t.quota_bytes ? String(t.quota_bytes / 1024 ** 3) : '0' });
    const button = h('button', { type: 'submit', dataset: { action: 'set-quota' } }, 'Set quota');
    const form = h('form', { class: 'grid quota', novalidate: true }, field('Quota (GiB; 0 removes it)', gib), h('div', null, button));
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const v = Number(gib.value);
      if (!Number.isFinite(v) || v < 0) {
        showError('The quota is a number of GiB, 0 or more.');
        gib.focus();
        return;
      }
      const done = await run(`Setting tenant ${t.tenant}'s quota`, button, () => api('PUT', `/v1/admin/tenants/${enc(t.tenant)}/quota`, { quota_bytes: Math.round(v * 1024 ** 3) }));
      if (done) route();
    });
    return h('div', { class: 'card' }, h('h2', { text: 'Quota' }), form);
  }

  /** A small SVG chart of one value per day (null: nothing reported yet). */
  function chart({ kind, title, days, values, format }) {
    const W = 600;
    const H = 200;
    const pad = { l: 8, r: 8, t: 26, b: 28 };
    const iw = W - pad.l - pad.r;
    const ih = H - pad.t - pad.b;
    const known = values.filter((v) => v !== null && v !== undefined);
    const max = Math.max(1, ...known);
    const x = (i) => pad.l + (iw * (i + 0.5)) / values.length;
    const y = (v) => pad.t + ih - (ih * v) / max;
    const titleId = nextId('chart');
    const descId = nextId('chartd');
    const latest = known.length ? format(known[known.length - 1]) : 'nothing reported yet';
    const total = kind === 'bar' ? known.reduce((a, b) => a + b, 0) : null;
    const desc = kind === 'bar' ? `${total} in ${values.length} days; most in one day: ${Math.max(0, ...known)}.` : `Latest: ${latest}; highest: ${known.length ? format(max) : '—'}.`;
    const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-labelledby': `${titleId} ${descId}` }, s('title', { id: titleId }, `${title}, ${days[0]} to ${days[days.length - 1]}`), s('desc', { id: descId }, desc));
    svg.append(s('line', { class: 'grid', x1: pad.l, x2: W - pad.r, y1: pad.t, y2: pad.t }), s('line', { class: 'axis', x1: pad.l, x2: W - pad.r, y1: pad.t + ih, y2: pad.t + ih }));
    svg.append(s('text', { x: pad.l, y: 17 }, `max ${format(kind === 'bar' ? Math.max(0, ...known) : max)}`));
    svg.append(s('text', { x: pad.l, y: H - 6 }, days[0]), s('text', { x: W - pad.r, y: H - 6, 'text-anchor': 'end' }, days[days.length - 1]));
    if (kind === 'bar') {
      const bw = Math.max(2, (iw / values.length) * 0.7);
      values.forEach((v, i) => {
        const n = v || 0;
        const top = y(n);
        svg.append(s('rect', { class: 'bar', x: x(i) - bw / 2, y: top, width: bw, height: Math.max(n ? 1 : 0, pad.t + ih - top) }, s('title', null, `${days[i]}: ${format(n)}`)));
      });
    } else {
      let seg = [];
      const runs = [];
      values.forEach((v, i) => {
        if (v === null || v === undefined) {
          if (seg.length) runs.push(seg);
          seg = [];
        } else seg.push([x(i), y(v), i]);
      });
      if (seg.length) runs.push(seg);
      for (const r of runs) {
        const pts = r.map(([px, py]) => `${px.toFixed(1)},${py.toFixed(1)}`).join(' ');
        const base = (pad.t + ih).toFixed(1);
        svg.append(s('polygon', { class: 'area', points: `${r[0][0].toFixed(1)},${base} ${pts} ${r[r.length - 1][0].toFixed(1)},${base}` }));
        svg.append(s('polyline', { class: 'line', points: pts }));
        for (const [px, py, i] of r) svg.append(s('circle', { class: 'dot', cx: px, cy: py, r: 3 }, s('title', null, `${days[i]}: ${format(values[i])}`)));
      }
    }
    const rows = days.map((d, i) => ({ d, v: values[i] }));
    return h(
      'figure',
      { class: 'card chart', dataset: { chart: kind } },
      h('h3', { text: title }),
      svg,
      h('details', null, h('summary', { text: 'The numbers' }), table([{ label: 'Day', cell: (r) => r.d }, { label: title, num: true, cell: (r) => (r.v === null || r.v === undefined ? '—' : format(r.v)) }], rows, title))
    );
  }

  // ----------------------------------------------------- deployment tokens

  async function tokensPage(section, _arg, query) {
    heading(section, 'Deployment tokens');
    const data = await load(section, 'Loading deployment tokens', async () => {
      const [tokens, names] = await Promise.all([api('GET', '/v1/admin/deployment-tokens'), tenantNames()]);
      return { tokens, names };
    });
    if (!data) return;
    const result = h('div', { id: 'token-result' });
    if (can.write()) section.append(createTokenForm(data.names, result, query.get('tenant')), result);
    section.append(h('h2', { text: 'Tokens' }), tokenList(data.tokens));
  }

  function createTokenForm(names, result, preset) {
    const tenant = h('input', { type: 'text', name: 'tenant', required: true, list: 'tenant-names', autocomplete: 'off', value: state.who.tenant || preset || '', pattern: '[a-z0-9_][a-z0-9_-]{0,63}' });
    if (state.who.tenant) tenant.readOnly = true;
    const datalist = h('datalist', { id: 'tenant-names' }, names.map((n) => h('option', { value: n })));
    const days = h('input', { type: 'number', name: 'expires', min: '1', step: '1', value: '30', required: true });
    const max = h('input', { type: 'number', name: 'max_activations', min: '1', step: '1', placeholder: 'no limit' });
    const restore = checkbox('Allow restoring to another device (allowRestoreToOtherDevice)', 'allowRestoreToOtherDevice', true);
    const openIn = checkbox('Allow opening files in other apps (allowOpenIn)', 'allowOpenIn', true);
    const provisioned = checkbox('Only users added on the Users page may activate (provisioned only)', 'provisioned_only', false);
    const server = h('input', { type: 'text', name: 'server_url', value: location.origin, required: true });
    const email = h('input', { type: 'text', name: 'user_email', value: '{{mail}}', required: true });
    const button = h('button', { type: 'submit', id: 'create-token', dataset: { action: 'create-token' } }, 'Create token');
    const form = h(
      'form',
      { class: 'grid', id: 'token-form', novalidate: true },
      field('Tenant', tenant, state.who.tenant ? 'Your token covers this tenant only.' : 'a-z, 0-9, - and _; a new name creates the tenant.'),
      datalist,
      field('Expires in (days)', days),
      field('Max activations', max, 'Empty: no limit.'),
      h('fieldset', { class: 'wide' }, h('legend', { text: 'Policies of the devices it activates' }), restore.el, openIn.el, provisioned.el),
      field('Server URL in the managed configuration', server, 'The URL devices reach this server at.'),
      field('User email in the managed configuration', email, 'Your MDM’s variable for the user’s email, e.g. {{mail}}.'),
      h('div', { class: 'field wide' }, h('div', { class: 'actions' }, button))
    );
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const t = tenant.value.trim();
      if (!/^[a-z0-9_][a-z0-9_-]{0,63}$/.test(t)) {
        showError('Tenant: 1 to 64 of a-z, 0-9, - and _ (not starting with -).');
        tenant.focus();
        return;
      }
      const d = Number(days.value);
      if (!Number.isInteger(d) || d < 1) {
        showError('Expires in: a whole number of days, at least 1.');
        days.focus();
        return;
      }
      const m = max.value.trim() === '' ? null : Number(max.value);
      if (m !== null && (!Number.isInteger(m) || m < 1)) {
        showError('Max activations: a whole number, at least 1, or empty for no limit.');
        max.focus();
        return;
      }
      const body = {
        tenant: t,
        expires_in_secs: d * 86400,
        max_activations: m,
        policies: { allow_restore_to_other_device: restore.input.checked, allow_open_in: openIn.input.checked },
        provisioned_only: provisioned.input.checked,
      };
      const created = await run(`Creating a deployment token for ${t}`, button, () => api('POST', '/v1/admin/deployment-tokens', body));
      if (!created) return;
      showCreated(result, created, server.value.trim(), email.value.trim());
      const list = await run('Loading deployment tokens', null, () => api('GET', '/v1/admin/deployment-tokens'));
      const old = $('token-list');
      if (list && old) old.replaceWith(tokenList(list));
    });
    return h('div', { class: 'card' }, h('h2', { text: 'New deployment token' }), form);
  }

  function managedConfig(created, serverURL, userEmail) {
    return {
      serverURL,
      userEmail,
      deploymentToken: created.token,
      allowRestoreToOtherDevice: created.policies.allow_restore_to_other_device,
      allowOpenIn: created.policies.allow_open_in,
    };
  }

  function xmlEscape(v) {
    return String(v).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
  }

  /** The managed app configuration as the plist <dict> an MDM takes. */
  function plistDict(config) {
    const lines = ['<dict>'];
    for (const [k, v] of Object.entries(config)) {
      lines.push(`    <key>${xmlEscape(k)}</key>`);
      lines.push(typeof v === 'boolean' ? `    <${v}/>` : `    <string>${xmlEscape(v)}</string>`);
    }
    lines.push('</dict>');
    return lines.join('\n');
  }

  function showCreated(result, created, serverURL, userEmail) {
    const config = managedConfig(created, serverURL, userEmail);
    const json = JSON.stringify(config, null, 2);
    const plist = plistDict(config);
    const block = (title, text, name) => {
      const pre = h('pre', { id: `created-${name}`, tabindex: '0', 'aria-label': title, text });
      return [h('div', { class: 'copy-row' }, h('h3', { text: title }), copyButton(`Copy ${title.toLowerCase()}`, () => pre.textContent, name)), pre];
    };
    const tokenEl = h('code', { class: 'token', id: 'created-token', tabindex: '0', text: created.token });
    const done = h('button', { type: 'button', class: 'secondary', on: { click: () => result.replaceChildren() } }, 'Done: hide the secret');
    const card = h(
      'div',
      { class: 'card secret', role: 'region', 'aria-labelledby': 'created-title', tabindex: '-1' },
      h('h2', { id: 'created-title', text: `Deployment token ${created.token_id} for ${created.tenant}` }),
      h('p', { class: 'warning', text: 'The token is shown this once: copy it now. Only its id is kept.' }),
      h('p', null, 'Expires ', when(created.expires_at), '. Policies: ', policiesText(created.policies), created.provisioned_only ? '; provisioned users only.' : '.'),
      h('div', { class: 'copy-row' }, h('h3', { text: 'Token' }), copyButton('Copy token', () => created.token, 'token')),
      tokenEl,
      block('Managed configuration (JSON)', json, 'json'),
      block('Managed configuration (plist dict)', plist, 'plist'),
      h('div', { class: 'actions' }, done)
    );
    result.replaceChildren(card);
    card.focus();
  }

  function tokenList(tokens) {
    const now = Date.now();
    const stateOf = (t) => (t.revoked ? 'revoked' : new Date(t.expires_at).getTime() <= now ? 'expired' : 'active');
    const el = tokens.length
      ? table(
          [
            { label: 'Token id', id: true, cell: (t) => h('code', { text: t.token_id }) },
            { label: 'Tenant', cell: (t) => t.tenant },
            { label: 'State', cell: (t) => badge(stateOf(t)) },
            { label: 'Activations', num: true, cell: (t) => `${t.activations} / ${t.max_activations ?? '∞'}` },
            { label: 'Policies', cell: (t) => policiesText(t.policies) + (t.provisioned_only ? '; provisioned only' : '') },
            { label: 'Created', cell: (t) => when(t.created_at) },
            { label: 'Expires', cell: (t) => when(t.expires_at) },
            {
              label: 'Actions',
              actions: true,
              cell: (t) =>
                can.write() && !t.revoked
                  ? h('button', { type: 'button', class: 'danger small', 'aria-label': `Revoke deployment token ${t.token_id}`, dataset: { action: 'revoke', token: t.token_id }, on: { click: (e) => revokeToken(t, e.currentTarget) } }, 'Revoke')
                  : '',
            },
          ],
          tokens,
          'Deployment tokens'
        )
      : h('p', { class: 'muted', text: 'No deployment tokens yet.' });
    return h('div', { id: 'token-list' }, el);
  }

  async function revokeToken(t, button) {
    const ok = await confirmAction(`Revoke deployment token ${t.token_id}?`, `Token ${t.token_id} of tenant ${t.tenant} will activate no more devices. Devices it already activated keep working.`, 'Revoke token');
    if (!ok) return;
    const done = await run(`Revoking deployment token ${t.token_id}`, button, () => api('POST', `/v1/admin/deployment-tokens/${enc(t.token_id)}/revoke`));
    if (done) route();
  }

  // --------------------------------------------------------------- users

  /** Email addresses in pasted text or a CSV: any cell that looks like one. */
  function parseEmails(text) {
    const found = [];
    const skipped = [];
    for (const raw of text.split(/[\n\r,;\t]+/)) {
      const cell = raw.trim().replace(/^"(.*)"$/, '$1').trim();
      if (!cell) continue;
      if (/^[^\s@]+@[^\s@]+$/.test(cell) && cell.length <= 254) {
        if (!found.includes(cell)) found.push(cell);
      } else skipped.push(cell);
    }
    return { found, skipped };
  }

  async function usersPage(section, _arg, query) {
    heading(section, 'Users');
    section.append(h('p', { class: 'hint', text: 'Provisioned users may activate with the tenant’s “provisioned only” deployment tokens. Emails compare exactly.' }));
    const names = await load(section, 'Loading tenants', tenantNames);
    if (!names) return;
    if (names.length === 0) {
      section.append(h('p', { text: 'No tenants yet.' }));
      return;
    }
    const chosen = query.get('tenant') && names.includes(query.get('tenant')) ? query.get('tenant') : names[0];
    const select = tenantSelect(names, chosen);
    select.addEventListener('change', () => {
      setQuery('users', null, { tenant: select.value });
      showUsers();
    });
    const pick = h('div', { class: 'filters' }, field('Tenant', select));
    if (state.who.tenant) select.disabled = true;
    const body = h('div');
    section.append(h('div', { class: 'card' }, pick), body);
    const showUsers = async () => {
      const tenant = select.value;
      body.replaceChildren();
      const users = await load(body, `Loading users of ${tenant}`, () => api('GET', `/v1/admin/tenants/${enc(tenant)}/users`));
      if (!users) return;
      if (can.write()) body.append(addUsersForm(tenant));
      body.append(h('h2', { text: `Users of ${tenant}` }), h('p', { class: 'count', id: 'user-count', text: `${users.length} user${users.length === 1 ? '' : 's'}` }));
      if (users.length) {
        body.append(
          table(
            [
              { label: 'Email', id: true, cell: (u) => u.email },
              { label: 'Added', cell: (u) => when(u.added_at) },
              {
                label: 'Actions',
                actions: true,
                cell: (u) =>
                  can.write()
                    ? h('button', { type: 'button', class: 'danger small', 'aria-label': `Remove user ${u.email}`, dataset: { action: 'remove-user', email: u.email }, on: { click: (e) => removeUser(tenant, u.email, e.currentTarget, showUsers) } }, 'Remove')
                    : '',
              },
            ],
            users,
            `Users of ${tenant}`
          )
        );
      }
    };
    showUsers();
  }

  function addUsersForm(tenant) {
    const text = h('textarea', { name: 'emails', rows: '5', spellcheck: 'false', placeholder: 'ann@example.com\nbob@example.com' });
    const file = h('input', { type: 'file', name: 'csv', accept: '.csv,.txt,text/csv,text/plain' });
    const preview = h('p', { class: 'hint', 'aria-live': 'polite', id: 'users-preview' });
    const button = h('button', { type: 'submit', id: 'add-users', dataset: { action: 'add-users' } }, 'Add users');
    const update = () => {
      const { found, skipped } = parseEmails(text.value);
      preview.textContent = `${found.length} address${found.length === 1 ? '' : 'es'} to add${skipped.length ? `; not addresses, left out: ${skipped.slice(0, 5).join(', ')}${skipped.length > 5 ? ', …' : ''}` : ''}.`;
    };
    text.addEventListener('input', update);
    file.addEventListener('change', async () => {
      const f = file.files && file.files[0];
      if (!f) return;
      if (f.size > 10 * 1024 * 1024) {
        showError('That file is larger than 10 MiB; split it.');
        return;
      }
      const content = await f.text();
      text.value = (text.value.trim() ? `${text.value.trim()}\n` : '') + content;
      update();
      setStatus(`Read ${f.name}.`);
    });
    const form = h(
      'form',
      { class: 'grid', id: 'users-form', novalidate: true },
      field('Emails (one a line, or separated by commas)', text, null, true),
      field('Or upload a CSV file', file, 'Every cell that is an email address is taken.'),
      h('div', { class: 'field wide' }, preview, h('div', { class: 'actions' }, button))
    );
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const { found } = parseEmails(text.value);
      if (!found.length) {
        showError('Paste or upload at least one email address.');
        text.focus();
        return;
      }
      const added = await run(`Adding ${found.length} user${found.length === 1 ? '' : 's'} to ${tenant}`, button, async () => {
        let n = 0;
        for (let i = 0; i < found.length; i += USERS_PER_REQUEST) {
          const r = await api('POST', `/v1/admin/tenants/${enc(tenant)}/users`, { emails: found.slice(i, i + USERS_PER_REQUEST) });
          n += r.changed.length;
          setStatus(`Adding users to ${tenant}: ${Math.min(i + USERS_PER_REQUEST, found.length)} of ${found.length}…`);
        }
        return n;
      });
      if (added === undefined) return;
      text.value = '';
      file.value = '';
      route();
      setStatus(`Added ${added} user${added === 1 ? '' : 's'} to ${tenant}${found.length - added ? `; ${found.length - added} already listed` : ''}.`);
    });
    return h('div', { class: 'card' }, h('h2', { text: `Add users to ${tenant}` }), form);
  }

  async function removeUser(tenant, email, button, refresh) {
    const ok = await confirmAction(`Remove user ${email}?`, `${email} will no longer be able to activate devices in tenant ${tenant} with a provisioned-only token. Devices already activated keep working: retire them on the Devices page.`, 'Remove user');
    if (!ok) return;
    const done = await run(`Removing ${email} from ${tenant}`, button, () => api('DELETE', `/v1/admin/tenants/${enc(tenant)}/users/${enc(email)}`));
    if (done) refresh();
  }

  // ------------------------------------------------------------- devices

  const STATES = ['active', 'blocked', 'retired', 'wiped', 'reset'];

  /** What each action does, for its button and its confirmation. */
  const ACTIONS = {
    retire: { label: 'Retire', danger: true, says: (d) => `${d.device_id} stops working: its next request is refused, and it signs out and clears its local state.` },
    block: { label: 'Block', danger: true, says: (d) => `${d.device_id} gets no new sessions until you allow it again; storage nodes refuse it after their next check-in.` },
    allow: { label: 'Allow', danger: false, says: (d) => `${d.device_id} may start sessions again.` },
    wipe: { label: 'Wipe', danger: true, says: (d) => `${d.device_id} is retired, and it deletes the files its restores created (those still as restored) and its local state.` },
    reset: { label: 'Reset', danger: true, says: (d) => `${d.device_id}’s device token stops working for good; the device id may activate again, as a new device.` },
    delete: { label: 'Delete', danger: true, says: (d) => `${d.device_id} leaves the registry; its snapshots stay, and its id may activate again.` },
  };

  function actionsFor(deviceState) {
    switch (deviceState) {
      case 'active':
        return ['retire', 'block', 'wipe', 'reset'];
      case 'blocked':
        return ['allow', 'retire', 'wipe', 'reset'];
      case 'retired':
      case 'wiped':
        return ['reset', 'delete'];
      default:
        return [];
    }
  }

  function deviceButtons(d, after) {
    if (!can.write()) return '';
    return h(
      'div',
      { class: 'actions' },
      actionsFor(d.state).map((a) =>
        h(
          'button',
          {
            type: 'button',
            class: `small ${ACTIONS[a].danger ? 'danger' : 'secondary'}`,
            'aria-label': `${ACTIONS[a].label} device ${d.device_id}`,
            dataset: { action: a, device: d.device_id },
            on: { click: (e) => deviceAction(d, a, e.currentTarget, after) },
          },
          ACTIONS[a].label
        )
      )
    );
  }

  async function deviceAction(d, action, button, after) {
    const a = ACTIONS[action];
    const ok = await confirmAction(`${a.label} device ${d.device_id}?`, `${d.device_id} (${d.email}, tenant ${d.tenant}): ${a.says(d)}`, `${a.label} ${d.device_id}`);
    if (!ok) return;
    const done = await run(`${a.label} device ${d.device_id}`, button, () =>
      action === 'delete' ? api('DELETE', `/v1/admin/devices/${enc(d.device_id)}`) : api('POST', `/v1/admin/devices/${enc(d.device_id)}/${action}`)
    );
    if (done) {
      await after();
      setStatus(`${a.label} device ${d.device_id}: done; it is now ${done.state === 'reset' && action === 'delete' ? 'deleted' : done.state}.`);
    }
  }

  async function devicesPage(section, _arg, query) {
    heading(section, 'Devices');
    const devices = await load(section, 'Loading devices', () => api('GET', '/v1/admin/devices'));
    if (!devices) return;
    const tenants = [...new Set(devices.map((d) => d.tenant))].sort();
    const search = h('input', { type: 'search', name: 'q', value: query.get('q') || '', placeholder: 'device id or email' });
    const tenant = tenantSelect(tenants, query.get('tenant') || '', 'Any tenant');
    if (query.get('tenant') && !tenants.includes(query.get('tenant'))) {
      tenant.append(h('option', { value: query.get('tenant'), text: query.get('tenant') }));
      tenant.value = query.get('tenant');
    }
    const user = h('input', { type: 'text', name: 'user', value: query.get('user') || '', placeholder: 'email contains' });
    const st = h('select', { name: 'state' }, h('option', { value: '', text: 'Any state' }), STATES.map((x) => h('option', { value: x, text: x })));
    st.value = query.get('state') || '';
    const filters = h('form', { class: 'filters card', role: 'search', 'aria-label': 'Filter devices', novalidate: true }, field('Search', search), field('Tenant', tenant), field('User', user), field('State', st));
    filters.addEventListener('submit', (e) => e.preventDefault());
    const count = h('p', { class: 'count', id: 'device-count', 'aria-live': 'polite' });
    const list = h('div', { id: 'device-list' });
    section.append(filters, count, list);
    let all = devices;
    const refresh = async () => {
      const fresh = await run('Loading devices', null, () => api('GET', '/v1/admin/devices'));
      if (fresh) {
        all = fresh;
        draw();
      }
    };
    const draw = () => {
      const q = search.value.trim().toLowerCase();
      const u = user.value.trim().toLowerCase();
      setQuery('devices', null, { q: search.value.trim(), tenant: tenant.value, user: user.value.trim(), state: st.value });
      const shown = all.filter(
        (d) =>
          (!q || d.device_id.toLowerCase().includes(q) || d.email.toLowerCase().includes(q)) &&
          (!tenant.value || d.tenant === tenant.value) &&
          (!u || d.email.toLowerCase().includes(u)) &&
          (!st.value || d.state === st.value)
      );
      count.textContent = `Showing ${shown.length} of ${all.length} device${all.length === 1 ? '' : 's'}.`;
      list.replaceChildren(
        shown.length
          ? table(
              [
                { label: 'Device', id: true, cell: (d) => h('a', { href: `#/device/${enc(d.device_id)}`, text: d.device_id }) },
                { label: 'Tenant', cell: (d) => d.tenant },
                { label: 'User', id: true, cell: (d) => d.email },
                { label: 'State', cell: (d) => badge(d.state) },
                { label: 'Last seen', cell: (d) => when(d.last_seen) },
                { label: 'Last backup', cell: (d) => when(d.last_backup) },
                { label: 'Snapshots', num: true, cell: (d) => String(d.snapshots || 0) },
                { label: 'Actions', actions: true, cell: (d) => deviceButtons(d, refresh) },
              ],
              shown,
              'Devices'
            )
          : h('p', { class: 'muted', text: all.length ? 'No device matches these filters.' : 'No devices yet: they appear when they activate.' })
      );
    };
    for (const el of [search, user]) el.addEventListener('input', draw);
    for (const el of [tenant, st]) el.addEventListener('change', draw);
    draw();
  }

  async function devicePage(section, id) {
    heading(section, `Device ${id}`);
    const data = await load(section, `Loading device ${id}`, async () => {
      const devices = await api('GET', '/v1/admin/devices');
      const d = devices.find((x) => x.device_id === id);
      if (!d) throw new ApiError(404, 'not_found', `no device ${id} in the tenants this token covers`);
      const snapshots = await api('GET', `/v1/admin/devices/${enc(id)}/snapshots`);
      return { d, snapshots };
    });
    if (!data) return;
    const { d, snapshots } = data;
    section.append(
      h(
        'div',
        { class: 'card' },
        h(
          'dl',
          { class: 'facts' },
          h('dt', { text: 'Tenant' }),
          h('dd', null, h('a', { href: `#/tenant/${enc(d.tenant)}`, text: d.tenant })),
          h('dt', { text: 'User' }),
          h('dd', { text: d.email }),
          h('dt', { text: 'State' }),
          h('dd', { id: 'device-state' }, badge(d.state)),
          h('dt', { text: 'Activated' }),
          h('dd', null, when(d.activated_at)),
          h('dt', { text: 'Last seen' }),
          h('dd', null, when(d.last_seen)),
          h('dt', { text: 'Last backup' }),
          h('dd', null, when(d.last_backup)),
          h('dt', { text: 'Deployment token' }),
          h('dd', null, d.deployment_token_id ? h('code', { text: d.deployment_token_id }) : '—'),
          h('dt', { text: 'Policies' }),
          h('dd', { text: policiesText(d.policies) })
        ),
        deviceButtons(d, async () => route())
      ),
      h('h2', { text: `Snapshots (${snapshots.length})` })
    );
    section.append(
      snapshots.length
        ? table(
            [
              { label: 'Taken', cell: (x) => when(x.time) },
              { label: 'Snapshot', id: true, cell: (x) => h('code', { title: x.id, text: x.id.slice(0, 12) }) },
              { label: 'Files', num: true, cell: (x) => String(x.files) },
              { label: 'Size', num: true, cell: (x) => bytes(x.bytes) },
            ],
            snapshots,
            `Snapshots of ${id}`
          )
        : h('p', { class: 'muted', id: 'no-snapshots', text: 'No snapshots reported for this device.' })
    );
  }

  // --------------------------------------------------------------- nodes

  async function nodesPage(section) {
    heading(section, 'Storage nodes');
    const nodes = await load(section, 'Loading storage nodes', () => api('GET', '/v1/admin/storage-nodes'));
    if (!nodes) return;
    section.append(
      nodes.length
        ? table(
            [
              { label: 'Node', id: true, cell: (n) => h('span', null, n.name, n.local ? h('span', { class: 'muted', text: ' (this server)' }) : '') },
              { label: 'Last check-in', cell: (n) => (n.local ? h('span', { class: 'muted', text: 'in process: learns every change at once' }) : when(n.last_checkin)) },
              { label: 'Auth unreachable', cell: (n) => h('code', { text: n.auth_unreachable }) },
              { label: 'Interval', num: true, cell: (n) => `${n.checkin_interval_secs} s` },
              { label: 'Cursor', num: true, cell: (n) => String(n.cursor) },
              { label: 'Pending changes', num: true, cell: (n) => String(n.pending_changes) },
              { label: 'Status', cell: (n) => (n.stale ? badge(`stale: ${n.auth_unreachable}`, 'stale') : n.behind ? badge('behind', 'behind') : badge('current', 'ok')) },
              { label: 'Version', cell: (n) => n.version },
            ],
            nodes,
            'Storage nodes'
          )
        : h('p', { class: 'muted', text: 'No storage node has checked in during the last 30 days.' }),
      h('p', { class: 'hint', text: 'A node is behind when device changes (retires, blocks) have waited longer than its check-in interval; stale when it has not checked in for two intervals, after which it applies its auth_unreachable policy.' })
    );
  }

  // --------------------------------------------------------------- audit

  async function auditPage(section, _arg, query) {
    heading(section, 'Audit log');
    const names = await load(section, 'Loading tenants', tenantNames);
    if (!names) return;
    const tenant = tenantSelect(names, query.get('tenant') || '', state.who.tenant ? null : 'Every tenant');
    if (state.who.tenant) tenant.disabled = true;
    const since = h('input', { type: 'datetime-local', name: 'since', value: query.get('since') || '' });
    const text = h('input', { type: 'search', name: 'q', value: query.get('q') || '', placeholder: 'actor, action, target, detail' });
    const action = h('select', { name: 'action' }, h('option', { value: '', text: 'Any action' }));
    const apply = h('button', { type: 'submit' }, 'Apply');
    const filters = h('form', { class: 'filters card', role: 'search', 'aria-label': 'Filter the audit log', novalidate: true }, field('Tenant', tenant), field('Since (local time)', since), field('Action', action), field('Search', text), h('div', null, apply));
    const count = h('p', { class: 'count', id: 'audit-count', 'aria-live': 'polite' });
    const list = h('div', { id: 'audit-list' });
    section.append(filters, count, list);
    let entries = [];
    let limit = AUDIT_PAGE;
    const draw = () => {
      const q = text.value.trim().toLowerCase();
      setQuery('audit', null, { tenant: tenant.value, since: since.value, q: text.value.trim() });
      const shown = entries.filter((e) => (!action.value || e.action === action.value) && (!q || [e.actor, e.action, e.target, e.detail, e.tenant || ''].some((f) => f.toLowerCase().includes(q))));
      count.textContent = `${shown.length} entr${shown.length === 1 ? 'y' : 'ies'}, newest first${shown.length > limit ? `; showing ${limit}` : ''}.`;
      const more = shown.length > limit ? h('button', { type: 'button', class: 'secondary', on: { click: () => { limit += AUDIT_PAGE; draw(); } } }, 'Show more') : null;
      const rows = shown.length
        ? table(
            [
              { label: 'When', cell: (e) => when(e.at) },
              { label: 'Actor', cell: (e) => e.actor },
              { label: 'Action', cell: (e) => e.action },
              { label: 'Target', id: true, cell: (e) => e.target },
              { label: 'Tenant', cell: (e) => e.tenant || '—' },
              { label: 'Detail', id: true, cell: (e) => e.detail },
            ],
            shown.slice(0, limit),
            'Audit log'
          )
        : h('p', { class: 'muted', text: 'No entries.' });
      list.replaceChildren(...[rows, more].filter(Boolean));
    };
    const fetchEntries = async () => {
      const q = new URLSearchParams();
      if (tenant.value) q.set('tenant', tenant.value);
      if (since.value) {
        const d = new Date(since.value);
        if (Number.isNaN(d.getTime())) {
          showError('Since: not a date and time.');
          since.focus();
          return;
        }
        q.set('since', d.toISOString());
      }
      const got = await run('Loading the audit log', apply, () => api('GET', `/v1/admin/audit${q.toString() ? `?${q}` : ''}`));
      if (!got) return;
      entries = got;
      limit = AUDIT_PAGE;
      const chosen = action.value;
      action.replaceChildren(h('option', { value: '', text: 'Any action' }), ...[...new Set(entries.map((e) => e.action))].sort().map((a) => h('option', { value: a, text: a })));
      action.value = chosen;
      draw();
    };
    filters.addEventListener('submit', (e) => {
      e.preventDefault();
      fetchEntries();
    });
    tenant.addEventListener('change', fetchEntries);
    action.addEventListener('change', draw);
    text.addEventListener('input', draw);
    await fetchEntries();
  }

  // --------------------------------------------------------------- start

  async function start() {
    $('sign-out').addEventListener('click', () => signOut());
    $('error-close').addEventListener('click', clearError);
    $('skip').addEventListener('click', (e) => {
      e.preventDefault();
      $('main').focus();
    });
    window.addEventListener('hashchange', route);
    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (!saved) return showSignIn();
    state.token = saved;
    setStatus('Signing in…');
    try {
      signedIn(await api('GET', '/v1/admin/whoami'));
    } catch (e) {
      sessionStorage.removeItem(TOKEN_KEY);
      state.token = null;
      showSignIn();
      showError(`Signing in failed: ${describe(e)}`);
      return;
    }
    setStatus('');
    route();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
