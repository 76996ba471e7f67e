(function () {
'use strict';
var DATA = JSON.parse(document.getElementById('lg-data').textContent);
var S = {selected: new Set(), sortKey: null, sortAsc: true, filter: '', measure: null, highlight: {}, offset: 0};
var main = document.getElementById('main');

function el(tag, attrs, kids) {
  var e = document.createElement(tag);
  Object.keys(attrs || {}).forEach(function (k) {
    var v = attrs[k];
    if (v === null || v === undefined) return;
    if (k === 'text') e.textContent = v;
    else if (k === 'cls') e.className = v;
    else if (k === 'style') e.style.cssText = v;
    else if (k.slice(0, 2) === 'on') e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  });
  (kids || []).forEach(function (c) { if (c) e.appendChild(typeof c === 'string' ? document.createTextNode(c) : c); });
  return e;
}
function runById(id) { return DATA.runs.filter(function (r) { return r.id === id; })[0]; }
function secs(x) {
  if (x === undefined || x === null || isNaN(x)) return '';
  x = Math.max(0, x);
  if (x < 60) return x.toFixed(x < 10 ? 1 : 0) + ' s';
  var m = Math.floor(x / 60), s = Math.round(x - 60 * m);
  return m < 60 ? m + ' min ' + s + ' s' : Math.floor(m / 60) + ' h ' + (m % 60) + ' min';
}
function nowServer() { return DATA.live ? Date.now() / 1000 - S.offset : DATA.now; }
function badge(status) { return el('span', {cls: 'badge st-' + status, text: status, 'data-status': status}); }

// ------------------------------------------------------------------ plots
function plot(div, fig, extra) {
  var f = JSON.parse(JSON.stringify(fig));
  var layout = Object.assign({template: DATA.template, autosize: true}, f.layout || {}, extra || {});
  return Plotly.newPlot(div, f.data || [], layout, {responsive: true, displaylogo: false});
}
function purge() {
  document.querySelectorAll('.plot').forEach(function (d) { if (d.data) Plotly.purge(d); });
  main.textContent = '';
}

// ------------------------------------------------------------------ replica highlight (linked panels)
function applyHighlight(div, ids) {
  if (!div.data) return;
  var want = new Set(ids.map(String)), idx = [], sel = [], shapes = [];
  div.data.forEach(function (tr, i) {
    if (tr.type === 'heatmap' && tr.meta && tr.meta.replica_axes) {
      var n = tr.x.length;
      ids.forEach(function (id) {
        var k = tr.x.map(String).indexOf(String(id));
        if (k < 0) return;
        var line = {color: '#D55E00', width: 2.5};
        shapes.push({type: 'rect', xref: 'x', yref: 'y', x0: k - 0.5, x1: k + 0.5, y0: -0.5, y1: n - 0.5, line: line});
        shapes.push({type: 'rect', xref: 'x', yref: 'y', y0: k - 0.5, y1: k + 0.5, x0: -0.5, x1: n - 0.5, line: line});
      });
      Plotly.relayout(div, {shapes: shapes});
      return;
    }
    if (!tr.customdata || !tr.customdata.length) return;
    var s = [];
    for (var j = 0; j < tr.customdata.length; j++) {
      var c = tr.customdata[j];
      if (Array.isArray(c)) c = c[0];
      if (want.has(String(c))) s.push(j);
    }
    idx.push(i);
    sel.push(ids.length ? s : null);
  });
  if (idx.length) Plotly.restyle(div, {selectedpoints: sel}, idx);
}
function highlight(run, link, ids) {
  var key = run.id + '|' + link;
  var cur = S.highlight[key] || [];
  if (ids.length && cur.length === ids.length && cur.every(function (x, i) { return String(x) === String(ids[i]); })) ids = [];
  S.highlight[key] = ids;
  document.querySelectorAll('.plot[data-run="' + run.id + '"]').forEach(function (d) {
    if (d.getAttribute('data-link') === link) applyHighlight(d, ids);
  });
  var box = document.getElementById('highlight');
  if (box) {
    var all = Object.keys(S.highlight).filter(function (k) { return k.indexOf(run.id + '|') === 0 && S.highlight[k].length; });
    box.style.display = all.length ? 'block' : 'none';
    box.textContent = '';
    if (all.length) {
      box.appendChild(document.createTextNode('Highlighted: replica ' + all.map(function (k) { return S.highlight[k].join(' and '); }).join('; ') + ' '));
      box.appendChild(el('button', {text: 'clear', onclick: function () {
        all.forEach(function (k) { highlight(run, k.split('|')[1], []); });
      }}));
    }
  }
}
function onClick(run, link) {
  return function (ev) {
    if (!ev || !ev.points || !ev.points.length) return;
    var p = ev.points[0], ids;
    if (p.data && p.data.type === 'heatmap') ids = [p.x, p.y];
    else if (p.customdata !== undefined && p.customdata !== null) ids = [Array.isArray(p.customdata) ? p.customdata[0] : p.customdata];
    else return;
    ids = ids.filter(function (v, i, a) { return a.map(String).indexOf(String(v)) === i; });
    highlight(run, link, ids);
  };
}

// ------------------------------------------------------------------ header
function nav(active) {
  document.querySelectorAll('header nav a').forEach(function (a) {
    a.className = a.getAttribute('data-view') === active ? 'active' : '';
  });
}

// ------------------------------------------------------------------ overview
function sortValue(run, key) { var c = run.row[key]; return c ? c.v : null; }
function visibleRuns() {
  var f = S.filter.toLowerCase();
  var runs = DATA.runs.filter(function (r) {
    if (!f) return true;
    return DATA.columns.some(function (c) { return (r.row[c.key] && r.row[c.key].t || '').toLowerCase().indexOf(f) >= 0; });
  });
  if (S.sortKey) {
    var k = S.sortKey, asc = S.sortAsc ? 1 : -1;
    runs.sort(function (a, b) {
      var x = sortValue(a, k), y = sortValue(b, k);
      if (x === null || x === '') return 1;
      if (y === null || y === '') return -1;
      if (typeof x === 'number' && typeof y === 'number') return asc * (x - y);
      return asc * String(x).localeCompare(String(y));
    });
  }
  return runs;
}
function fillOverview(tbody) {
  tbody.textContent = '';
  visibleRuns().forEach(function (r) {
    var box = el('input', {type: 'checkbox', 'aria-label': 'compare ' + r.name, 'data-run': r.id});
    box.checked = S.selected.has(r.id);
    box.addEventListener('change', function () {
      if (box.checked) S.selected.add(r.id); else S.selected.delete(r.id);
      updateCompareButton();
    });
    var tr = el('tr', {'data-run': r.id}, [el('td', {}, [box])]);
    DATA.columns.forEach(function (c) {
      var cell = r.row[c.key] || {t: ''};
      var td = el('td', {cls: c.numeric ? 'num' : null, 'data-key': c.key});
      if (c.key === 'name') td.appendChild(el('a', {href: '#run/' + r.id}, [el('span', {cls: 'swatch', style: 'background:' + r.color}), cell.t]));
      else if (c.key === 'status') td.appendChild(badge(r.status));
      else td.textContent = cell.t;
      tr.appendChild(td);
    });
    tr.addEventListener('click', function (e) {
      if (e.target.tagName === 'INPUT' || e.target.tagName === 'A') return;
      location.hash = '#run/' + r.id;
    });
    tbody.appendChild(tr);
  });
}
function updateCompareButton() {
  var b = document.getElementById('compare-btn');
  if (b) { b.textContent = 'Compare selected (' + S.selected.size + ')'; b.disabled = S.selected.size < 2; }
}
function showOverview() {
  nav('overview');
  main.appendChild(el('h2', {text: 'All runs (' + DATA.runs.length + ')'}));
  if (!DATA.runs.length) { main.appendChild(el('p', {cls: 'muted', text: 'No runs yet in this folder.'})); }
  var filter = el('input', {type: 'search', id: 'filter', placeholder: 'filter runs (any column)', value: S.filter});
  var table = el('table', {id: 'overview'});
  var thead = el('thead'), htr = el('tr', {}, [el('th', {text: 'compare'})]), tbody = el('tbody');
  DATA.columns.forEach(function (c) {
    var th = el('th', {text: c.label, 'data-key': c.key, cls: S.sortKey === c.key ? (S.sortAsc ? 'asc' : 'desc') : null});
    th.addEventListener('click', function () {
      S.sortAsc = S.sortKey === c.key ? !S.sortAsc : true;
      S.sortKey = c.key;
      htr.querySelectorAll('th').forEach(function (h) { h.className = ''; });
      th.className = S.sortAsc ? 'asc' : 'desc';
      fillOverview(tbody);
    });
    htr.appendChild(th);
  });
  thead.appendChild(htr);
  table.appendChild(thead);
  table.appendChild(tbody);
  filter.addEventListener('input', function () { S.filter = filter.value; fillOverview(tbody); });
  var btn = el('button', {id: 'compare-btn', onclick: function () { location.hash = '#compare'; }});
  main.appendChild(el('div', {cls: 'toolbar'}, [filter, btn, el('span', {cls: 'muted', text: 'Click a row to open its run; tick two or more to compare them.'})]));
  main.appendChild(el('div', {cls: 'scroll'}, [table]));
  fillOverview(tbody);
  updateCompareButton();
}

// ------------------------------------------------------------------ one run
function stageList(run) {
  var box = el('div', {cls: 'stages', 'data-progress': run.id});
  (run.stages || []).forEach(function (s) {
    var what = s.state;
    var chip = el('span', {cls: 'stage ' + s.state, 'data-stage': s.name, 'data-state': s.state});
    if (s.state === 'running' && s.started) {
      var t = el('span', {cls: 'elapsed', 'data-started': s.started, text: secs(nowServer() - s.started)});
      chip.appendChild(document.createTextNode(s.name + ': running, '));
      chip.appendChild(t);
    } else {
      chip.textContent = s.name + ': ' + what + (s.seconds !== undefined && s.state === 'done' ? ' in ' + secs(s.seconds) : '');
    }
    box.appendChild(chip);
  });
  if (!(run.stages || []).length) box.appendChild(el('span', {cls: 'muted', text: 'no stage record yet'}));
  return box;
}
function problemsBox(run) {
  if (!run.problems || !run.problems.length) return null;
  return el('div', {cls: 'problems'}, [el('b', {text: 'This run is ' + ({running: 'still running', imported: 'imported, not analysed yet'}[run.status] || 'incomplete') + '. '}),
    el('ul', {}, run.problems.map(function (p) { return el('li', {text: p}); }))]);
}
function simpleTable(cols, rows, cls) {
  return el('table', {cls: cls || null}, [el('thead', {}, [el('tr', {}, cols.map(function (c) { return el('th', {text: c}); }))]),
    el('tbody', {}, rows.map(function (r) { return el('tr', {}, r.map(function (v) { return el('td', {text: String(v)}); })); }))]);
}
function showRun(run) {
  nav('');
  var head = el('div', {}, [el('a', {href: '#', text: '\u2190 all runs'}), ' ',
    el('h2', {}, [el('span', {cls: 'swatch', style: 'background:' + run.color}), run.name + ' ', badge(run.status)]),
    el('div', {cls: 'muted', text: run.folder + (run.meta && run.meta.started ? ' \u00b7 started ' + run.meta.started : '') +
      (run.meta && run.meta.finished ? ' \u00b7 finished ' + run.meta.finished : '')})]);
  if (run.report) head.appendChild(el('div', {}, [el('a', {href: run.report, target: '_blank', rel: 'noopener', text: 'static report of this run'})]));
  main.appendChild(head);
  main.appendChild(stageList(run));
  var pb = problemsBox(run);
  if (pb) main.appendChild(pb);
  main.appendChild(el('div', {id: 'highlight'}));
  if (run.summary && run.summary.length) {
    main.appendChild(el('h2', {text: 'Summary'}));
    main.appendChild(simpleTable(['finding', 'value', 'what it means'], run.summary, 'summary'));
  }
  var todo = [];
  (run.sections || []).forEach(function (sec) {
    main.appendChild(el('h2', {id: run.id + '-' + sec.id, text: sec.title}));
    var grid = el('div', {cls: 'grid'});
    sec.panels.forEach(function (p) {
      var div = el('div', {cls: 'plot', id: p.id, 'data-run': run.id, 'data-link': p.link, 'data-panel': p.id});
      grid.appendChild(el('div', {cls: 'panel ' + p.width}, [el('h3', {text: p.title}), div, el('p', {cls: 'caption', text: p.caption})]));
      todo.push([div, p]);
    });
    main.appendChild(grid);
  });
  if (run.ship) {
    main.appendChild(el('h2', {text: 'Which model to ship'}));
    main.appendChild(el('p', {text: run.ship.text}));
    if (run.ship.rows.length) main.appendChild(simpleTable(run.ship.columns, run.ship.rows));
  }
  if (!todo.length && !run.summary.length) main.appendChild(el('p', {cls: 'muted', text: 'No results in this run yet.'}));
  return Promise.all(todo.map(function (t) {
    var div = t[0], p = t[1];
    return plot(div, p.fig).then(function () {
      if (p.link) {
        div.on('plotly_click', onClick(run, p.link));
        var ids = S.highlight[run.id + '|' + p.link];
        if (ids && ids.length) applyHighlight(div, ids);
      }
    });
  })).then(function () { highlight(run, '__none__', []); });
}

// ------------------------------------------------------------------ side by side
function showCompare() {
  nav('compare');
  main.appendChild(el('h2', {text: 'Side by side'}));
  var chosen = DATA.runs.filter(function (r) { return S.selected.has(r.id); });
  var pick = el('div', {cls: 'runpick toolbar'});
  DATA.runs.forEach(function (r) {
    var box = el('input', {type: 'checkbox', 'data-run': r.id});
    box.checked = S.selected.has(r.id);
    box.addEventListener('change', function () {
      if (box.checked) S.selected.add(r.id); else S.selected.delete(r.id);
      route();
    });
    pick.appendChild(el('label', {}, [box, el('span', {cls: 'swatch', style: 'background:' + r.color}), r.name]));
  });
  main.appendChild(pick);
  if (chosen.length < 2) {
    main.appendChild(el('p', {cls: 'muted', text: 'Choose two or more runs (here or in the overview table) to overlay them on shared axes.'}));
    return Promise.resolve();
  }
  var measures = [];
  chosen.forEach(function (r) { Object.keys((r.overlays || {}).flatness || {}).forEach(function (m) { if (measures.indexOf(m) < 0) measures.push(m); }); });
  if (!S.measure || measures.indexOf(S.measure) < 0) S.measure = measures[0] || null;
  var jobs = [];
  var grid = el('div', {cls: 'grid'});
  DATA.overlays.forEach(function (o) {
    var traces = [];
    chosen.forEach(function (r) {
      var t = (r.overlays || {})[o.key];
      if (o.key === 'flatness') t = t && S.measure ? t[S.measure] : null;
      (t || []).forEach(function (x) { traces.push(x); });
    });
    var div = el('div', {cls: 'plot', id: 'overlay-' + o.key, 'data-overlay': o.key});
    var kids = [el('h3', {text: o.title})];
    if (o.key === 'flatness' && measures.length) {
      var sel = el('select', {id: 'measure'}, measures.map(function (m) { var op = el('option', {value: m, text: m}); op.selected = m === S.measure; return op; }));
      sel.addEventListener('change', function () { S.measure = sel.value; route(); });
      kids.push(el('label', {}, ['flatness measure: ', sel]));
    }
    kids.push(traces.length ? div : el('p', {cls: 'muted', text: 'None of the chosen runs has this result.'}));
    kids.push(el('p', {cls: 'caption', text: o.caption}));
    grid.appendChild(el('div', {cls: 'panel' + (o.key === 'flatness' ? ' full' : '')}, kids));
    if (traces.length) {
      var xt = o.key === 'flatness' ? S.measure : o.x;
      jobs.push([div, {data: traces, layout: {height: 400, hovermode: 'closest', margin: {l: 60, r: 20, t: 30, b: 50},
        xaxis: {title: {text: xt}, type: o.xlog ? 'log' : '-'}, yaxis: {title: {text: o.y}, type: o.ylog ? 'log' : '-'},
        legend: {font: {size: 10}}}}]);
    }
  });
  main.appendChild(grid);
  return Promise.all(jobs.map(function (j) { return plot(j[0], j[1]); }));
}

// ------------------------------------------------------------------ routing and live updates
var rendering = Promise.resolve();
function route() {
  var y = window.scrollY;
  purge();
  var h = location.hash || '';
  var done;
  if (h.indexOf('#run/') === 0) {
    var run = runById(h.slice(5));
    done = run ? showRun(run) : (showOverview(), Promise.resolve());
  } else if (h === '#compare') done = showCompare();
  else { showOverview(); done = Promise.resolve(); }
  rendering = Promise.resolve(done).then(function () {
    // for tests and scripts: how many views have been drawn completely, and which
    document.body.dataset.renders = String(Number(document.body.dataset.renders || 0) + 1);
    document.body.dataset.view = h;
  });
  return {scroll: y, done: rendering};
}
window.addEventListener('hashchange', function () { route(); window.scrollTo(0, 0); });

function tick() {
  document.querySelectorAll('.elapsed[data-started]').forEach(function (e) {
    e.textContent = secs(nowServer() - parseFloat(e.getAttribute('data-started')));
  });
}
function applyState(st) {
  st.runs.forEach(function (s) {
    var r = runById(s.id);
    if (!r) return;
    r.stages = s.stages; r.status = s.status; r.active = s.active;
    if (r.row && r.row.status) r.row.status = {t: s.status, v: s.status};
    document.querySelectorAll('[data-progress="' + s.id + '"]').forEach(function (old) { old.replaceWith(stageList(r)); });
    document.querySelectorAll('#overview tr[data-run="' + s.id + '"] td[data-key="status"]').forEach(function (td) {
      td.textContent = ''; td.appendChild(badge(s.status));
    });
  });
}
function poll() {
  fetch('api/state', {cache: 'no-store'}).then(function (r) { return r.json(); }).then(function (st) {
    S.offset = Date.now() / 1000 - st.now;
    document.getElementById('live').textContent = 'live \u00b7 updated ' + new Date().toLocaleTimeString();
    var changed = st.runs.length !== DATA.runs.length || st.runs.some(function (s, i) {
      var r = DATA.runs[i];
      return !r || r.id !== s.id || r.version !== s.version;
    });
    if (!changed) { applyState(st); return; }
    return fetch('api/data', {cache: 'no-store'}).then(function (r) { return r.json(); }).then(function (d) {
      d.template = DATA.template;
      DATA = d;
      var y = window.scrollY;
      route().done.then(function () { window.scrollTo(0, y); });
    });
  }).catch(function () {
    document.getElementById('live').textContent = 'live \u00b7 server not reachable, retrying';
  });
}
S.offset = DATA.live ? Date.now() / 1000 - DATA.now : 0;
route();
if (DATA.live) { setInterval(poll, 1500); setInterval(tick, 1000); }
window.lossglassDashboard = {data: function () { return DATA; }, rendered: function () { return rendering; }};
})();
