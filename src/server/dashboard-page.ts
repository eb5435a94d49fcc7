/**
 * The live dashboard (GET /dashboard): one self-contained page, plain JS and inline SVG, no
 * build step and nothing fetched from elsewhere (works offline). Data: GET /dashboard/state
 * every 2 s and the SSE stream GET /dashboard/events (read with fetch, so an admin key given as
 * `#key=<admin key>` in the page URL is sent as `Authorization: Bearer`, never in a URL the
 * server logs).
 */
export const DASHBOARD_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>kvgate — live routing</title>
<style>
:root { --bg:#0f1419; --panel:#171e26; --line:#263241; --text:#dce3ea; --muted:#8a99a8; --ok:#3fb950; --warn:#d29922; --bad:#f85149; --accent:#58a6ff; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--text); font:14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header { display:flex; align-items:baseline; gap:18px; padding:14px 22px; border-bottom:1px solid var(--line); }
header h1 { font-size:19px; margin:0; letter-spacing:.3px; }
header .meta { color:var(--muted); font-size:13px; }
header .live { margin-left:auto; font-size:13px; color:var(--muted); }
header .live b { display:inline-block; width:9px; height:9px; border-radius:50%; background:var(--bad); margin-right:6px; }
header .live.on b { background:var(--ok); }
main { display:grid; grid-template-columns: minmax(0, 1.6fr) minmax(0, 1fr); gap:16px; padding:16px 22px; }
section { background:var(--panel); border:1px solid var(--line); border-radius:8px; padding:12px 14px; min-width:0; }
section h2 { font-size:12px; text-transform:uppercase; letter-spacing:1px; color:var(--muted); margin:0 0 10px; font-weight:600; }
.kpis { grid-column: 1 / -1; display:grid; grid-template-columns: repeat(4, 1fr); gap:16px; padding:0; background:none; border:none; }
.kpi { background:var(--panel); border:1px solid var(--line); border-radius:8px; padding:10px 14px; }
.kpi .label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.8px; }
.kpi .value { font-size:26px; font-weight:600; margin:2px 0; font-variant-numeric: tabular-nums; }
.kpi svg { width:100%; height:34px; display:block; }
table { width:100%; border-collapse:collapse; font-variant-numeric: tabular-nums; }
th { text-align:left; color:var(--muted); font-weight:500; font-size:12px; padding:4px 6px; border-bottom:1px solid var(--line); }
td { padding:6px; border-bottom:1px solid #1d2630; vertical-align:middle; white-space:nowrap; }
td.id { max-width:210px; overflow:hidden; text-overflow:ellipsis; }
.scroll { overflow-x:auto; }
.dot { display:inline-block; width:10px; height:10px; border-radius:50%; margin-right:7px; vertical-align:-1px; }
.pill { display:inline-block; padding:1px 7px; border-radius:10px; font-size:12px; background:#21303f; color:var(--muted); }
.pill.open { background:#4a1d1d; color:#ff9a94; } .pill.half_open { background:#4a3b13; color:#f2cc60; } .pill.closed { background:#17331f; color:#7ee2a0; }
.bar { position:relative; height:8px; width:72px; background:#222d39; border-radius:4px; overflow:hidden; display:inline-block; vertical-align:middle; }
.bar i { position:absolute; left:0; top:0; bottom:0; background:var(--accent); border-radius:4px; }
.bar i.local { background:#a371f7; }
.num { display:inline-block; min-width:34px; text-align:right; margin-left:6px; }
#feed { max-height:560px; overflow-y:auto; }
.dec { border-bottom:1px solid #1d2630; padding:6px 4px; cursor:pointer; }
.dec:hover { background:#1b2430; }
.dec .top { display:flex; gap:10px; align-items:center; }
.dec .time { color:var(--muted); font-size:12px; width:64px; flex:none; font-variant-numeric: tabular-nums; }
.dec .w { font-weight:600; white-space:nowrap; flex:none; }
.dec .why { color:var(--muted); font-size:12px; white-space:nowrap; overflow:hidden; text-overflow:ellipsis; min-width:0; flex:1; }
.dec .ttft { font-size:12px; width:70px; text-align:right; flex:none; font-variant-numeric: tabular-nums; }
.dec .detail { display:none; margin:6px 0 2px 74px; font-size:12px; color:var(--muted); }
.dec.open .detail { display:block; }
.dec .detail table td, .dec .detail table th { padding:2px 6px; font-size:12px; }
.tag { font-size:11px; padding:0 6px; border-radius:8px; background:#21303f; color:#9fb3c8; flex:none; }
.tag.hit { background:#17331f; color:#7ee2a0; } .tag.miss { background:#3a2a14; color:#f2cc60; } .tag.balanced { background:#2b2145; color:#c6a6ff; }
.groups .g { display:flex; align-items:center; gap:10px; margin:5px 0; }
.groups .g .p { width:300px; flex:none; font-size:12px; color:var(--muted); overflow:hidden; text-overflow:ellipsis; white-space:nowrap; font-family: ui-monospace, monospace; }
.groups .g svg { flex:1; height:14px; }
.legend { display:flex; flex-wrap:wrap; gap:12px; margin-top:8px; font-size:12px; color:var(--muted); }
.empty { color:var(--muted); font-size:13px; padding:10px 0; }
.wide { grid-column: 1 / -1; }
</style>
</head>
<body>
<header>
  <h1>kvgate</h1>
  <span class="meta" id="meta">connecting…</span>
  <span class="live" id="live"><b></b><span id="livetext">offline</span></span>
</header>
<main>
  <section class="kpis">
    <div class="kpi"><div class="label">Requests / s</div><div class="value" id="k-rate">–</div><svg id="s-rate" viewBox="0 0 200 34" preserveAspectRatio="none"></svg></div>
    <div class="kpi"><div class="label">Mean TTFT</div><div class="value" id="k-ttft">–</div><svg id="s-ttft" viewBox="0 0 200 34" preserveAspectRatio="none"></svg></div>
    <div class="kpi"><div class="label">Prefix cache hit rate</div><div class="value" id="k-hit">–</div><div class="label" id="k-hit-sub"></div></div>
    <div class="kpi"><div class="label">Healthy workers</div><div class="value" id="k-workers">–</div><div class="label" id="k-workers-sub"></div></div>
  </section>
  <section>
    <h2>Workers</h2>
    <div class="scroll"><table id="workers"><thead><tr><th>Worker</th><th>Breaker</th><th>In flight (all / here)</th><th>Engine queue</th><th>Engine KV</th><th>Hit rate</th><th>Groups</th><th id="held-h">Cache held</th></tr></thead><tbody></tbody></table></div>
  </section>
  <section>
    <h2>Live decisions <span id="feedcount" class="pill"></span></h2>
    <div id="feed"><div class="empty">Waiting for traffic…</div></div>
  </section>
  <section class="wide groups">
    <h2>Where prefixes live — recent prefix groups (first 256 characters of the prompt) by worker</h2>
    <div id="groups"><div class="empty">No prefix groups yet.</div></div>
    <div class="legend" id="legend"></div>
  </section>
</main>
<script>
(function () {
  'use strict';
  var key = (new URLSearchParams(location.hash.slice(1))).get('key');
  var headers = key ? { authorization: 'Bearer ' + key } : {};
  var PALETTE = ['#58a6ff', '#3fb950', '#d29922', '#f778ba', '#a371f7', '#39c5cf', '#ff7b72', '#e3b341', '#8ddb8c', '#79c0ff', '#d2a8ff', '#ffa657'];
  var colors = {};
  var nextColor = 0;
  function color(w) { if (!colors[w]) colors[w] = PALETTE[nextColor++ % PALETTE.length]; return colors[w]; }
  function $(id) { return document.getElementById(id); }
  function esc(s) { return String(s).replace(/[&<>"']/g, function (c) { return { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]; }); }
  function short(id) { return String(id).replace(/^https?:\\/\\//, ''); }
  function pct(x) { return x === null || x === undefined ? '–' : (100 * x).toFixed(x >= 0.995 || x === 0 ? 0 : 1) + '%'; }
  function ms(x) { return x === null || x === undefined ? '–' : x < 1000 ? Math.round(x) + ' ms' : (x / 1000).toFixed(2) + ' s'; }

  function spark(svg, values, stroke) {
    var w = 200, h = 34, n = values.length;
    var max = 0;
    values.forEach(function (v) { if (v !== null && v > max) max = v; });
    if (max <= 0) max = 1;
    var pts = [];
    values.forEach(function (v, i) { if (v !== null) pts.push((i * w / Math.max(1, n - 1)).toFixed(1) + ',' + (h - 2 - (v / max) * (h - 4)).toFixed(1)); });
    svg.innerHTML = pts.length ? '<polyline fill="none" stroke="' + stroke + '" stroke-width="1.6" points="' + pts.join(' ') + '"/>' : '';
  }

  var state = null;
  function render(s) {
    state = s;
    $('meta').textContent = 'policy ' + s.policy + ' · ' + s.mode + ' mode · replica ' + s.replica_id;
    var series = s.series || [];
    var last = series.slice(-10);
    var reqs = 0, tsum = 0, tn = 0;
    last.forEach(function (p) { reqs += p.requests; if (p.ttftMs !== null) { tsum += p.ttftMs; tn++; } });
    $('k-rate').textContent = (reqs / Math.max(1, last.length)).toFixed(1);
    $('k-ttft').textContent = tn ? ms(tsum / tn) : '–';
    spark($('s-rate'), series.map(function (p) { return p.requests; }), '#58a6ff');
    spark($('s-ttft'), series.map(function (p) { return p.ttftMs; }), '#d29922');
    var prompt = 0, cached = 0, healthy = 0;
    s.workers.forEach(function (w) { prompt += w.prompt_tokens; cached += w.cached_tokens; if (w.available) healthy++; });
    $('k-hit').textContent = prompt > 0 ? pct(cached / prompt) : '–';
    $('k-hit-sub').textContent = prompt > 0 ? cached.toLocaleString() + ' of ' + prompt.toLocaleString() + ' prompt tokens cached' : 'from engine usage';
    $('k-workers').textContent = healthy + ' / ' + s.workers.length;
    var open = s.workers.filter(function (w) { return w.breaker === 'open'; }).length;
    $('k-workers-sub').textContent = open ? open + ' breaker(s) open' : 'all breakers closed';
    $('held-h').title = s.cache_held_unit ? 'Cache held per worker, in ' + s.cache_held_unit : 'Cache held (the policy keeps no prefix structure)';
    var share = (s.prefix_groups && s.prefix_groups.share) || {};
    var maxLoad = 1;
    s.workers.forEach(function (w) { if (w.load > maxLoad) maxLoad = w.load; });
    var rows = s.workers.map(function (w) {
      var dot = w.available ? 'var(--ok)' : w.healthy ? 'var(--warn)' : 'var(--bad)';
      var e = w.engine;
      var kv = e ? e.kv_usage : null;
      return '<tr data-worker="' + esc(w.id) + '">' +
        '<td class="id" title="' + esc(w.id) + '"><span class="dot" style="background:' + dot + '"></span><span style="color:' + color(w.id) + '">■</span> ' + esc(short(w.id)) + '</td>' +
        '<td><span class="pill ' + esc(w.breaker || '') + '">' + esc(w.breaker || 'n/a') + '</span></td>' +
        '<td><span class="bar"><i style="width:' + (100 * w.load / maxLoad).toFixed(0) + '%"></i></span><span class="num">' + w.load + ' / ' + w.local_load + '</span></td>' +
        '<td>' + (e ? e.waiting + ' wait · ' + e.running + ' run' : '<span class="pill">no metrics</span>') + '</td>' +
        '<td>' + (kv === null ? '–' : '<span class="bar"><i class="local" style="width:' + (100 * kv).toFixed(0) + '%"></i></span><span class="num">' + pct(kv) + '</span>') + '</td>' +
        '<td>' + pct(w.hit_rate) + '</td>' +
        '<td>' + (share[w.id] || 0) + '</td>' +
        '<td>' + (w.cache_held === null ? '–' : Number(w.cache_held).toLocaleString()) + '</td></tr>';
    });
    $('workers').tBodies[0].innerHTML = rows.join('') || '<tr><td colspan="8" class="empty">No workers registered.</td></tr>';
    renderGroups(s.prefix_groups);
  }

  function renderGroups(pg) {
    if (!pg || !pg.groups.length) return;
    var html = pg.groups.map(function (g) {
      var total = 0;
      Object.keys(g.workers).forEach(function (w) { total += g.workers[w]; });
      var x = 0;
      var rects = Object.keys(g.workers).sort().map(function (w) {
        var width = 1000 * g.workers[w] / total;
        var r = '<rect x="' + x.toFixed(1) + '" y="0" width="' + width.toFixed(1) + '" height="14" fill="' + color(w) + '"><title>' + esc(short(w)) + ': ' + g.workers[w] + ' requests</title></rect>';
        x += width;
        return r;
      }).join('');
      return '<div class="g"><span class="p" title="' + esc(g.preview) + '">' + esc(g.preview || g.id) + '</span><svg viewBox="0 0 1000 14" preserveAspectRatio="none">' + rects + '</svg><span class="pill">' + total + '</span></div>';
    }).join('');
    $('groups').innerHTML = html;
    $('legend').innerHTML = Object.keys(colors).map(function (w) { return '<span><span style="color:' + colors[w] + '">■</span> ' + esc(short(w)) + '</span>'; }).join('') +
      '<span>· ' + pg.total + ' groups, ' + pg.split + ' served by more than one worker</span>';
  }

  var feed = [];
  var bySeq = {};
  function explanationHtml(e) {
    if (!e) return '<div>Not explained (start kvgate with --explain-decisions, or keep this page open while traffic flows).</div>';
    if (e.prefill && e.decode) return '<div><b>prefill</b></div>' + explanationHtml(e.prefill) + '<div><b>decode</b></div>' + explanationHtml(e.decode);
    var rows = e.candidates.map(function (c) {
      var m = c.matchedBlocks !== undefined ? c.matchedBlocks + ' blk' : c.matchedTokens !== undefined ? c.matchedTokens + ' tok' : c.matchedChars !== undefined ? c.matchedChars + ' ch' : '–';
      return '<tr' + (c.worker === e.chosen ? ' style="color:var(--text)"' : '') + '><td>' + esc(short(c.worker)) + '</td><td>' + (c.excluded ? '<span class="pill open">' + esc(c.excluded) + '</span>' : 'ok') + '</td><td>' + m + '</td><td>' + c.load + '</td><td>' + (c.engine ? c.engine.waiting : '–') + '</td><td>' + (c.cost !== undefined ? c.cost : c.probability !== undefined ? 'p=' + c.probability.toFixed(2) : '–') + '</td></tr>';
    }).join('');
    return '<div>' + esc(e.detail) + '</div><table><thead><tr><th>candidate</th><th>state</th><th>matched</th><th>load</th><th>queue</th><th>cost</th></tr></thead><tbody>' + rows + '</tbody></table>';
  }
  function decisionHtml(d) {
    var n = d.note || {};
    var tag = n.kind ? '<span class="tag ' + n.kind + '">' + n.kind + '</span>' : '';
    var why = d.explanation && d.explanation.rule ? d.explanation.rule : d.explanation && d.explanation.decode ? d.explanation.decode.rule : '';
    var matched = n.matchedBlocks !== undefined ? n.matchedBlocks + '/' + n.requestBlocks + ' blocks' : n.matched !== undefined ? n.matched + '/' + n.input + ' matched' : '';
    var t = new Date(d.at).toLocaleTimeString([], { hour12: false });
    return '<div class="top"><span class="time">' + t + '</span><span class="w" style="color:' + color(d.worker) + '">' + esc(short(d.worker)) + (d.attempt ? ' <span class="pill">retry ' + d.attempt + '</span>' : '') + '</span>' + tag +
      '<span class="why">' + esc([why, matched].filter(Boolean).join(' · ')) + '</span><span class="ttft" data-ttft>' + (d.done ? ms(d.done.ttftMs) : '…') + '</span></div>' +
      '<div class="detail">' + esc(d.model) + ' · ' + esc(d.route) + ' · ' + esc(d.requestId) + explanationHtml(d.explanation) + '</div>';
  }
  function addDecision(d) {
    if (bySeq[d.seq]) return;
    var el = document.createElement('div');
    el.className = 'dec';
    el.innerHTML = decisionHtml(d);
    el.addEventListener('click', function () { el.classList.toggle('open'); });
    d.el = el;
    bySeq[d.seq] = d;
    feed.push(d);
    var box = $('feed');
    if (feed.length === 1) box.innerHTML = '';
    box.insertBefore(el, box.firstChild);
    while (feed.length > 150) { var old = feed.shift(); delete bySeq[old.seq]; if (old.el && old.el.parentNode) old.el.parentNode.removeChild(old.el); }
    $('feedcount').textContent = feed.length;
  }
  function markDone(o) {
    var d = bySeq[o.seq];
    if (!d) return;
    d.done = o;
    var cell = d.el.querySelector('[data-ttft]');
    if (cell) { cell.textContent = o.status >= 400 || o.status === 0 ? 'HTTP ' + o.status : ms(o.ttftMs); if (o.status >= 400 || o.status === 0) cell.style.color = 'var(--bad)'; }
  }

  function setLive(on) { $('live').className = on ? 'live on' : 'live'; $('livetext').textContent = on ? 'live' : 'reconnecting…'; }

  function stream() {
    fetch('/dashboard/events?backlog=60', { headers: headers, cache: 'no-store' }).then(function (res) {
      if (!res.ok || !res.body) throw new Error('HTTP ' + res.status);
      setLive(true);
      var reader = res.body.getReader();
      var dec = new TextDecoder();
      var buf = '';
      function pump() {
        return reader.read().then(function (r) {
          if (r.done) throw new Error('closed');
          buf += dec.decode(r.value, { stream: true });
          var at;
          while ((at = buf.indexOf('\\n\\n')) >= 0) {
            var block = buf.slice(0, at);
            buf = buf.slice(at + 2);
            var ev = 'message', data = '';
            block.split('\\n').forEach(function (line) {
              if (line.indexOf('event: ') === 0) ev = line.slice(7);
              else if (line.indexOf('data: ') === 0) data += line.slice(6);
            });
            if (!data) continue;
            try {
              var obj = JSON.parse(data);
              if (ev === 'decision') addDecision(obj); else if (ev === 'done') markDone(obj);
            } catch (e) { /* ignore a malformed event */ }
          }
          return pump();
        });
      }
      return pump();
    }).catch(function () { setLive(false); setTimeout(stream, 2000); });
  }

  function poll() {
    fetch('/dashboard/state', { headers: headers, cache: 'no-store' })
      .then(function (r) { if (!r.ok) throw new Error('HTTP ' + r.status); return r.json(); })
      .then(render)
      .catch(function (e) { $('meta').textContent = 'cannot read /dashboard/state: ' + e.message + (key ? '' : ' (admin key? open /dashboard#key=…)'); })
      .then(function () { setTimeout(poll, 2000); });
  }
  poll();
  stream();
})();
</script>
</body>
</html>
`;
