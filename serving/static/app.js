// The digit recognizer page: a drawing pad (mouse, pen and touch through Pointer Events) and an
// image upload, both sent to POST /predict as a base64 PNG/JPEG. No libraries, no network but ours.
"use strict";

(function () {
  const pad = document.getElementById("pad");
  const ctx = pad.getContext("2d");
  const els = {
    status: document.getElementById("model-status"),
    result: document.getElementById("result"),
    placeholder: document.getElementById("placeholder"),
    error: document.getElementById("error"),
    digit: document.getElementById("digit"),
    confidence: document.getElementById("confidence"),
    bars: document.getElementById("bars"),
    model: document.getElementById("model"),
    latency: document.getElementById("latency"),
    roundtrip: document.getElementById("roundtrip"),
    requestId: document.getElementById("request-id"),
    inverted: document.getElementById("inverted-note"),
    upload: document.getElementById("upload"),
  };

  // Black ink on white, like paper: the server detects dark-on-light input and inverts it.
  const INK = "#000000";
  const PAPER = "#ffffff";
  let drawing = false;
  let dirty = false;
  let last = null;
  let inFlight = 0;

  function clearPad() {
    ctx.fillStyle = PAPER;
    ctx.fillRect(0, 0, pad.width, pad.height);
    dirty = false;
  }

  function point(event) {
    const rect = pad.getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) * pad.width) / rect.width,
      y: ((event.clientY - rect.top) * pad.height) / rect.height,
    };
  }

  function stroke(from, to) {
    ctx.strokeStyle = INK;
    ctx.fillStyle = INK;
    ctx.lineWidth = 18;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
  }

  pad.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    pad.setPointerCapture(event.pointerId);
    drawing = true;
    last = point(event);
    stroke(last, last);
    dirty = true;
  });
  pad.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    event.preventDefault();
    const next = point(event);
    stroke(last, next);
    last = next;
  });
  function endStroke(event) {
    if (!drawing) return;
    drawing = false;
    if (pad.hasPointerCapture(event.pointerId)) pad.releasePointerCapture(event.pointerId);
    predictPad();
  }
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);

  document.getElementById("clear").addEventListener("click", () => {
    clearPad();
    showPlaceholder();
  });
  document.getElementById("predict").addEventListener("click", () => predictPad());

  els.upload.addEventListener("change", () => {
    const file = els.upload.files && els.upload.files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => {
      showUpload(reader.result);
      predict(reader.result);
    };
    reader.onerror = () => showError("Could not read the file.");
    reader.readAsDataURL(file);
    els.upload.value = "";
  });

  // Shows the uploaded picture on the pad, fitted, so the person sees what was sent.
  function showUpload(dataUrl) {
    const img = new Image();
    img.onload = () => {
      clearPad();
      const scale = Math.min(pad.width / img.width, pad.height / img.height);
      const w = img.width * scale;
      const h = img.height * scale;
      ctx.drawImage(img, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
      dirty = false;
    };
    img.src = dataUrl;
  }

  function predictPad() {
    if (!dirty) {
      showError("Draw a digit first.");
      return;
    }
    predict(pad.toDataURL("image/png"));
  }

  async function predict(dataUrl) {
    const started = performance.now();
    const ticket = ++inFlight;
    els.error.hidden = true;
    try {
      const response = await fetch("/predict", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ image: dataUrl }),
      });
      const body = await response.json().catch(() => ({}));
      if (ticket !== inFlight) return; // a newer request superseded this one
      if (!response.ok) {
        showError(body.error || `The server answered ${response.status}.`);
        return;
      }
      showResult(body, performance.now() - started);
    } catch (err) {
      if (ticket === inFlight) showError(`The server could not be reached (${err.message}).`);
    }
  }

  function showResult(body, roundTripMs) {
    els.placeholder.hidden = true;
    els.result.hidden = false;
    els.digit.textContent = String(body.digit);
    els.confidence.textContent = `${(body.confidence * 100).toFixed(1)}%`;
    els.model.textContent = `${body.model_name} v${body.model_version}`;
    els.latency.textContent = `${body.latency_ms.toFixed(2)} ms`;
    els.roundtrip.textContent = `${roundTripMs.toFixed(1)} ms`;
    els.requestId.textContent = body.request_id;
    els.inverted.hidden = !body.inverted;
    els.bars.replaceChildren(
      ...body.probabilities.map((p, digit) => {
        const li = document.createElement("li");
        li.dataset.digit = String(digit);
        if (digit === body.digit) li.className = "top";
        const label = document.createElement("span");
        label.className = "label";
        label.textContent = String(digit);
        const track = document.createElement("span");
        track.className = "track";
        const fill = document.createElement("span");
        fill.className = "fill";
        fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
        track.appendChild(fill);
        const value = document.createElement("span");
        value.className = "value";
        value.textContent = `${(p * 100).toFixed(1)}%`;
        li.append(label, track, value);
        return li;
      }),
    );
    document.body.dataset.state = "predicted";
  }

  function showPlaceholder() {
    els.result.hidden = true;
    els.error.hidden = true;
    els.placeholder.hidden = false;
    document.body.dataset.state = "idle";
  }

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = false;
    document.body.dataset.state = "error";
  }

  async function refreshStatus() {
    try {
      const response = await fetch("/health", { cache: "no-store" });
      const body = await response.json();
      const model = body.model || {};
      if (body.status === "ok") {
        els.status.textContent = `Serving ${model.name} version ${model.version}` + (model.alias ? ` (@${model.alias})` : "");
        els.status.className = "status ok";
        return;
      }
      els.status.textContent = `Model ${model.uri || ""} is loading\u2026`;
      els.status.className = "status bad";
    } catch (err) {
      els.status.textContent = "The server is not reachable.";
      els.status.className = "status bad";
    }
    setTimeout(refreshStatus, 3000);
  }

  clearPad();
  showPlaceholder();
  refreshStatus();
})();
