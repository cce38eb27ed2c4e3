(function () {
  'use strict';
  var data = JSON.parse(document.getElementById('report-data').textContent);
  var tiles = Array.prototype.slice.call(document.querySelectorAll('figure.tile'));
  var groups = Array.prototype.slice.call(document.querySelectorAll('section.group'));
  var shown = document.getElementById('shown'), notice = document.getElementById('notice');
  var reason = document.getElementById('f-reason');
  var box = document.getElementById('lightbox'), lbImg = document.getElementById('lb-img');
  var lbCap = document.getElementById('lb-cap');
  var filters = ['status', 'model', 'check', 'review'].map(function (n) {
    return [n, document.getElementById('f-' + n)];
  });
  var search = document.getElementById('f-search');
  var current = null;

  function apply() {
    var q = search.value.trim().toLowerCase(), count = 0;
    tiles.forEach(function (t) {
      var ok = !q || t.dataset.search.indexOf(q) >= 0;
      filters.forEach(function (f) { if (ok && f[1].value && t.dataset[f[0]] !== f[1].value) { ok = false; } });
      t.hidden = !ok;
      if (ok) { count += 1; }
    });
    groups.forEach(function (g) { g.hidden = !g.querySelector('figure.tile:not([hidden])'); });
    shown.textContent = 'showing ' + count + ' of ' + data.tiles + ' tiles';
  }
  filters.forEach(function (f) { f[1].addEventListener('change', apply); });
  search.addEventListener('input', apply);

  function visible() { return tiles.filter(function (t) { return !t.hidden && t.getClientRects().length > 0; }); }
  function focus(t) {
    if (!t) { return; }
    if (current) { current.tabIndex = -1; }
    current = t;
    t.tabIndex = 0;
    t.focus();
    if (box.open) { show(t); }
  }
  function step(delta) {
    var v = visible(), i = v.indexOf(current);
    focus(v[i < 0 ? 0 : Math.max(0, Math.min(v.length - 1, i + delta))]);
  }
  function vertical(down) {
    var v = visible();
    if (!current || v.indexOf(current) < 0) { focus(v[0]); return; }
    var r = current.getBoundingClientRect(), best = null, score = Infinity;
    v.forEach(function (t) {
      var o = t.getBoundingClientRect();
      var dy = down ? o.top - r.bottom : r.top - o.bottom;
      if (dy < -1) { return; }
      var s = dy * 10 + Math.abs(o.left - r.left);
      if (s < score) { score = s; best = t; }
    });
    focus(best || current);
  }
  function show(t) {
    var link = t.querySelector('a.open');
    lbImg.hidden = !link;
    if (link) { lbImg.src = link.getAttribute('href'); }
    lbCap.textContent = '';
    lbCap.appendChild(t.querySelector('figcaption').cloneNode(true));
    if (!box.open) { box.showModal(); }
  }

  function decide(t, decision) {
    if (data.mode !== 'review' || !t || !t.dataset.sha) { return; }
    var body = {request_key: t.dataset.key, idx: Number(t.dataset.idx), sha256: t.dataset.sha,
                decision: decision, reason: reason ? reason.value : ''};
    notice.textContent = '';
    fetch(data.endpoint, {method: 'POST', headers: {'Content-Type': 'application/json',
                                                     'X-Batchgen-Token': data.token},
                          body: JSON.stringify(body), credentials: 'same-origin'})
      .then(function (r) { return r.json().then(function (j) { return [r.ok, j]; }); })
      .then(function (res) {
        if (!res[0]) { notice.textContent = res[1].error || 'the decision was not saved'; return; }
        t.dataset.review = res[1].review;
        var badge = t.querySelector('.rv');
        if (badge) { badge.textContent = res[1].review; badge.title = res[1].reason || ''; }
        if (box.open && current === t) { show(t); }
      })
      .catch(function () { notice.textContent = 'the review server did not answer; is it still running?'; });
  }

  document.addEventListener('click', function (e) {
    var b = e.target.closest('button[data-decision]');
    if (b) {
      e.preventDefault();
      var t = b.closest('figure.tile') || current;
      focus(t);
      decide(t, b.dataset.decision);
      return;
    }
    if (e.target.id === 'lb-close') { box.close(); return; }
    var a = e.target.closest('a.open');
    if (a && !e.ctrlKey && !e.metaKey && !e.shiftKey) {
      e.preventDefault();
      focus(a.closest('figure.tile'));
      show(current);
    }
  });
  document.addEventListener('keydown', function (e) {
    var tag = (e.target.tagName || '').toLowerCase();
    if (tag === 'input' || tag === 'select' || tag === 'textarea' || e.ctrlKey || e.metaKey || e.altKey) { return; }
    var k = e.key;
    if (k === 'ArrowRight' || k === 'l') { step(1); } else if (k === 'ArrowLeft' || k === 'h') { step(-1); }
    else if (k === 'ArrowDown' || k === 'j') { vertical(true); } else if (k === 'ArrowUp' || k === 'k') { vertical(false); }
    else if (k === 'Enter' || k === ' ') { if (current) { show(current); } }
    else if (k === 'Escape') { if (box.open) { box.close(); } return; }
    else if (k === 'a' || k === 'r') { decide(current, k === 'a' ? 'approve' : 'reject'); if (box.open) { step(1); } }
    else { return; }
    e.preventDefault();
  });
  box.addEventListener('close', function () { if (current) { current.focus(); } });
  apply();
  focus(visible()[0]);
})();
