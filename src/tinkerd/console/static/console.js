// Sign-in and the hash router: #/runs, #/runs/<id>, #/sessions, #/playground, #/server.
"use strict";

let leavePage = null;

function signInPage(main, message) {
  const input = h("input", { type: "password", id: "api-key", placeholder: "tml-…", autocomplete: "off" });
  const error = h("p", { class: "error", id: "signin-error" }, message || "");
  const submit = async (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, input.value.trim());
    try {
      await call("GET", "/console/api/me");
    } catch (err) {
      sessionStorage.removeItem(KEY_STORAGE);
      error.textContent = err.status === 401 ? "That key is not known to this server." : err.message;
      return;
    }
    if (location.hash === "#/runs") route();
    else location.hash = "#/runs"; // the hashchange routes
  };
  main.replaceChildren(
    h("form", { class: "card signin", id: "signin", onsubmit: submit },
      h("h1", {}, "Sign in"),
      h("p", { class: "muted" }, "Use the API key you give the Tinker SDK (TINKER_API_KEY). It stays in this tab's session storage and is sent as the X-API-Key header, like the SDK does."),
      input,
      h("button", { type: "submit", class: "primary" }, "Sign in"),
      error,
    ),
  );
  input.focus();
}

async function route() {
  if (leavePage) {
    leavePage();
    leavePage = null;
  }
  const main = document.getElementById("main");
  const nav = document.getElementById("nav");
  const who = document.getElementById("who");
  const signout = document.getElementById("signout");
  if (apiKey() === null) {
    nav.hidden = true;
    signout.hidden = true;
    who.textContent = "";
    signInPage(main);
    return;
  }
  const parts = location.hash.replace(/^#\/?/, "").split("/");
  const page = parts[0] || "runs";
  nav.hidden = false;
  signout.hidden = false;
  for (const link of nav.querySelectorAll("a")) link.classList.toggle("active", link.dataset.page === page);
  try {
    const me = await call("GET", "/console/api/me");
    who.textContent = me.single_user ? "single-user server" : `signed in as ${me.owner}`;
    const pages = { runs: runsPage, sessions: sessionsPage, playground: playgroundPage, server: serverPage };
    if (page === "runs" && parts.length > 1) leavePage = await runPage(main, decodeURIComponent(parts.slice(1).join("/")));
    else leavePage = await (pages[page] || runsPage)(main);
    main.dataset.page = page;
  } catch (error) {
    if (error.status === 401) {
      sessionStorage.removeItem(KEY_STORAGE);
      signInPage(main, "Your key was refused; sign in again.");
    } else {
      main.replaceChildren(h("h1", {}, "Something went wrong"), h("p", { class: "error" }, error.message));
    }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("signout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    if (location.hash === "" || location.hash === "#") route();
    else location.hash = "";
  });
  window.addEventListener("hashchange", route);
  route();
});
