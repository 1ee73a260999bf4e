/* The console's only script: keeps the regions of a page marked data-live up to date.
 *
 * Every few seconds (the page's data-refresh-seconds) it fetches the page itself again, same
 * origin with the session cookie, and swaps in the new content of each marked region (found by
 * id). No eval, no inline script, no HTML built from strings here: the server renders (and
 * escapes) everything, and the Content-Security-Policy allows only this file.
 * A session that ended makes the page reload (the server then shows the sign-in page).
 */
(function () {
  'use strict';

  var seconds = Number(document.body.getAttribute('data-refresh-seconds') || '0');
  var regions = document.querySelectorAll('[data-live]');
  var status = document.getElementById('live-status');
  if (!seconds || !regions.length || !window.fetch || !window.DOMParser) {
    return;
  }
  var busy = false;

  function say(text, stale) {
    if (!status) { return; }
    status.textContent = text;
    status.classList.toggle('stale', !!stale);
  }

  function focusKey() {
    var el = document.activeElement;
    return el && el.getAttribute ? el.getAttribute('data-key') : null;
  }

  function swap(doc) {
    var key = focusKey();
    regions.forEach(function (region) {
      var fresh = doc.getElementById(region.id);
      if (fresh && fresh.innerHTML !== region.innerHTML) {
        region.innerHTML = fresh.innerHTML;
      }
    });
    if (status) { status.classList.remove('stale'); }
    if (key) {  // keep the keyboard where it was
      var again = document.querySelector('[data-key="' + CSS.escape(key) + '"]');
      if (again && document.activeElement !== again) { again.focus(); }
    }
  }

  function refresh() {
    if (busy || document.hidden) { return; }
    busy = true;
    fetch(window.location.href, {
      credentials: 'same-origin',
      cache: 'no-store',
      headers: { 'Accept': 'text/html', 'X-DSM-Refresh': '1' }
    }).then(function (response) {
      if (response.status === 401 || response.redirected) {
        window.location.reload();  // the session ended: the server shows sign-in
        return null;
      }
      if (!response.ok) {
        say('Could not refresh (' + response.status + '); retrying', true);
        return null;
      }
      return response.text();
    }).then(function (text) {
      if (text !== null && text !== undefined) {
        swap(new DOMParser().parseFromString(text, 'text/html'));
      }
    }).catch(function () {
      say('Could not reach the manager; retrying', true);
    }).then(function () {
      busy = false;
    });
  }

  window.setInterval(refresh, seconds * 1000);
  document.addEventListener('visibilitychange', function () {
    if (!document.hidden) { refresh(); }
  });
}());
