// Keyboard for the audit page: p pass (a critique: right), f fail (wrong), 1-9 toggle claims, shift+1-9 toggle reason codes, r type a
// reason, u undo, s skip, j/k next/previous, ? help. Codes and the reason go to the claim ticked last
// while it is ticked, else to the whole reflection. A pass (right) with ticked claims is refused here,
// before it is sent (the server refuses it too): the form's data-refuse says why.
// Served from /static (the Content-Security-Policy allows no inline script).
(function () {
  "use strict";
  function submit(id) {
    var form = document.getElementById(id);
    if (!form) return;
    if (form.requestSubmit) form.requestSubmit(); else form.submit();
  }
  function verdict(key) {
    var button = document.querySelector("#verdict button[data-key='" + key + "']");
    if (button) button.click();
  }
  function follow(id) {
    var link = document.getElementById(id);
    if (link) window.location.assign(link.getAttribute("href"));
  }
  var current = null;  // the claim ticked last, by key or click: codes and reason go to it while it is ticked
  function currentClaim() {
    var box = current && document.getElementById("claim-" + current);
    return box && box.checked ? current : null;
  }
  function toggleHelp() {
    var help = document.getElementById("help");
    if (help) help.hidden = !help.hidden;
  }
  document.addEventListener("keydown", function (event) {
    var target = event.target;
    var typing = target && (target.tagName === "INPUT" && target.type === "text" || target.tagName === "TEXTAREA");
    if (typing) {
      if (event.key === "Escape") target.blur();
      // Enter in the reason would submit the form with its first button, Pass: a fail typed
      // with a reason would be stored as a pass. The verdict comes from p / f or a click only.
      if (event.key === "Enter") event.preventDefault();
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    // shift+digit by its physical key: event.key is "!" or "&" there, by keyboard layout
    var digit = /^Digit([1-9])$/.exec(event.code || "");
    if (event.shiftKey && digit) {
      var claim = currentClaim();
      var code = document.getElementById(claim ? "claim-" + claim + "-code-" + digit[1] : "code-" + digit[1]);
      if (code) code.checked = !code.checked;
      event.preventDefault();
      return;
    }
    var key = event.key;
    if (key >= "1" && key <= "9") {
      var box = document.getElementById("claim-" + key);
      if (box) { box.checked = !box.checked; if (box.checked) current = key; }
    } else if (key === "p" || key === "f") verdict(key);
    else if (key === "u") submit("undo");
    else if (key === "s") submit("skip");
    else if (key === "j") follow("next");
    else if (key === "k") follow("prev");
    else if (key === "?") toggleHelp();
    else if (key === "r") {
      var claim = currentClaim();
      var reason = document.getElementById(claim ? "claim-" + claim + "-reason" : "reason");
      if (reason) reason.focus();
    }
    else return;
    event.preventDefault();
  });
  function ticked() {
    var boxes = document.querySelectorAll("input[name=claims]:checked"), numbers = [];
    for (var i = 0; i < boxes.length; i++) numbers.push(boxes[i].value);
    return numbers;
  }
  function refuse(message) {
    var error = document.getElementById("client-error");
    error.textContent = message;
    error.hidden = false;
  }
  document.addEventListener("DOMContentLoaded", function () {
    var link = document.getElementById("help-toggle");
    if (link) link.addEventListener("click", function (event) { event.preventDefault(); toggleHelp(); });
    var boxes = document.querySelectorAll("input[name=claims]");
    for (var i = 0; i < boxes.length; i++) boxes[i].addEventListener("change", function (event) {
      if (event.target.checked) current = event.target.value;
    });
    var form = document.getElementById("verdict");
    if (form) form.addEventListener("submit", function (event) {
      var wrong = ticked();
      if (event.submitter && event.submitter.dataset.key === "p" && wrong.length) {
        event.preventDefault();
        refuse(form.dataset.refuse.replace("{claims}", wrong.join(", ")));
      }
    });
  });
})();
