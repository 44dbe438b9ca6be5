/* The login box in the page's header (docs/dashboard.md, "Login").
 *
 * Asks /api/session first: whether this dashboard has logins, whether this client may see
 * without one (a room display), and who is logged in. window.iortAuth is a promise of
 * {view: boolean} that app.js waits on before it opens the stream: without a login and
 * without anonymous view, nothing of the rooms is fetched and the form is shown instead.
 *
 * The login is a fetch (form-encoded holder and password, the login CSRF token in the
 * X-CSRF-Token header); the session id stays in an HttpOnly cookie this script never sees.
 * A success or a logout reloads the page, so that the stream restarts with the new rights.
 * Every 30 s the page peeks at the session (a peek does not count as activity): once it
 * has ended the page reloads and asks for a login again.
 */
(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  let loginToken = null;
  let current = null;

  async function fetchSession(peek) {
    const r = await fetch("/api/session" + (peek ? "?peek=1" : ""), { credentials: "same-origin", cache: "no-store" });
    if (!r.ok) throw new Error("session: HTTP " + r.status);
    return r.json();
  }

  function say(text) { $("login-message").textContent = text; }

  function showForm(on) {
    $("login-form").hidden = !on;
    if (on) $("login-holder").focus();
  }

  function render(s) {
    current = s;
    const box = $("login");
    box.hidden = !s.auth;
    if (!s.auth) return;
    loginToken = s.login_csrf;
    const sess = s.session;
    $("login-who").textContent = sess
      ? sess.name + " (" + sess.holder + ") · " + sess.roles.join(", ")
      : "not logged in";
    $("logout").hidden = !sess;
    $("login-open").hidden = !!sess || !s.anonymous_view;
    showForm(!sess && !s.anonymous_view);
  }

  async function login(ev) {
    ev.preventDefault();
    const holder = $("login-holder").value.trim();
    const password = $("login-password").value;
    if (!holder || !password) { say("enter your id and password"); return; }
    $("login-submit").disabled = true;
    try {
      const r = await fetch("/api/login", {
        method: "POST",
        credentials: "same-origin",
        headers: { "content-type": "application/x-www-form-urlencoded", "x-csrf-token": loginToken },
        body: new URLSearchParams({ holder, password }).toString(),
      });
      let body = {};
      try { body = await r.json(); } catch (err) { body = { error: "HTTP " + r.status }; }
      if (r.ok) { $("login-password").value = ""; location.reload(); return; }
      let text = body.error || "HTTP " + r.status;
      if (r.status === 401 && body.retry_after_s) text += " · next attempt in " + body.retry_after_s + " s";
      if (r.status === 403 && body.reason === "csrf") {
        // The login token went stale (a restarted dashboard): take a fresh one.
        try { render(await fetchSession(false)); } catch (err) { /* said below */ }
      }
      say(text);
    } catch (err) {
      say("the dashboard did not answer: " + err);
    } finally {
      $("login-submit").disabled = false;
    }
  }

  async function logout() {
    const token = current && current.session ? current.session.csrf : "";
    try {
      await fetch("/api/logout", { method: "POST", credentials: "same-origin", headers: { "x-csrf-token": token } });
    } finally {
      location.reload();
    }
  }

  function wire() {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", logout);
    $("login-open").addEventListener("click", () => showForm($("login-form").hidden));
  }

  const ready = fetchSession(false).then((s) => {
    const go = () => { wire(); render(s); };
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", go); else go();
    if (s.auth && s.session) {
      setInterval(async () => {
        try {
          const now = await fetchSession(true);
          if (!now.session) location.reload();
        } catch (err) { /* the link's own line says the server is gone */ }
      }, 30000);
    }
    return { view: !s.auth || s.anonymous_view || !!s.session };
  }).catch(() => ({ view: true }));
  window.iortAuth = ready;
  window.iortSession = () => current;  // the session's holder, roles and CSRF token (signoff.js)
})();
